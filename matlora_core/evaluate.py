"""Per-rank evaluation: answer-token loss, exact-match accuracy and AURAC, the area under the rank curve."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, Example, answers_match, collate, extract_answer, tokenize_example
from .model import MatryoshkaModel

logger = logging.getLogger(__name__)


@dataclass
class RankResult:
    rank: int
    answer_loss: float | None = None     # mean negative log-likelihood per answer token, in nats
    accuracy: float | None = None        # fraction of exact matches of the number after '####'
    answer_tokens: int = 0
    seconds: float = 0.0


@dataclass
class CurveResult:
    """The rank curve of one adapter under one inference rule."""

    label: str
    adapter: str
    inference_rule: str
    ranks: list[RankResult] = field(default_factory=list)

    def aurac(self, metric: str) -> dict[str, float | None]:
        points = [(r.rank, getattr(r, metric)) for r in self.ranks if getattr(r, metric) is not None]
        return {"linear": aurac(points, log2_axis=False), "log2": aurac(points, log2_axis=True)}


def aurac(points: Sequence[tuple[int, float]], log2_axis: bool) -> float | None:
    """Return the area under the rank curve divided by the axis length (trapezoid rule).

    Only ranks >= 1 count, so that both axes use the same points (log2 of rank 0 is undefined). A single point
    returns its value; no point returns None.
    """
    curve = sorted((rank, value) for rank, value in points if rank >= 1)
    if not curve:
        return None
    if len(curve) == 1:
        return float(curve[0][1])
    xs = [math.log2(rank) if log2_axis else float(rank) for rank, _ in curve]
    ys = [float(value) for _, value in curve]
    area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


@torch.no_grad()
def answer_loss(
    model: MatryoshkaModel,
    tokenizer,
    examples: Sequence[Example],
    rank: int,
    inference_rule: str | None = None,
    batch_size: int = 16,
    max_length: int = 512,
) -> tuple[float, int]:
    """Return the mean NLL of the answer tokens given the prompt at ``rank``, and the number of answer tokens.

    The LM head runs only on positions that predict an answer token, which saves most of the vocabulary work.
    """
    decoder = model.base_model.get_decoder()
    lm_head = model.base_model.get_output_embeddings()
    tokenized = sorted((tokenize_example(e, tokenizer, max_length) for e in examples), key=lambda t: len(t.input_ids))
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(tokenized), batch_size):
        batch = collate(tokenized[start:start + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with model.at_rank(rank, inference_rule):
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        targets = batch["labels"][:, 1:]                      # position t predicts token t + 1
        predicting = targets != IGNORE_INDEX
        logits = lm_head(hidden[:, :-1][predicting]).float()  # [answer tokens, vocab]
        total_nll += F.cross_entropy(logits, targets[predicting], reduction="sum").item()
        total_tokens += int(predicting.sum())
    return total_nll / max(total_tokens, 1), total_tokens


@torch.no_grad()
def greedy_accuracy(
    model: MatryoshkaModel,
    tokenizer,
    examples: Sequence[Example],
    rank: int,
    inference_rule: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 256,
) -> tuple[float, list[str]]:
    """Return the exact-match accuracy of greedy answers at ``rank`` and the generated texts."""
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts: list[str] = [""] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    try:
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            encoded = tokenizer([examples[i].prompt for i in indices], return_tensors="pt", padding=True)
            encoded = {k: v.to(model.device) for k, v in encoded.items()}
            with model.at_rank(rank, inference_rule):
                output = model.base_model.generate(
                    **encoded, max_new_tokens=max_new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )
            new_tokens = output[:, encoded["input_ids"].shape[1]:]
            for i, row in zip(indices, new_tokens):
                texts[i] = tokenizer.decode(row, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    correct = sum(answers_match(extract_answer(text), e.reference) for text, e in zip(texts, examples))
    return correct / len(examples), texts


@torch.no_grad()
def accuracy_at_ranks(
    model: MatryoshkaModel,
    tokenizer,
    examples: Sequence[Example],
    ranks: Sequence[int],
    inference_rule: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 256,
) -> dict[int, tuple[float, list[str], int]]:
    """Return, per rank, the exact-match accuracy of greedy answers, the generated texts and their token count.

    Every (question, rank) pair runs through the serving engine in one continuous batch of up to ``batch_size``
    rows. A row that reaches end-of-sequence leaves at once, and rows of different ranks share each forward. That
    costs the tokens actually generated, where ``greedy_accuracy`` runs every batch to its longest answer.
    """
    # The engine is in the server package, which imports this package, so it is imported here and not at the top.
    from matlora_server.engine.offline import generate_offline
    from matlora_server.engine.request import SamplingParams

    ranks = list(dict.fromkeys(ranks))
    for rank in ranks:
        model._check_rank(rank)
    prompts = [e.prompt for _ in ranks for e in examples]
    row_ranks = [rank for rank in ranks for _ in examples]
    outputs = generate_offline(model, tokenizer, prompts, row_ranks, SamplingParams(max_tokens=max_new_tokens),
                               max_num_seqs=batch_size, inference_rule=inference_rule)
    results = {}
    for position, rank in enumerate(ranks):
        rank_outputs = outputs[position * len(examples):(position + 1) * len(examples)]
        texts = [output.text for output in rank_outputs]
        correct = sum(answers_match(extract_answer(t), e.reference) for t, e in zip(texts, examples))
        results[rank] = (correct / len(examples), texts, sum(output.num_tokens for output in rank_outputs))
    return results


def evaluate_curve(
    model: MatryoshkaModel,
    tokenizer,
    examples: Sequence[Example],
    ranks: Sequence[int],
    label: str,
    adapter: str,
    inference_rule: str | None = None,
    metrics: Sequence[str] = ("loss", "accuracy"),
    batch_size: int = 16,
    max_new_tokens: int = 256,
    base_results: dict[int, RankResult] | None = None,
) -> CurveResult:
    """Evaluate one adapter at every rank in ``ranks`` under one inference rule.

    ``base_results``, when given, caches the rank-0 result: rank 0 is the base model alone, the same for every
    adapter and rule on the same base model and data. Accuracy runs once for all ranks (``accuracy_at_ranks``);
    each rank's ``seconds`` then contains its loss time plus its share of that run, in proportion to the tokens it
    generated.
    """
    rule = inference_rule or model.config.inference_rule
    curve = CurveResult(label=label, adapter=adapter, inference_rule=rule)
    cached = {0: base_results[0]} if base_results is not None and 0 in base_results else {}
    results = {rank: RankResult(rank=rank) for rank in ranks if rank not in cached}

    for result in results.values():
        if "loss" in metrics:
            started = time.perf_counter()
            result.answer_loss, result.answer_tokens = answer_loss(model, tokenizer, examples, result.rank, rule,
                                                                   batch_size)
            result.seconds = time.perf_counter() - started
    if "accuracy" in metrics and results:
        started = time.perf_counter()
        accuracies = accuracy_at_ranks(model, tokenizer, examples, list(results), rule, batch_size, max_new_tokens)
        seconds = time.perf_counter() - started
        total = max(sum(tokens for _, _, tokens in accuracies.values()), 1)
        for rank, (accuracy, _, tokens) in accuracies.items():
            results[rank].accuracy = accuracy
            results[rank].seconds += seconds * tokens / total

    for rank in ranks:
        result = cached.get(rank) or results[rank]
        if rank not in cached:
            logger.info("%s, rule %s, rank %d: loss %s accuracy %s (%.0f s)", label, rule, rank,
                        _fmt(result.answer_loss), _fmt(result.accuracy), result.seconds)
        curve.ranks.append(result)
    if 0 in results and base_results is not None:
        base_results[0] = results[0]
    return curve


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
