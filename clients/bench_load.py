"""The two load shapes of ``matlora-bench``.

Closed loop: a fixed number of workers, each sending its next request as soon as the previous one ends.
Open loop: requests start at Poisson arrival times, whatever the server's speed, so queueing shows up in the
latencies. Both stop starting requests after the duration or the request count, whichever comes first, and
then wait for the requests in flight.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Protocol

from tqdm import tqdm

from .bench_targets import RequestRecord
from .bench_workload import WorkItem, Workload

logger = logging.getLogger(__name__)


class Target(Protocol):
    async def send(self, item: WorkItem, record: RequestRecord) -> None: ...


@dataclass(frozen=True)
class StopRule:
    duration_s: float | None = None
    num_requests: int | None = None

    def __post_init__(self) -> None:
        if self.duration_s is None and self.num_requests is None:
            raise ValueError("give --duration or --num-requests (or both) so that the run ends")

    def admits(self, started: int, elapsed_s: float) -> bool:
        """Return whether request number ``started`` (0-based) may start ``elapsed_s`` into the run."""
        if self.num_requests is not None and started >= self.num_requests:
            return False
        return self.duration_s is None or elapsed_s < self.duration_s


@dataclass
class LoadResult:
    records: list[RequestRecord]
    duration_s: float   # from the start of the run to the end of its last request


class Run:
    """State shared by the workers of one run: the request counter, the records and the progress bar."""

    def __init__(self, target: Target, workload: Workload, stop: StopRule, progress: bool) -> None:
        self.target = target
        self.workload = workload
        self.stop = stop
        self.records: list[RequestRecord] = []
        self.started = 0
        self.errors = 0
        self.logged_statuses: set[int | None] = set()
        self.start_time = time.perf_counter()
        self.bar = tqdm(total=stop.num_requests, unit="req", disable=not progress, dynamic_ncols=True, leave=False)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def next_item(self) -> WorkItem | None:
        if not self.stop.admits(self.started, self.elapsed()):
            return None
        item = self.workload.item(self.started)
        self.started += 1
        return item

    async def send(self, item: WorkItem) -> None:
        record = RequestRecord(index=item.index, requested_rank=item.rank, start_s=self.elapsed())
        await self.target.send(item, record)
        self.records.append(record)
        if not record.ok:
            self.errors += 1
            self.log_failure(record)
        self.bar.update(1)
        self.bar.set_postfix(errors=self.errors, refresh=False)

    def log_failure(self, record: RequestRecord) -> None:
        """Log the first failure of each HTTP status. The JSON output counts all of them."""
        if record.status in self.logged_statuses:
            return
        self.logged_statuses.add(record.status)
        logger.warning("request %d failed: %s (later failures with this status are counted, not logged)",
                       record.index, record.error)

    def result(self) -> LoadResult:
        self.bar.close()
        self.records.sort(key=lambda record: record.index)
        return LoadResult(records=self.records, duration_s=self.elapsed())


async def run_closed_loop(target: Target, workload: Workload, stop: StopRule, concurrency: int,
                          progress: bool = True) -> LoadResult:
    if concurrency < 1:
        raise ValueError(f"--concurrency must be 1 or more, got {concurrency}")
    run = Run(target, workload, stop, progress)

    async def worker() -> None:
        while (item := run.next_item()) is not None:
            await run.send(item)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return run.result()


async def run_open_loop(target: Target, workload: Workload, stop: StopRule, rate: float, seed: int = 0,
                        progress: bool = True) -> LoadResult:
    """Start requests at Poisson arrivals of ``rate`` per second, drawn from an RNG seeded with ``seed``."""
    if not rate > 0:
        raise ValueError(f"--rate must be above 0 requests/s, got {rate}")
    gaps = random.Random(seed)
    run = Run(target, workload, stop, progress)
    tasks = []
    arrival = 0.0
    while run.stop.admits(run.started, arrival):
        wait = arrival - run.elapsed()
        if wait > 0:
            await asyncio.sleep(wait)
        item = run.next_item()
        if item is None:
            break
        tasks.append(asyncio.create_task(run.send(item)))
        arrival += gaps.expovariate(rate)
    await asyncio.gather(*tasks)
    return run.result()
