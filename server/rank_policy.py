"""Rank choice for a request: explicit, from a latency budget, the default, or lowered under load."""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Sequence

from .engine import RankReason, Request, StepStats

logger = logging.getLogger(__name__)


class RankError(ValueError):
    """A requested rank that the adapter does not offer."""

    def __init__(self, rank: object, offered: Sequence[int]) -> None:
        super().__init__(f"rank {rank!r} is not offered: choose one of {list(offered)}")
        self.rank = rank
        self.offered = list(offered)


class NoLatencyProfileError(ValueError):
    """A latency budget that cannot be served because no offered rank has a measured decode step yet."""


class LatencyProfile:
    """Seconds per decode step by (largest rank in the step, batch size), measured at start-up.

    Every observed decode step updates its entry with an exponential moving average, so predictions follow the
    machine's current speed. Between measured batch sizes the time is interpolated linearly; beyond the largest
    it is extrapolated from the last two.
    """

    def __init__(self, table: dict[tuple[int, int], float], smoothing: float = 0.2) -> None:
        self._table = dict(table)
        self._lock = threading.Lock()
        self.smoothing = smoothing

    def observe(self, max_rank: int, batch_size: int, seconds: float) -> None:
        with self._lock:
            key = (max_rank, batch_size)
            previous = self._table.get(key)
            self._table[key] = seconds if previous is None else previous + self.smoothing * (seconds - previous)

    def predict(self, rank: int, batch_size: int) -> float | None:
        """Return the predicted seconds of a decode step, or None when nothing was measured for ``rank``."""
        with self._lock:
            points = sorted((b, s) for (r, b), s in self._table.items() if r == rank)
        if not points:
            return None
        sizes = [b for b, _ in points]
        if batch_size in sizes:
            return points[sizes.index(batch_size)][1]
        if len(points) == 1:
            return points[0][1]
        index = min(max(bisect.bisect_left(sizes, batch_size), 1), len(points) - 1)
        (b0, s0), (b1, s1) = points[index - 1], points[index]
        return max(0.0, s0 + (s1 - s0) * (batch_size - b0) / (b1 - b0))

    def snapshot(self) -> dict[tuple[int, int], float]:
        with self._lock:
            return dict(self._table)

    def on_step(self, stats: StepStats, engine) -> None:
        if stats.phase == "decode":
            self.observe(stats.max_rank, stats.batch_size, stats.seconds)

    def on_request_finished(self, request: Request) -> None:
        pass


class RankPolicy:
    def __init__(self, offered_ranks: Sequence[int], default_rank: int, profile: LatencyProfile,
                 lower_under_load: bool = False, overload_threshold: int = 8) -> None:
        self.offered = sorted(set(offered_ranks))
        if default_rank not in self.offered:
            raise ValueError(f"default rank {default_rank} is not offered: choose one of {self.offered}")
        self.default_rank = default_rank
        self.profile = profile
        self.lower_under_load = lower_under_load
        self.overload_threshold = overload_threshold
        adapted = [r for r in self.offered if r > 0]
        self.floor = adapted[0] if adapted else 0    # lowering never drops a request to the base model

    def choose(self, rank: int | None, latency_budget_ms: float | None, running: int,
               running_max_rank: int) -> tuple[int, RankReason]:
        """Return the rank for a new request and why, given the batch it will join."""
        if rank is not None:
            if rank not in self.offered:
                raise RankError(rank, self.offered)
            return rank, RankReason.EXPLICIT
        if latency_budget_ms is not None:
            return self.choose_for_budget(latency_budget_ms, running, running_max_rank)
        return self.default_rank, RankReason.DEFAULT

    def choose_for_budget(self, latency_budget_ms: float, running: int, running_max_rank: int
                          ) -> tuple[int, RankReason]:
        """Return the largest offered rank predicted to fit the budget, or the smallest offered rank if none fits.

        Ranks without a prediction are skipped. The smallest offered rank is 0, the base model, whenever the
        adapter offers 0, unlike lowering under load, which stops at the smallest adapter rank.

        Raises NoLatencyProfileError when no offered rank has a prediction, as after ``--profile-steps 0``.
        """
        predicted = {}
        for candidate in self.offered:
            seconds = self.predict_time_per_token(candidate, running, running_max_rank)
            if seconds is not None:
                predicted[candidate] = seconds
        if not predicted:
            raise NoLatencyProfileError(
                "no latency measurements yet for any offered rank, so no rank can be chosen for a budget: send "
                "rank instead, or start the server with --profile-steps above 0")
        fitting = [rank for rank, seconds in predicted.items() if seconds * 1000 <= latency_budget_ms]
        if fitting:
            return max(fitting), RankReason.LATENCY_BUDGET
        return self.offered[0], RankReason.BUDGET_UNMET

    def predict_time_per_token(self, rank: int, running: int, running_max_rank: int) -> float | None:
        """Predict seconds per output token at ``rank`` when joining ``running`` sequences.

        A decode step computes the adapter up to the largest rank in the batch, so the step time depends on
        max(rank, the running batch's largest rank).
        """
        return self.profile.predict(max(rank, running_max_rank), running + 1)

    def lower_if_overloaded(self, request: Request, waiting: int) -> None:
        """Admission hook: lower a request without a fixed rank by one offered rank per threshold of waiting."""
        if not self.lower_under_load or request.fixed_rank or waiting <= self.overload_threshold:
            return
        steps = waiting // self.overload_threshold
        allowed = [r for r in self.offered if self.floor <= r <= request.rank]
        if not allowed or request.rank not in allowed:
            return
        lowered = allowed[max(0, allowed.index(request.rank) - steps)]
        if lowered < request.rank:
            request.requested_rank = request.rank
            request.rank = lowered
            request.rank_reason = RankReason.LOWERED
