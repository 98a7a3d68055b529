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
    """Return one row per (adapter, rank) and the AURAC lines of each curve."""
    lines = [f"{'adapter':<32} {'rule':<12} {'rank':>5} {'loss':>8} {'accuracy':>9}"]
    for curve in curves:
        for result in curve.ranks:
            loss = "-" if result.answer_loss is None else f"{result.answer_loss:.4f}"
            accuracy = "-" if result.accuracy is None else f"{result.accuracy:.4f}"
            lines.append(f"{curve.label:<32} {curve.inference_rule:<12} {result.rank:>5} {loss:>8} {accuracy:>9}")
    lines.append("")
    lines.append(f"{'adapter':<32} {'rule':<12} {'AURAC':<10} {'linear':>8} {'log2':>8}")
    for curve in curves:
        for metric in ("answer_loss", "accuracy"):
            area = curve.aurac(metric)
            if area["linear"] is None:
                continue
            lines.append(f"{curve.label:<32} {curve.inference_rule:<12} {metric:<10} "
                         f"{area['linear']:>8.4f} {area['log2']:>8.4f}")
    return "\n".join(lines)


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


def plot_curves(curves: Sequence[CurveResult], path: str | os.PathLike, title: str = "") -> None:
    """Draw loss and accuracy against rank (log2 axis; rank 0 drawn as a dotted level), one line per curve."""
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
        axis.set_xlabel("rank (dotted: rank 0, the base model)")
        axis.set_ylabel("answer-token loss (nats)" if metric == "answer_loss" else "exact-match accuracy")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    logger.info("wrote %s", path)
