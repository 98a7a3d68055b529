"""What the engine reports to its observers after each forward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .request import Request

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class StepStats:
    """Statistics of one forward of a step, for metrics and the latency profile."""

    phase: str                          # "prefill" or "decode"
    seconds: float
    batch_size: int
    ranks: list[int]                    # rank of each row
    max_rank: int
    prompt_tokens: dict[int, int] = field(default_factory=dict)      # rank -> prompt tokens prefilled
    generated_tokens: dict[int, int] = field(default_factory=dict)   # rank -> tokens produced in this forward


def tokens_by_rank(requests: list[Request]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for request in requests:
        counts[request.rank] = counts.get(request.rank, 0) + request.num_prompt_tokens
    return counts


class EngineObserver(Protocol):
    def on_step(self, stats: StepStats, engine: "Engine") -> None: ...
    def on_request_finished(self, request: Request) -> None: ...
