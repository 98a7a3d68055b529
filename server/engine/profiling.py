"""Start-up timing of decode steps per rank and batch size, the seed of the latency profile."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from .engine import Engine

logger = logging.getLogger(__name__)


def measure_decode_steps(engine: Engine, ranks: Sequence[int], batch_sizes: Sequence[int], steps: int = 3,
                         context_tokens: int = 64) -> dict[tuple[int, int], float]:
    """Return the median seconds of a decode step for each (rank, batch size), before the engine starts.

    Each measurement prefills ``batch_size`` synthetic rows of ``context_tokens`` tokens, runs one untimed decode
    step, then times ``steps`` more. The cache is cleared afterwards.
    """
    if engine.started:
        raise RuntimeError("measure the latency profile before the engine thread starts")
    cache, runner = engine.cache, engine.runner
    context_tokens = min(context_tokens, engine.config.max_model_len - steps - 2)
    cache.ensure_capacity(context_tokens + steps + 2)
    token = engine.tokenizer.eos_token_id or 0
    table: dict[tuple[int, int], float] = {}
    started = time.perf_counter()
    for batch_size in batch_sizes:
        for rank in ranks:
            runner.prefill(0, [[token] * context_tokens] * batch_size, [rank] * batch_size)
            runner.decode([token] * batch_size, [rank] * batch_size)
            timings = []
            for _ in range(steps):
                begin = time.perf_counter()
                runner.decode([token] * batch_size, [rank] * batch_size)
                timings.append(time.perf_counter() - begin)
            timings.sort()
            table[(rank, batch_size)] = timings[len(timings) // 2]
            for slot in range(batch_size):
                cache.lengths[slot] = 0
    logger.info("latency profile: %d ranks x batch sizes %s in %.1f s; %s", len(ranks), list(batch_sizes),
                time.perf_counter() - started,
                ", ".join(f"r{r}/b{b}={s * 1000:.1f}ms" for (r, b), s in sorted(table.items())))
    return table
