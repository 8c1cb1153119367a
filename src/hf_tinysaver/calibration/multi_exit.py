"""Thresholds of a multi-exit cascade (an Exit Sequence Network): the exit rule applied to recorded confidences,
the evaluation of a threshold setting and the search for per-exit thresholds under an accuracy-drop budget.

What is recorded per image is an [`ExitRecords`]: each exit's confidence and prediction, then the base's final
prediction. An image leaves at the first exit whose confidence is strictly greater than its threshold
([`~hf_tinysaver.models.confidence.first_exit`], the rule the deployed ESN forward applies); every step of the
threshold search is the plain cascade's `max-drop` calibration ([`CascadeSimulation`]) on the images still running.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models.confidence import first_exit
from .simulation import CascadeSimulation


@dataclass
class ExitRecords:
    """Per-image confidence and prediction at every answer point, for threshold search and evaluation.

    Attributes:
        confidences: `(n, E)` float64: the saver's confidence, then each ESN exit's (`E = P + 1` exits).
        predictions: `(n, E + 1)` int: the prediction at each exit, then the base's final prediction.
        labels: `(n,)` int class indices.
    """

    confidences: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        """`(n, E + 1)` bool: whether each answer point is right on each image."""
        return self.predictions == self.labels[:, None]

    def saver_only(self) -> ExitRecords:
        """The records of the plain TinySaver cascade: the saver, then the base."""
        return ExitRecords(self.confidences[:, :1], self.predictions[:, [0, -1]], self.labels)


def evaluate_exits(
    records: ExitRecords, thresholds: Sequence[float], exit_macs: Sequence[int], base_macs: int
) -> dict[str, Any]:
    """Accuracy, accuracy drop against the base, exit rates and relative MACs of a threshold setting.

    Args:
        records: Records of the split to evaluate.
        thresholds: One threshold per exit (the saver's first).
        exit_macs: Cumulative MACs of each answer point (each exit, then the final base answer).
        base_macs: MACs of the base alone, the unit of `relative_macs`.

    Returns:
        A dict with `accuracy`, `base_accuracy`, `accuracy_drop` (percentage points), `exit_rates` (one per answer
        point), `relative_macs` (mean MACs per image / base MACs) and `n` (images), the names of
        [`~hf_tinysaver.calibration.record.CalibrationRecord`].
    """
    num_points = records.predictions.shape[1]
    if len(thresholds) != num_points - 1 or len(exit_macs) != num_points:
        raise ValueError(
            f"Records have {num_points - 1} exits: give {num_points - 1} thresholds and {num_points} exit_macs."
        )
    exit_index = first_exit(torch.from_numpy(records.confidences), list(thresholds)).numpy()
    correct = records.correct
    count = len(exit_index)
    right = int(correct[np.arange(count), exit_index].sum())
    base_right = int(correct[:, -1].sum())
    return {
        "accuracy": right / count,
        "base_accuracy": base_right / count,
        "accuracy_drop": 100.0
        * (base_right - right)
        / count,  # from counts: no float residue on a drop exactly at target
        "exit_rates": (np.bincount(exit_index, minlength=num_points) / len(exit_index)).tolist(),
        "relative_macs": float(np.asarray(exit_macs, dtype=np.float64)[exit_index].mean() / base_macs),
        "n": int(len(exit_index)),
    }


def sequential_thresholds(records: ExitRecords, allowed_drops: Sequence[float]) -> list[float]:
    """Thresholds chosen exit by exit, first exit first, with the `max-drop` objective of `hf_tinysaver.calibration.simulation`.

    Exit `e` takes the lowest threshold for which the accuracy of the whole cascade, with exits `0..e` set and every
    later image answered by the base, stays at least `base accuracy - allowed_drops[e]` points. Each step is the
    plain cascade's calibration ([`~calibration.CascadeSimulation`], `max-drop`) on the images still running, exit
    `e` in the saver's role and the base's final answer in the base's, given what the earlier exits already cost.

    Args:
        records: Calibration records.
        allowed_drops: Cumulative allowed accuracy drop (percentage points) after each exit; non-decreasing.

    Returns:
        One threshold per exit.
    """
    confidences, predictions, labels = records.confidences, records.predictions, records.labels
    count, num_exits = confidences.shape
    if len(allowed_drops) != num_exits:
        raise ValueError(f"Expected {num_exits} allowed drops, got {len(allowed_drops)}.")
    if np.any(np.diff(np.asarray(allowed_drops, dtype=np.float64)) < 0):
        raise ValueError(f"allowed_drops must be non-decreasing, got {list(allowed_drops)}.")
    correct = records.correct
    answered = np.zeros(count, dtype=bool)
    lost = 0  # right answers of the base that earlier exits turned wrong, net of the reverse
    thresholds = []
    for exit_number in range(num_exits):
        pending = ~answered
        pending_count = int(pending.sum())
        if pending_count == 0:
            thresholds.append(1.0)
            continue
        # Integer loss budget, rounded as `CascadeSimulation` rounds it; >= 0 as the budgets never shrink.
        allowed_loss = math.floor(round(allowed_drops[exit_number] / 100.0 * count, 9)) - lost
        simulation = CascadeSimulation(
            confidences[pending, exit_number],
            predictions[pending, exit_number],
            predictions[pending, -1],
            labels[pending],
        )
        threshold = simulation.calibrate("max-drop", max_drop=100.0 * allowed_loss / pending_count).threshold
        leaving = pending & (confidences[:, exit_number] > threshold)
        lost += int(correct[leaving, -1].sum()) - int(correct[leaving, exit_number].sum())
        answered |= leaving
        thresholds.append(threshold)
    return thresholds


@dataclass
class ThresholdSearchResult:
    """Outcome of [`search_exit_thresholds`] on the calibration split.

    Attributes:
        thresholds: One threshold per exit, the saver's first.
        allowed_drops: The cumulative drop budget each exit was given (points).
        calibration: [`evaluate_exits`] of `thresholds` on the calibration split.
        candidates: How many budget schedules were tried.
    """

    thresholds: list[float]
    allowed_drops: list[float]
    calibration: dict[str, Any]
    candidates: int = 1


def search_exit_thresholds(
    records: ExitRecords, exit_macs: Sequence[int], base_macs: int, max_drop: float, budget_steps: int = 10
) -> ThresholdSearchResult:
    """Per-exit thresholds with the fewest MACs whose calibration accuracy is within `max_drop` points of the base.

    Each candidate is a sequential search ([`sequential_thresholds`], first exit first) under a budget schedule: exit
    `e` may use a cumulative fraction of `max_drop` (fractions on a grid of `1 / budget_steps`, non-decreasing, the
    last exit always the whole drop). Letting the first exit spend the whole budget (the greedy schedule) is one of
    the candidates; the schedule with the fewest MACs on the calibration split wins (ties: the higher accuracy).

    Args:
        records: Calibration records (e.g. [`~hf_tinysaver.workflows.esn.exit_records`] of an ESN).
        exit_macs: Cumulative MACs of each answer point (`config.exit_macs`).
        base_macs: MACs of the base alone.
        max_drop: Allowed top-1 accuracy drop against the base, in percentage points.
        budget_steps: Resolution of the budget split between exits.

    Returns:
        A [`ThresholdSearchResult`].

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_tinysaver.calibration.multi_exit import ExitRecords, search_exit_thresholds

    >>> rng = np.random.default_rng(0)
    >>> labels = rng.integers(0, 10, 1000)
    >>> confidences = rng.random((1000, 2))  # the saver's, then one ESN exit's
    >>> right = rng.random((1000, 3)) < [[0.7, 0.75, 0.8]]  # saver, ESN exit, base
    >>> records = ExitRecords(confidences, np.where(right, labels[:, None], (labels[:, None] + 1) % 10), labels)
    >>> result = search_exit_thresholds(records, exit_macs=[30, 70, 130], base_macs=100, max_drop=1.0)
    >>> len(result.thresholds), result.calibration["accuracy_drop"] <= 1.0
    (2, True)
    ```
    """
    num_exits = records.confidences.shape[1]
    if max_drop < 0:
        raise ValueError(f"max_drop must be >= 0 percentage points, got {max_drop}.")
    best: tuple[tuple[float, float], list[float], list[float], dict] | None = None
    schedules = list(itertools.combinations_with_replacement(range(budget_steps + 1), num_exits - 1))
    for schedule in schedules:
        allowed = [max_drop * step / budget_steps for step in schedule] + [max_drop]
        thresholds = sequential_thresholds(records, allowed)
        result = evaluate_exits(records, thresholds, exit_macs, base_macs)
        key = (result["relative_macs"], -result["accuracy"])
        if best is None or key < best[0]:
            best = (key, thresholds, allowed, result)
    _, thresholds, allowed, result = best
    return ThresholdSearchResult(
        thresholds=thresholds, allowed_drops=allowed, calibration=result, candidates=len(schedules)
    )


__all__ = ["ExitRecords", "ThresholdSearchResult", "evaluate_exits", "search_exit_thresholds", "sequential_thresholds"]
