"""Accuracy-vs-compute plots of cascades (matplotlib, headless: a bare `Figure`, no pyplot).

Both axes are in percent: the x axis is the cascade's cost relative to the base alone (MACs per image, 100 % = the
base alone), the y axis its top-1 accuracy. The figures are sized for the ~800 px width at which the Hub shows a
model card's images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .calibration.simulation import CalibrationResult, TradeoffCurve
from .storage import write_file_atomic

# 8 x 5.6 inches at 100 dpi: 800 x 560 px, the width the Hub shows a card's images at, so 9-11 pt text stays legible.
FIGURE_SIZE = (8.0, 5.6)
FIGURE_DPI = 100
X_LABEL = "cost: relative MACs per image (% of the base alone)"
Y_LABEL = "top-1 accuracy (%)"
ORACLE_LABEL = "oracle bound (base only where the saver is wrong)"


def pareto_frontier(relative_macs: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both lower MACs and higher accuracy, by increasing MACs."""
    order = np.lexsort((-accuracy, relative_macs))
    frontier, best = [], -np.inf
    for index in order:
        if accuracy[index] > best:
            frontier.append(index)
            best = accuracy[index]
    return np.asarray(frontier, dtype=np.int64)


def oracle_bound(curve: TradeoffCurve) -> tuple[np.ndarray, np.ndarray]:
    """The oracle bound of a saver and a base: the best accuracy any exit rule can reach at each cost.

    Sending a fraction `f` of the images to the base costs `relative_saver_macs + f` and gains at most
    `min(f, H / n)` over the saver alone (`H`: images the saver gets wrong and the base right). The bound runs from
    "every image exits" (the saver alone) to the cost of the oracle that sends exactly those `H` images, then stays
    flat up to sending every image.

    Returns:
        `(relative_macs, accuracy)` of the bound's three corners (fractions, not percent).
    """
    if not curve.has_labels:
        raise ValueError("The oracle bound needs labels.")
    everything = int(np.argmax(curve.exited))  # the point where every image exits
    harms, gains = int(curve.harms[everything]), int(curve.gains[everything])
    saver_accuracy = (curve.base_correct - harms + gains) / curve.n
    s = curve.relative_saver_macs
    macs = np.array([s, s + harms / curve.n, s + 1.0])
    accuracy = np.array([saver_accuracy, saver_accuracy + harms / curve.n, saver_accuracy + harms / curve.n])
    return macs, accuracy


def _point_label(point: Any, where: str = "") -> str:
    return f"threshold {point.threshold:.4g}{where}\nexit {100 * point.exit_rate:.1f} %, acc. {100 * point.accuracy:.2f} %"


def tradeoff_figure(
    curves: Mapping[str, TradeoffCurve],
    base_accuracy: float,
    base_name: str = "base",
    operating_points: Mapping[str, CalibrationResult] | None = None,
    show_frontier: bool = False,
    title: str | None = None,
    held_out_curves: Mapping[str, TradeoffCurve] | None = None,
    held_out_points: Mapping[str, CalibrationResult] | None = None,
    calibration_points: Mapping[str, Any] | None = None,
    show_oracle: bool = True,
    curve_label: str = "",
    held_out_label: str = "held-out",
):
    """The trade-off plot as a `matplotlib.figure.Figure`: cascade accuracy (%) against cost (relative MACs, % of the
    base); [`plot_tradeoff`] writes it.

    Args:
        curves: Saver name -> its trade-off curve (needs labels), drawn solid.
        base_accuracy: Accuracy of the base alone, drawn as a star at 100 % cost.
        base_name: Label of the base point.
        operating_points: Saver name -> the chosen operating point, marked and labelled with its threshold.
        show_frontier: Also draw the Pareto frontier over all `curves`.
        title: Plot title.
        held_out_curves: Saver name -> its trade-off curve on held-out data, drawn dashed in the same colour.
        held_out_points: Saver name -> the operating point measured on held-out data, marked and labelled.
        calibration_points: Label -> a point measured elsewhere (anything with `relative_macs`, `accuracy`,
            `threshold`, e.g. a [`~calibration.record.CalibrationRecord`]), drawn as a hollow circle.
        show_oracle: Draw the oracle bound (see [`oracle_bound`]) of the chosen saver (the one with an operating
            point, else the only curve).
        curve_label: Appended in brackets to the names of `curves` in the legend (e.g. the calibration split).
        held_out_label: Appended in brackets to the names of `held_out_curves` in the legend.

    Returns:
        The `Figure` (drawn without pyplot, so no global backend or state changes).
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    axes = figure.subplots()
    operating_points = dict(operating_points or {})
    held_out_curves = dict(held_out_curves or {})
    held_out_points = dict(held_out_points or {})
    all_macs, all_accuracy, colors = [], [], {}
    for name, curve in curves.items():
        if curve.accuracy is None:
            raise ValueError(f"The curve of {name!r} has no labels; accuracy cannot be plotted.")
        label = f"{name} ({curve_label})" if curve_label else name
        (line,) = axes.plot(100 * curve.relative_macs, 100 * curve.accuracy, linewidth=1.6, label=label)
        colors[name] = line.get_color()
        all_macs.append(curve.relative_macs)
        all_accuracy.append(curve.accuracy)
    for name, curve in held_out_curves.items():
        if curve.accuracy is None:
            raise ValueError(f"The held-out curve of {name!r} has no labels; accuracy cannot be plotted.")
        (line,) = axes.plot(
            100 * curve.relative_macs,
            100 * curve.accuracy,
            linewidth=1.6,
            linestyle="--",
            color=colors.get(name),
            label=f"{name} ({held_out_label})",
        )
        colors.setdefault(name, line.get_color())
        all_accuracy.append(curve.accuracy)
    if show_frontier and all_macs:
        macs, accuracy = np.concatenate(all_macs), np.concatenate(all_accuracy[: len(all_macs)])
        frontier = pareto_frontier(macs, accuracy)
        axes.step(
            100 * macs[frontier],
            100 * accuracy[frontier],
            where="post",
            color="black",
            linestyle="--",
            linewidth=1,
            label="Pareto frontier",
        )
    if show_oracle:
        # One bound, for the saver that was chosen (or the only one): one per candidate would hide the curves.
        oracle_names = [n for n in operating_points if n in curves] or (list(curves)[:1] if len(curves) == 1 else [])
        oracle_names = oracle_names or [n for n in held_out_points if n in held_out_curves][:1]
        for name in oracle_names[:1]:
            curve = curves.get(name, held_out_curves.get(name))
            if not getattr(curve, "has_labels", False):  # only a real TradeoffCurve knows its harms and gains
                continue
            macs, accuracy = oracle_bound(curve)
            label = ORACLE_LABEL if len(curves) <= 1 else f"{ORACLE_LABEL}: {name}"
            if curve_label and name in curves:  # say which data it bounds when held-out curves are drawn beside
                label += f", {curve_label}"
            axes.plot(100 * macs, 100 * accuracy, color="grey", linestyle=":", linewidth=1.6, label=label)
            all_accuracy.append(accuracy)
    marked = ((operating_points, "o", (30, -45), ""), (held_out_points, "D", (30, -95), f" ({held_out_label})"))
    for points, marker, offset, where in marked:
        for name, point in points.items():
            if point is None or point.accuracy is None:
                continue
            color = colors.get(name, "black")
            axes.scatter(
                [100 * point.relative_macs], [100 * point.accuracy], color=color, edgecolor="black", s=60, zorder=6,
                marker=marker,
            )  # fmt: skip
            axes.annotate(
                _point_label(point, where),
                (100 * point.relative_macs, 100 * point.accuracy),
                textcoords="offset points",
                xytext=offset,
                fontsize=9,
                color="black",
                bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": color, "alpha": 0.9},
                arrowprops={"arrowstyle": "-", "color": color, "linewidth": 0.8},
                zorder=7,
            )
    for label, point in (calibration_points or {}).items():
        if point is None or point.accuracy is None or point.relative_macs is None:
            continue
        axes.scatter(
            [100 * point.relative_macs], [100 * point.accuracy], facecolor="none", edgecolor="black", s=70,
            linewidth=1.4, zorder=6, label=f"{label}: threshold {point.threshold:.4g}",
        )  # fmt: skip
        all_accuracy.append(np.array([point.accuracy]))
    axes.scatter(
        [100.0], [100 * base_accuracy], marker="*", s=220, color="black", zorder=8, label=f"{base_name} alone"
    )
    axes.axhline(100 * base_accuracy, color="grey", linewidth=0.8, linestyle="-", alpha=0.5)
    axes.axvline(100.0, color="grey", linewidth=0.8, linestyle="-", alpha=0.5)
    axes.set_xlabel(X_LABEL, fontsize=11)
    axes.set_ylabel(Y_LABEL, fontsize=11)
    axes.tick_params(labelsize=10)
    lowest = min((float(np.min(a)) for a in all_accuracy), default=base_accuracy)
    highest = max(base_accuracy, max((float(np.max(a)) for a in all_accuracy), default=0.0))
    axes.set_ylim(max(0.0, 100 * min(lowest, base_accuracy) - 1), min(100.0, 100 * highest + 1.5))
    axes.grid(alpha=0.3)
    # Below the axes, where it hides no curve, point or label.
    axes.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    if title:
        axes.set_title(title, fontsize=11)
    figure.tight_layout()
    return figure


def plot_tradeoff(
    path: str | os.PathLike, curves: Mapping[str, TradeoffCurve], base_accuracy: float, **options
) -> Path:
    """Draws [`tradeoff_figure`] and writes it as a PNG atomically.

    Args:
        path: Where to write the PNG.
        curves: Saver name -> its trade-off curve, as for [`tradeoff_figure`].
        base_accuracy: Accuracy of the base alone.
        **options: The other arguments of [`tradeoff_figure`] (`operating_points`, `held_out_curves`, `title`, ...).

    Returns:
        The written path.
    """
    figure = tradeoff_figure(curves, base_accuracy, **options)
    return write_file_atomic(path, lambda file: figure.savefig(file, format="png"))


__all__ = ["FIGURE_DPI", "FIGURE_SIZE", "oracle_bound", "pareto_frontier", "plot_tradeoff", "tradeoff_figure"]
