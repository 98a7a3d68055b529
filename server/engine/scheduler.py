"""Waiting and running queues, and admission within the KV cache limits."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .request import Request


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32              # running sequences, one KV cache slot each
    max_model_len: int = 1024           # prompt plus output tokens of one sequence
    max_cached_tokens: int = 16384      # KV cache tokens reserved by all running sequences together
    max_prefill_tokens: int = 4096      # padded prompt tokens in one prefill batch
    max_waiting: int = 256              # waiting requests; beyond this, submissions are rejected
    split_by_rank: bool = False         # admit only requests of the running batch's rank (for comparison runs)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_model_len", "max_cached_tokens", "max_prefill_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid {name}={getattr(self, name)}: must be >= 1")
        if self.max_model_len > self.max_cached_tokens:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds max_cached_tokens={self.max_cached_tokens}: "
                             "a full-length sequence could never be admitted")


# A prefill forward contains prompts whose lengths differ by at most this factor, so padding stays under a fifth of
# its tokens. Each extra forward costs its own pass over the weights.
PREFILL_LENGTH_RATIO = 1.25


def prefill_chunks(lengths: list[int]) -> list[slice]:
    """Split prompts sorted by length into runs whose longest prompt is within PREFILL_LENGTH_RATIO of the shortest."""
    chunks: list[slice] = []
    start = 0
    for index in range(1, len(lengths) + 1):
        if index == len(lengths) or lengths[index] > PREFILL_LENGTH_RATIO * lengths[start]:
            chunks.append(slice(start, index))
            start = index
    return chunks


class QueueFullError(RuntimeError):
    """The waiting queue is at max_waiting; the client should retry later."""


# Called at admission with the request and the number of requests still waiting; may lower the rank in place.
AdmissionHook = Callable[[Request, int], None]


class Scheduler:
    """FCFS admission: a waiting request runs once a slot is free and its reservation fits the token budget.

    A request reserves its prompt plus max_tokens, so a running sequence never runs out of cache and is never
    preempted. ``running[i]`` is the sequence in KV cache slot i.
    """

    def __init__(self, config: SchedulerConfig, admission_hook: AdmissionHook | None = None) -> None:
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.reserved_tokens = 0
        self.admission_hook = admission_hook

    def ensure_room(self, pending: int = 0) -> None:
        """Raise QueueFullError when the waiting requests plus ``pending`` submitted ones reach max_waiting."""
        if len(self.waiting) + pending >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests)")

    def admit(self) -> list[Request]:
        """Move waiting requests into free slots, in arrival order, and return them."""
        admitted: list[Request] = []
        longest_prompt = 0
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if self.config.split_by_rank and self.running and request.rank != self.running[0].rank:
                break
            if self.reserved_tokens + request.num_reserved_tokens > self.config.max_cached_tokens:
                break
            longest_prompt = max(longest_prompt, request.num_prompt_tokens)
            if admitted and longest_prompt * (len(admitted) + 1) > self.config.max_prefill_tokens:
                break
            self.waiting.popleft()
            if self.admission_hook is not None:
                self.admission_hook(request, len(self.waiting))
            self.reserved_tokens += request.num_reserved_tokens
            self.running.append(request)
            admitted.append(request)
        # A prefill forward pads every prompt to its longest one. Sorted by length, the newcomers split into
        # forwards of similar lengths (see prefill_chunks).
        admitted.sort(key=lambda r: r.num_prompt_tokens)
        self.running[len(self.running) - len(admitted):] = admitted
        return admitted

    def remove_finished(self, move_slot: Callable[[int, int], None]) -> list[Request]:
        """Drop finished sequences, moving the last running row into each freed slot; return the finished ones."""
        finished = []
        row = 0
        while row < len(self.running):
            request = self.running[row]
            if not request.finished:
                row += 1
                continue
            finished.append(request)
            self.reserved_tokens -= request.num_reserved_tokens
            last = len(self.running) - 1
            if row != last:
                move_slot(last, row)
                self.running[row] = self.running[last]
            self.running.pop()
        return finished

    def kv_cache_usage(self) -> float:
        """Return the reserved share of max_cached_tokens, from 0 to 1."""
        return self.reserved_tokens / self.config.max_cached_tokens
