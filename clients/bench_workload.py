"""Workload of ``matlora-bench``: prompts from a JSON Lines file or a built-in list, and a rank per request."""

from __future__ import annotations

import json
import logging
import random
import string
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# The adapter's default prompt format for GSM8K-style questions (matlora_core.data). `prompt` fields are sent as is.
DEFAULT_PROMPT_FORMAT = "Question: {question}\nAnswer: "

BUILTIN_QUESTIONS = [
    "A baker makes 24 rolls in the morning and 18 in the afternoon. She sells 35. How many rolls are left?",
    "Sam reads 12 pages a day. How many days does he need for a book of 150 pages?",
    "A bus carries 40 people. At the first stop 13 get off and 7 get on. How many people are on the bus now?",
    "Lena buys 3 notebooks at $4 each and a pen for $2. She pays with a $20 bill. How much change does she get?",
    "A garden has 6 rows of 9 tomato plants. Each plant gives 4 tomatoes. How many tomatoes are there in all?",
    "A train leaves at 9:15 and arrives at 11:50. How many minutes does the trip take?",
    "Omar saves $15 a week. How many weeks until he can buy a bike that costs $180?",
    "A class of 28 students splits into teams of 4. Each team needs 3 markers. How many markers are needed?",
]


@dataclass(frozen=True)
class WorkItem:
    index: int
    prompt: str
    rank: int | None               # None: no rank is sent
    latency_budget_ms: float | None


def load_prompts(path: str | Path, prompt_format: str = DEFAULT_PROMPT_FORMAT) -> list[str]:
    """Read prompts from JSON Lines: each object's ``prompt`` as is, or its ``question`` through ``prompt_format``.

    Raises ValueError naming the file and line of the first line that has neither field as a non-empty string.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts {path}: file not found")
    prompts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                prompts.append(prompt_of(line, prompt_format, f"{path}:{number}"))
    if not prompts:
        raise ValueError(f"--prompts {path}: the file has no prompts")
    return prompts


def prompt_of(line: str, prompt_format: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: invalid JSON: {error.msg} at column {error.colno}") from None
    if isinstance(record, dict):
        if isinstance(record.get("prompt"), str) and record["prompt"].strip():
            return record["prompt"]
        if isinstance(record.get("question"), str) and record["question"].strip():
            return prompt_format.format(question=record["question"])
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where}: expected an object with a non-empty string 'prompt' or 'question', got {keys}")


def check_prompt_format(prompt_format: str) -> None:
    """Raise ValueError unless ``prompt_format`` is a format string whose one placeholder is {question}."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(prompt_format) if field is not None]
    except ValueError as error:
        raise ValueError(f"--prompt-format {prompt_format!r}: {error}; write a literal brace as {{{{ or }}}}") from None
    unknown = sorted({"{" + field + "}" for field in fields if field != "question"})
    if unknown:
        raise ValueError(f"--prompt-format {prompt_format!r}: unknown placeholder(s) {', '.join(unknown)}; the only "
                         "placeholder is {question}, and a literal brace is written {{ or }}")
    if not fields:
        raise ValueError(f"--prompt-format {prompt_format!r} has no {{question}} placeholder, so every prompt "
                         "would be the same")
    try:
        prompt_format.format(question="?")
    except ValueError as error:     # a format spec that does not apply to text, as in {question:d}
        raise ValueError(f"--prompt-format {prompt_format!r}: {error}") from None


def builtin_prompts(prompt_format: str = DEFAULT_PROMPT_FORMAT) -> list[str]:
    return [prompt_format.format(question=question) for question in BUILTIN_QUESTIONS]


def parse_rank_mix(spec: str) -> dict[int, float]:
    """Parse ``"4:0.5,16:0.3,64:0.2"`` into {rank: weight}, with the weights normalised to sum to 1."""
    mix: dict[int, float] = {}
    for part in spec.split(","):
        rank_text, separator, weight_text = part.strip().partition(":")
        try:
            rank, weight = int(rank_text), float(weight_text)
        except ValueError:
            raise ValueError(f"--rank-mix: invalid entry {part.strip()!r}, expected RANK:WEIGHT as in "
                             "4:0.5,16:0.5") from None
        if not separator or rank < 0 or not weight >= 0:
            raise ValueError(f"--rank-mix: invalid entry {part.strip()!r}: the rank must be 0 or more and the "
                             "weight a number 0 or more")
        if rank in mix:
            raise ValueError(f"--rank-mix: rank {rank} is listed twice")
        mix[rank] = weight
    total = sum(mix.values())
    if total <= 0:
        raise ValueError(f"--rank-mix: the weights of {spec!r} sum to 0, so give at least one positive weight")
    return {rank: weight / total for rank, weight in mix.items()}


class Workload:
    """Builds the n-th request: prompts in file order (cycling), ranks drawn from the mix by a seeded RNG."""

    def __init__(self, prompts: list[str], rank_mix: dict[int, float] | None = None,
                 latency_budget_ms: float | None = None, seed: int = 0) -> None:
        if not prompts:
            raise ValueError("the workload needs at least one prompt")
        if rank_mix and latency_budget_ms is not None:
            raise ValueError("give a rank mix or a latency budget, not both")
        self.prompts = prompts
        self.rank_mix = rank_mix
        self.latency_budget_ms = latency_budget_ms
        self._random = random.Random(seed)

    def item(self, index: int) -> WorkItem:
        """Return request ``index``. Call it with increasing indices so that the seeded ranks repeat run to run."""
        rank = None
        if self.rank_mix:
            ranks = list(self.rank_mix)
            rank = self._random.choices(ranks, weights=[self.rank_mix[r] for r in ranks])[0]
        return WorkItem(index=index, prompt=self.prompts[index % len(self.prompts)], rank=rank,
                        latency_budget_ms=self.latency_budget_ms)

    def with_rank(self, rank: int) -> Workload:
        """Return the same prompts with every request at ``rank``."""
        return Workload(self.prompts, rank_mix={rank: 1.0})
