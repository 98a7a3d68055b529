"""A generation request as the engine sees it, and the outputs it streams back."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class RankReason(str, enum.Enum):
    """Why a request runs at its rank."""

    EXPLICIT = "explicit"              # the request named the rank
    LATENCY_BUDGET = "latency_budget"  # the largest rank whose predicted time per output token fits the budget
    BUDGET_UNMET = "budget_unmet"      # no rank fits the budget, so the smallest offered rank is used
    DEFAULT = "default"                # the server's default rank
    LOWERED = "lowered_under_load"     # lowered at admission because too many requests were waiting


class FinishReason(str, enum.Enum):
    STOP = "stop"              # end-of-sequence token or a stop string
    LENGTH = "length"          # max_tokens reached
    CANCELLED = "cancelled"    # the client went away or the request was cancelled
    TIMEOUT = "timeout"        # the per-request deadline passed
    ERROR = "error"            # the computation failed for this request


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0           # 0 means greedy decoding
    top_p: float = 1.0
    top_k: int = 0                     # 0 disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class RequestOutput:
    """One event of a request: new text, or the final summary when ``finished`` is set."""

    request_id: str
    text: str                          # text added since the previous event
    token_ids: list[int]
    rank: int = 0
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    request: "Request | None" = None   # the request itself, for its rank, usage and timings


@dataclass
class Request:
    """One sequence: its prompt, rank, sampling options and the state the engine keeps while it runs."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    rank: int
    rank_reason: RankReason
    sink: Callable[[RequestOutput], None]      # receives every output event; called from the engine thread
    fixed_rank: bool = False                   # True when the client named the rank, so it is never lowered
    deadline: float | None = None              # time.monotonic() after which the request times out
    requested_rank: int | None = None          # the rank before any lowering under load

    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    output_token_ids: list[int] = field(default_factory=list)
    output_text: str = ""                      # decoded text, cut at a stop string once one is found
    sent_chars: int = 0                        # how much of output_text has been sent to the sink
    finish_reason: FinishReason | None = None
    error: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_reserved_tokens(self) -> int:
        """KV cache tokens this request may need: its prompt plus every token it may generate."""
        return self.num_prompt_tokens + self.sampling.max_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def timings(self) -> dict[str, float | None]:
        """Return queue time, time to first token, mean time per output token and end-to-end latency, in seconds."""
        def between(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else end - start

        tokens_after_first = len(self.output_token_ids) - 1
        per_token = None
        if tokens_after_first > 0 and self.first_token_time and self.finish_time:
            per_token = (self.finish_time - self.first_token_time) / tokens_after_first
        return {
            "queue_seconds": between(self.arrival_time, self.scheduled_time),
            "time_to_first_token_seconds": between(self.arrival_time, self.first_token_time),
            "time_per_output_token_seconds": per_token,
            "e2e_seconds": between(self.arrival_time, self.finish_time),
        }
