"""The rank sweep of ``matlora-bench``: one run per offered rank at the same load, a plot and a markdown table.

The plot puts rank on a log2 x axis against median TPOT (top) and output throughput (bottom), with the
adapter's measured quality from /v1/ranks on a second y axis. Rank 0 (the base model) has no place on a log
axis, so it is drawn as a separate marker one octave left of the smallest adapter rank, behind a dotted line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matlora_server.api.schemas import RanksResponse

from .bench_load import LoadResult
from .bench_report import shown, summarize

logger = logging.getLogger(__name__)

QUALITY_COLOUR = "tab:gray"


def sweep_rows(results: dict[int, LoadResult], ranks: RanksResponse) -> list[dict[str, Any]]:
    """Return one summary row per swept rank, with the adapter's quality figure at that rank added."""
    profile = {entry.rank: entry for entry in ranks.data}
    rows = []
    for rank in sorted(results):
        result = results[rank]
        row = summarize(result.records, result.duration_s, str(rank))
        entry = profile.get(rank)
        row["quality"] = entry.quality if entry else None
        row["quality_metric"] = entry.quality_metric if entry else None
        rows.append(row)
    return rows


def quality_metric_of(rows: Sequence[dict[str, Any]]) -> str | None:
    return next((row["quality_metric"] for row in rows if row.get("quality_metric")), None)


def sweep_markdown(rows: Sequence[dict[str, Any]]) -> str:
    metric = quality_metric_of(rows)
    header = ["rank", f"quality ({metric})" if metric else "quality", "requests", "errors", "output tok/s",
              "TTFT p50 (ms)", "TPOT p50 (ms)", "TPOT p95 (ms)", "e2e p50 (ms)", "e2e p95 (ms)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for row in rows:
        quality = "-" if row.get("quality") is None else f"{row['quality']:.4g}"
        cells = [row["rank"] + (" (base)" if row["rank"] == "0" else ""), quality, shown(row["requests"]),
                 shown(row["errors"]), shown(row["output_tokens_per_s"]), shown(row["ttft_ms_p50"]),
                 shown(row["tpot_ms_p50"], 2), shown(row["tpot_ms_p95"], 2), shown(row["e2e_ms_p50"]),
                 shown(row["e2e_ms_p95"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def x_positions(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, float], float]:
    """Return the x position of each rank label, and that of rank 0 (one octave left of the smallest rank)."""
    adapter_ranks = [int(row["rank"]) for row in rows if int(row["rank"]) > 0]
    base_x = min(adapter_ranks) / 2 if adapter_ranks else 1.0
    positions = {row["rank"]: (float(row["rank"]) if int(row["rank"]) > 0 else base_x) for row in rows}
    return positions, base_x


def draw_series(axis, rows, positions, field: str, colour: str, marker: str, style: str = "-") -> None:
    """Draw ``field`` over the adapter ranks as a line, and rank 0 as a lone hollow marker of the same colour."""
    measured = [row for row in rows if row.get(field) is not None]
    adapted = [(positions[row["rank"]], row[field]) for row in measured if row["rank"] != "0"]
    base = [(positions[row["rank"]], row[field]) for row in measured if row["rank"] == "0"]
    if adapted:
        axis.plot(*zip(*adapted), style, marker=marker, color=colour)
    if base:
        axis.plot(*zip(*base), linestyle="none", marker=marker, color=colour, markerfacecolor="white", markersize=8)


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Write the trade-off plot as a PNG, which needs matplotlib (the ``plots`` extra)."""
    from matplotlib.figure import Figure  # a Figure without pyplot leaves the caller's backend alone

    positions, base_x = x_positions(rows)
    metric = quality_metric_of(rows)
    figure = Figure(figsize=(7.5, 7))
    top, bottom = figure.subplots(2, 1, sharex=True)
    panels = ((top, "tpot_ms_p50", "TPOT p50 (ms/token)", "tab:blue"),
              (bottom, "output_tokens_per_s", "output tokens/s", "tab:green"))
    for axis, field, label, colour in panels:
        draw_series(axis, rows, positions, field, colour, "o")
        axis.set_ylabel(label, color=colour)
        axis.grid(True, which="major", alpha=0.3)
        if any(row.get("quality") is not None for row in rows):
            quality_axis = axis.twinx()
            draw_series(quality_axis, rows, positions, "quality", QUALITY_COLOUR, "s", style="--")
            quality_axis.set_ylabel(f"quality ({metric})" if metric else "quality", color=QUALITY_COLOUR)

    bottom.set_xscale("log", base=2)
    ticks = sorted(positions.values())
    bottom.set_xticks(ticks)
    bottom.set_xticklabels(["0\n(base)" if x == base_x and "0" in positions else str(int(x)) for x in ticks])
    bottom.set_xlabel("adapter rank (log2 axis)")
    if "0" in positions and len(positions) > 1:
        for axis in (top, bottom):
            axis.axvline(base_x * 2 ** 0.5, color="black", linestyle=":", linewidth=1)
    top.set_title(title + ("\nhollow markers: rank 0 (base model)" if "0" in positions else ""), fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    logger.info("wrote %s", path)
