"""Summaries of a ``matlora-bench`` run: per-rank rows of counts, throughput and latency percentiles.

A request is grouped under the rank the server reports having served. A failed request, or one sent to a
server that reports no rank, goes under the rank it asked for, or under "-" when it asked for none.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .bench_targets import RequestRecord

logger = logging.getLogger(__name__)

PERCENTILES = (50, 95, 99)
LATENCIES = (("ttft", "ttft_s"), ("tpot", "tpot_s"), ("e2e", "e2e_s"))
NO_RANK = "-"
ALL = "all"


def percentile(values: Sequence[float], q: float) -> float | None:
    """Return the q-th percentile (0 to 100), interpolated linearly between the closest ranks, or None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rank_label(record: RequestRecord) -> str:
    rank = record.rank if record.rank is not None else record.requested_rank
    return NO_RANK if rank is None else str(rank)


def summarize(records: Sequence[RequestRecord], duration_s: float, label: str) -> dict[str, Any]:
    """Return one summary row. Rates divide by the whole run's ``duration_s``, so per-rank rates add up."""
    done = [record for record in records if record.ok]
    tokens = sum(record.output_tokens for record in done)
    row: dict[str, Any] = {
        "rank": label, "requests": len(records), "errors": len(records) - len(done), "output_tokens": tokens,
        "requests_per_s": round(len(done) / duration_s, 4) if duration_s > 0 else None,
        "output_tokens_per_s": round(tokens / duration_s, 3) if duration_s > 0 else None,
    }
    for name, field in LATENCIES:
        values = [getattr(record, field) for record in done if getattr(record, field) is not None]
        for q in PERCENTILES:
            value = percentile(values, q)
            row[f"{name}_ms_p{q}"] = None if value is None else round(value * 1000, 3)
    return row


def sort_key(label: str) -> tuple[int, int]:
    if label.isdigit():
        return 0, int(label)
    return (1, 0) if label == NO_RANK else (2, 0)


def summary_rows(records: Sequence[RequestRecord], duration_s: float) -> list[dict[str, Any]]:
    """Return one row per rank, in rank order, then the row of all requests."""
    groups: dict[str, list[RequestRecord]] = {}
    for record in records:
        groups.setdefault(rank_label(record), []).append(record)
    rows = [summarize(groups[label], duration_s, label) for label in sorted(groups, key=sort_key)]
    rows.append(summarize(records, duration_s, ALL))
    return rows


def error_counts(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Count failed requests by HTTP status. The key "connection" counts those that got no HTTP response."""
    counts = Counter(str(record.status) if record.status is not None else "connection"
                     for record in records if not record.ok)
    return dict(sorted(counts.items()))


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_json(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def shown(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Return the console summary: counts, tokens/s and the p50/p99 of each latency, in ms."""
    header = ["rank", "requests", "errors", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
              "e2e p50", "e2e p99"]
    lines = [header]
    for row in rows:
        lines.append([row["rank"], shown(row["requests"]), shown(row["errors"]), shown(row["output_tokens_per_s"]),
                      shown(row["ttft_ms_p50"]), shown(row["ttft_ms_p99"]), shown(row["tpot_ms_p50"], 2),
                      shown(row["tpot_ms_p99"], 2), shown(row["e2e_ms_p50"]), shown(row["e2e_ms_p99"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines]
    return "\n".join(text) + "\n(latencies in ms, tok/s: output tokens per second of the whole run)"
