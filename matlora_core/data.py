"""Prompt/completion data from JSON Lines, tokenized with the prompt masked out of the loss.

Each line is an object with ``question`` and ``answer`` (GSM8K's form) or ``prompt`` and ``completion``. A question
becomes a prompt through the adapter's prompt format, ``"Question: {question}\\nAnswer: "`` by default.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
ANSWER_PATTERN = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)")


class DataFormatError(ValueError):
    """A data line that is not valid; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    reference: str | None = None   # the final answer after '####', when the completion has one


KEY_PAIRS = (("question", "answer"), ("prompt", "completion"))


def parse_example(record: object, prompt_format: str) -> Example:
    """Turn one decoded JSON line into an Example; raise ValueError saying what is wrong.

    The first complete key pair is used, question/answer before prompt/completion, and other keys are ignored. A
    line with neither pair complete is rejected, and the message names the missing keys of each pair it started.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    keys = next((pair for pair in KEY_PAIRS if all(key in record for key in pair)), None)
    if keys is None:
        started = [pair for pair in KEY_PAIRS if any(key in record for key in pair)]
        if not started:
            raise ValueError(f"expected keys question/answer or prompt/completion, got {sorted(record)}")
        missing = " or ".join(f"key {key!r}" for pair in started for key in pair if key not in record)
        if len(started) > 1:
            raise ValueError(f"missing {missing}: a line needs both keys of question/answer or of prompt/completion")
        raise ValueError(f"missing {missing}")

    for key in keys:
        if not isinstance(record[key], str):
            raise ValueError(f"key {key!r} must be a string, got {type(record[key]).__name__}")
        if not record[key].strip():
            raise ValueError(f"key {key!r} is empty")

    if keys[0] == "question":
        prompt = prompt_format.format(question=record["question"])
        completion = record["answer"]
    else:
        prompt, completion = record["prompt"], record["completion"]
    return Example(prompt=prompt, completion=completion, reference=extract_answer(completion))


def load_examples(path: str | os.PathLike, prompt_format: str, limit: int | None = None) -> list[Example]:
    """Read a JSON Lines file, or its first ``limit`` examples when given.

    A malformed line raises DataFormatError with the file name and line number.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"invalid limit {limit}: it must be an integer >= 1, or None for the whole file")
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    examples = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataFormatError(f"{path}:{number}: invalid UTF-8 at byte {error.start}") from None
            if not line.strip():
                continue
            try:
                # Without its line break, so that an error at the end of the line gets this line's column.
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{number}: invalid JSON: {error.msg} at column {error.colno}") from None
            try:
                examples.append(parse_example(record, prompt_format))
            except ValueError as error:
                raise DataFormatError(f"{path}:{number}: {error}") from None
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise DataFormatError(f"{path}: no examples found")
    return examples


def extract_answer(text: str) -> str | None:
    """Return the number after the last '####' in ``text``, without thousands separators, or None."""
    matches = ANSWER_PATTERN.findall(text)
    return matches[-1].replace(",", "") if matches else None


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Compare two extracted answers as numbers."""
    if predicted is None or reference is None:
        return False
    try:
        return math.isclose(float(predicted), float(reference), rel_tol=0.0, abs_tol=1e-6)
    except ValueError:
        return False


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]      # IGNORE_INDEX on prompt tokens, so only the completion counts in the loss


def tokenize_example(example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int) -> TokenizedExample:
    """Tokenize prompt and completion separately so the loss mask falls exactly on the completion.

    The completion ends with the end-of-sequence token. Examples longer than ``max_length`` are cut from the end.
    """
    prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return TokenizedExample(input_ids=input_ids, labels=labels)


def collate(batch: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into input_ids, attention_mask and labels tensors."""
    length = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
