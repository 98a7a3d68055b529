"""Offline batch generation: run many prompts at many ranks through the engine on the calling thread.

This is the engine without a server. Every (prompt, rank) pair is one request, and all of them share the running
batch. A finished row frees its slot for the next waiting request at once. ``matlora eval`` measures greedy
accuracy this way, at all ranks of an adapter in one run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from matlora_core import MatryoshkaModel

from .engine import Engine
from .request import FinishReason, RankReason, Request, RequestOutput, SamplingParams
from .scheduler import SchedulerConfig

logger = logging.getLogger(__name__)

PROGRESS_SECONDS = 60.0      # interval of the progress log line during a long run


@dataclass(frozen=True)
class OfflineOutput:
    """The generated text of one (prompt, rank) pair."""

    text: str
    num_tokens: int                    # generated tokens, the end-of-sequence token included
    finish_reason: FinishReason


def generate_offline(
    model: MatryoshkaModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    ranks: Sequence[int],
    sampling: SamplingParams,
    max_num_seqs: int = 32,
    inference_rule: str | None = None,
) -> list[OfflineOutput]:
    """Return the output of each (prompt, rank) pair, in the order given.

    The prompts are tokenized as ``tokenizer(prompt)`` does, special tokens included, so in float32 a greedy row
    gives the tokens that transformers' ``generate`` gives for the same prompt alone.
    """
    if len(prompts) != len(ranks):
        raise ValueError(f"got {len(prompts)} prompts but {len(ranks)} ranks: give one rank per prompt")
    if not prompts:
        return []
    token_ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    longest = max(len(ids) for ids in token_ids) + sampling.max_tokens
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=longest,
                             max_cached_tokens=max_num_seqs * longest, max_prefill_tokens=max(4096, longest),
                             max_waiting=len(prompts))
    engine = Engine(model, tokenizer, config, inference_rule=inference_rule)

    finished: dict[str, Request] = {}

    def collect(output: RequestOutput) -> None:
        if output.finished:
            finished[output.request_id] = output.request

    requests = [Request(request_id=f"offline-{index}", prompt_token_ids=ids, sampling=sampling, rank=rank,
                        rank_reason=RankReason.EXPLICIT, sink=collect, fixed_rank=True)
                for index, (ids, rank) in enumerate(zip(token_ids, ranks))]
    for request in requests:
        engine.submit(request)

    started = last_report = time.perf_counter()
    while not engine.is_idle():
        engine.step()
        if time.perf_counter() - last_report >= PROGRESS_SECONDS:
            last_report = time.perf_counter()
            logger.info("%d of %d requests finished, %.0f s", len(finished), len(requests), last_report - started)
    generated = sum(len(r.output_token_ids) for r in requests)
    seconds = time.perf_counter() - started
    logger.info("generated %d tokens for %d requests in %.1f s (%.1f tokens/s, %d steps)", generated,
                len(requests), seconds, generated / max(seconds, 1e-9), engine.steps)

    outputs = []
    for request in requests:
        done = finished.get(request.request_id)
        if done is None or done.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH):
            reason = done.error if done is not None else "no final output"
            raise RuntimeError(f"offline request {request.request_id} (rank {request.rank}) failed: {reason}")
        text = tokenizer.decode(done.output_token_ids, skip_special_tokens=True)
        outputs.append(OfflineOutput(text, len(done.output_token_ids), done.finish_reason))
    return outputs
