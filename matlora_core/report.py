"""Evaluation output: a terminal table, a JSON file and a PNG of the rank curves."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .evaluate import CurveResult

logger = logging.getLogger(__name__)


def format_table(curves: Sequence[CurveResult]) -> str:
    """Return one row per (adapter, rule, rank), then the AURAC of each curve and metric, in aligned columns."""
    rows = [["adapter", "rule", "rank", "loss", "accuracy"]]
    for curve in curves:
        for result in curve.ranks:
            rows.append([curve.label, curve.inference_rule, str(result.rank), _fmt(result.answer_loss),
                         _fmt(result.accuracy)])
    areas = [["adapter", "rule", "metric", "AURAC linear", "AURAC log2"]]
    for curve in curves:
        for metric in ("answer_loss", "accuracy"):
            area = curve.aurac(metric)
            if area["linear"] is not None:
                areas.append([curve.label, curve.inference_rule, metric, _fmt(area["linear"]), _fmt(area["log2"])])
    return "\n".join([*align_columns(rows, right={2, 3, 4}), "", *align_columns(areas, right={3, 4})])


def align_columns(rows: list[list[str]], right: set[int]) -> list[str]:
    """Pad every cell to its column's widest cell; the columns in ``right`` are right-aligned (numbers)."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(width) if column in right else cell.ljust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def curves_to_json(curves: Sequence[CurveResult], meta: dict) -> dict:
    return {
        **meta,
        "curves": [
            {
                "label": c.label,
                "adapter": c.adapter,
                "inference_rule": c.inference_rule,
                "ranks": [asdict(r) for r in c.ranks],
                "aurac": {"answer_loss": c.aurac("answer_loss"), "accuracy": c.aurac("accuracy")},
            }
            for c in curves
        ],
    }


def write_json(curves: Sequence[CurveResult], path: str | os.PathLike, meta: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(curves_to_json(curves, meta), indent=2) + "\n", encoding="utf-8")


def metric_values(curve: CurveResult, metric: str) -> list[float]:
    return [getattr(r, metric) for r in curve.ranks if getattr(r, metric) is not None]


def set_value_limits(axis, metric: str, values: Sequence[float]) -> None:
    """Fix the value axis so that flat curves keep a readable scale.

    Accuracy always spans 0..1, and the loss axis spans at least 0.1 nats around its values. Left to autoscale, values
    that differ only by float noise get a range almost zero wide, labelled with an offset and a factor like 1e-12.
    """
    if metric == "accuracy":
        axis.set_ylim(-0.02, 1.02)
        return
    low, high = min(values), max(values)
    margin = max(0.05 * (high - low), 0.05)    # at least 0.05 nats on each side
    axis.set_ylim(low - margin, high + margin)
    axis.ticklabel_format(axis="y", useOffset=False)


def plot_curves(curves: Sequence[CurveResult], path: str | os.PathLike, title: str = "") -> None:
    """Write a PNG of loss and accuracy against rank (see draw_curves) to ``path``."""
    figure = draw_curves(curves, title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(figure)
    logger.info("wrote %s", path)


def draw_curves(curves: Sequence[CurveResult], title: str = ""):
    """Return a matplotlib figure of loss and accuracy against rank (log2 axis), one line per curve.

    Rank 0 has no place on a log2 axis, so it is drawn as a dotted level in the colour of its curve.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("the rank-curve plot needs matplotlib: pip install 'matlora[plots]'") from error

    metrics = [m for m in ("answer_loss", "accuracy") if any(getattr(r, m) is not None for c in curves for r in c.ranks)]
    figure, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for curve in curves:
            points = [(r.rank, getattr(r, metric)) for r in curve.ranks if getattr(r, metric) is not None]
            ranked = [(rank, value) for rank, value in points if rank >= 1]
            line = axis.plot([p[0] for p in ranked], [p[1] for p in ranked], marker="o",
                             label=f"{curve.label} ({curve.inference_rule})")[0]
            base = [value for rank, value in points if rank == 0]
            if base:
                axis.axhline(base[0], color=line.get_color(), linestyle=":", linewidth=1)
        axis.set_xscale("log", base=2)
        set_value_limits(axis, metric, [value for curve in curves for value in metric_values(curve, metric)])
        axis.set_xlabel("rank (dotted: rank 0, the base model)")
        axis.set_ylabel("answer-token loss (nats)" if metric == "answer_loss" else "exact-match accuracy")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure
