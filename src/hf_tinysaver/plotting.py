"""Accuracy-vs-compute plots of cascades (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .calibration.simulation import CalibrationResult, TradeoffCurve
from .storage import write_file_atomic


def pareto_frontier(relative_macs: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both lower MACs and higher accuracy, by increasing MACs."""
    order = np.lexsort((-accuracy, relative_macs))
    frontier, best = [], -np.inf
    for index in order:
        if accuracy[index] > best:
            frontier.append(index)
            best = accuracy[index]
    return np.asarray(frontier, dtype=np.int64)


def plot_tradeoff(
    path: str | os.PathLike,
    curves: dict[str, TradeoffCurve],
    base_accuracy: float,
    base_name: str = "base",
    operating_points: dict[str, CalibrationResult] | None = None,
    show_frontier: bool = False,
    title: str | None = None,
) -> Path:
    """Plots cascade accuracy against relative MACs for one or more savers and writes a PNG atomically.

    Args:
        path: Where to write the PNG.
        curves: Saver name -> its trade-off curve (needs labels).
        base_accuracy: Accuracy of the base alone, drawn at relative MACs 1.
        base_name: Label of the base point.
        operating_points: Saver name -> the calibrated operating point to mark.
        show_frontier: Also draw the Pareto frontier over all curves.
        title: Plot title.

    Returns:
        The written path.
    """
    # A bare `Figure` draws with its own canvas: no pyplot, no global backend switch, nothing left open.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    axes = figure.subplots()
    all_macs, all_accuracy = [], []
    for name, curve in curves.items():
        if curve.accuracy is None:
            raise ValueError(f"The curve of {name!r} has no labels; accuracy cannot be plotted.")
        (line,) = axes.plot(curve.relative_macs, 100 * curve.accuracy, linewidth=1.3, label=name)
        all_macs.append(curve.relative_macs)
        all_accuracy.append(curve.accuracy)
        point = (operating_points or {}).get(name)
        if point is not None and point.accuracy is not None:
            axes.scatter([point.relative_macs], [100 * point.accuracy], color=line.get_color(), zorder=5, s=40)
            axes.annotate(
                f"t={point.threshold:.4g}, exit {100 * point.exit_rate:.1f} %",
                (point.relative_macs, 100 * point.accuracy),
                textcoords="offset points",
                xytext=(6, -12),
                fontsize=8,
            )
    if show_frontier and all_macs:
        macs, accuracy = np.concatenate(all_macs), np.concatenate(all_accuracy)
        frontier = pareto_frontier(macs, accuracy)
        axes.step(
            macs[frontier],
            100 * accuracy[frontier],
            where="post",
            color="black",
            linestyle="--",
            linewidth=1,
            label="Pareto frontier",
        )
    axes.scatter([1.0], [100 * base_accuracy], marker="*", s=160, color="black", zorder=6, label=f"{base_name} alone")
    axes.axhline(100 * base_accuracy, color="grey", linewidth=0.6, linestyle=":")
    axes.set_xlabel("relative MACs (cascade / base alone)")
    axes.set_ylabel("top-1 accuracy (%)")
    lowest = min(float(np.min(a)) for a in all_accuracy) if all_accuracy else base_accuracy
    axes.set_ylim(
        max(0.0, 100 * lowest - 1),
        100 * max(base_accuracy, max((float(np.max(a)) for a in all_accuracy), default=0)) + 1,
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout()

    return write_file_atomic(path, lambda file: figure.savefig(file, format="png"))


__all__ = ["pareto_frontier", "plot_tradeoff"]
