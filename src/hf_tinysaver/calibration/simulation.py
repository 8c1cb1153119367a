"""Calibration of a TinySaver cascade's exit threshold from recorded per-sample outputs.

Everything here is a pure function of per-sample arrays (the saver's confidence and prediction, the base's
prediction, optional labels) and of `relative_saver_macs` = saver MACs / base MACs. A sample exits at the saver when
its confidence is strictly greater than the threshold; the cascade then costs `relative_saver_macs + (1 - exit_rate)`
base-model equivalents per sample.

One descending sort of the confidences and a few cumulative sums give the whole trade-off curve: one point per tie
group of equal confidences (all or none of a tie group exits) plus the point where nothing exits. Every objective
is a mask over that curve, so scoring a saver/base pair for all objectives costs O(n log n) once.

Thresholds are placed midway (in float64) between the confidence of the last tie group that exits and the next
lower distinct confidence, not on a data point: a re-run whose confidences move by float noise (another batch size,
another device) makes the same decisions. The paper's own rule (`paper-no-loss`) is the exception: it reports a
grid value, as the paper's code does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from ..models.confidence import compute_confidence
from ..models.configuration_tinysaver import validate_label_mapping, validate_threshold
from .bounds import clopper_pearson_upper, largest_count_with_upper_at_most, smallest_count_with_lower_at_least
from .certification import (
    CERTIFICATE_METHODS,
    DEFAULT_CERTIFICATE,
    certificate_grid,
    certificate_record,
    certified_table,
    certify_max_drop,
    grid_counts,
)

# `x as x` re-exports plan_calibration_size and number_rule for callers that still import them from here
# (workflows.cascade); their homes are certification and checks.
from .certification import plan_calibration_size as plan_calibration_size
from .checks import check_confidence_level, check_number
from .checks import number_rule as number_rule

OBJECTIVES = ("paper-no-loss", "max-drop", "exit-rate", "budget", "agreement")

# Guarantee mode for `max-drop`: credit (as a fraction of samples) that the saver's wins may earn back against its
# losses, fixed in advance so that every Clopper-Pearson bound is taken at a data-independent level.
GUARANTEE_CREDITS = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)


class InfeasibleTargetError(ValueError):
    """No threshold meets the requested target; the message names the closest achievable point."""


def check_finite_logits(logits: Any, source: str, where: str = "") -> None:
    """Raises a `ValueError` naming `source` and the rows when `logits` hold NaN or infinite values.

    Args:
        logits: `(n, num_labels)` logits (NumPy array or tensor).
        source: Who produced them, e.g. the model's name or `"The saver"`.
        where: Optional place, e.g. `" of split 'test'"`.
    """
    finite_rows = np.isfinite(np.asarray(logits)).all(axis=-1)
    if not finite_rows.all():
        bad_rows = np.flatnonzero(~finite_rows)
        raise ValueError(
            f"{source} returned NaN or infinite logits on {len(bad_rows)} of {len(finite_rows)} rows{where} "
            f"(first: row {int(bad_rows[0])}); such rows have no prediction. Check the model's weights and inputs (a "
            "float16 or bfloat16 model can overflow: run it in float32), then record again."
        )


def format_drop(points: float) -> str:
    """The library's one wording of an accuracy drop: base accuracy minus cascade accuracy, in points.

    `format_drop(0.64)` is `"drop 0.64 points"`; a negative drop keeps its sign and says what it means,
    `format_drop(-0.15)` is `"drop -0.15 points = a 0.15-point gain over the base"`.
    """
    text = f"{float(points):.2f}"
    if text == "-0.00":
        text = "0.00"
    if text.startswith("-"):
        return f"drop {text} points = a {text[1:]}-point gain over the base"
    return f"drop {text} points"


def _as_classes(values: Any, name: str) -> np.ndarray:
    """`values` as an int64 class array; float arrays must hold whole finite numbers (no NaN predicted as class 0)."""
    array = np.asarray(values).reshape(-1)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be integer class indices, got an array of {array.dtype}.")
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            raise ValueError(
                f"{name} must be integer class indices, but {int(bad.sum())} of {len(array)} entries are NaN, "
                f"infinite or fractional (first: row {int(np.flatnonzero(bad)[0])}, {array[bad][0]!r})."
            )
    return array.astype(np.int64)


def _threshold_between(higher: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """Float64 thresholds `t` with `lower <= t < higher`, midway where a float lies strictly between."""
    midpoint = lower + (higher - lower) / 2.0
    return np.where(midpoint < higher, midpoint, lower)


def count_for_rate(rate: float, n: int) -> int:
    """Smallest sample count whose share of `n` is at least `rate`, robust to the float error of `rate * n`."""
    return max(0, math.ceil(round(rate * n, 9)))


class OperatingPointResult:
    """What the results of a calibration share ([`CalibrationResult`], `calibration.chain.ChainCalibrationResult`):
    the accuracy drop and a flat JSON-ready dict. Subclasses are dataclasses with `accuracy`, `base_accuracy` and a
    trailing `parameters` dict."""

    @property
    def accuracy_drop(self) -> float | None:
        """Base accuracy minus the cascade's accuracy, in points (None without labels)."""
        if self.accuracy is None or self.base_accuracy is None:
            return None
        return 100.0 * (self.base_accuracy - self.accuracy)

    def derived_fields(self) -> dict[str, Any]:
        """Computed values `to_dict` adds after the fields (none here)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with stable keys: the fields, the derived values, then the objective's parameters."""
        output = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "parameters"}
        output.update(self.derived_fields())
        output.update(self.parameters)
        return output


@dataclass
class CalibrationResult(OperatingPointResult):
    """The operating point an objective picked (or that a fixed threshold gives).

    Attributes:
        objective: Name of the objective (`"threshold"` for [`CascadeSimulation.evaluate`]).
        threshold: Samples whose confidence is strictly greater exit at the saver.
        exit_rate: Fraction of samples that exit.
        accuracy: Top-1 accuracy of the cascade (None without labels).
        base_accuracy: Top-1 accuracy of the base alone (None without labels).
        saver_accuracy: Top-1 accuracy of the saver alone on all samples (None without labels).
        relative_macs: Cost per sample relative to the base alone, `relative_saver_macs + 1 - exit_rate`.
        agreement: Fraction of samples on which the cascade predicts what the base predicts.
        n: Number of samples.
        relative_saver_macs: Saver MACs / base MACs.
        parameters: The objective's parameters and extra facts (flattened into `to_dict()`).
    """

    objective: str
    threshold: float
    exit_rate: float
    accuracy: float | None
    base_accuracy: float | None
    saver_accuracy: float | None
    relative_macs: float
    agreement: float
    n: int
    relative_saver_macs: float
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def delta_c(self) -> float:
        """The paper's ΔC at this point, `relative_saver_macs - exit_rate` (negative means a saving)."""
        return self.relative_saver_macs - self.exit_rate

    def describe(self) -> str:
        """One line for messages: threshold, exit rate, relative MACs and, with labels, accuracy."""
        text = (
            f"threshold {self.threshold:.6g}, exit rate {self.exit_rate:.4f}, relative MACs {self.relative_macs:.4f}"
        )
        if self.accuracy is not None:
            text += (
                f", accuracy {100 * self.accuracy:.2f} % (base {100 * self.base_accuracy:.2f} %, "
                f"{format_drop(self.accuracy_drop)})"
            )
        if self.exit_rate == 1.0:
            text += ", every image exits (the saver alone answers, the base never runs)"
        return text + f", agreement with base {100 * self.agreement:.2f} %"


@dataclass(frozen=True)
class TradeoffCurve:
    """Every achievable operating point of a cascade on one data set, from "nothing exits" to "everything exits".

    Point `j` exits the `j` most confident tie groups. All arrays have one entry per point.

    Attributes:
        thresholds: Float64 thresholds realising each point (`confidence > threshold` exits).
        exited: Number of exited samples.
        disagreements: Exited samples on which saver and base predictions differ.
        harms: Exited samples the base gets right and the saver wrong (zeros without labels).
        gains: Exited samples the saver gets right and the base wrong (zeros without labels).
        n: Number of samples.
        base_correct: Samples the base gets right (0 without labels).
        relative_saver_macs: Saver MACs / base MACs.
        has_labels: Whether harms, gains and accuracies are meaningful.
    """

    thresholds: np.ndarray
    exited: np.ndarray
    disagreements: np.ndarray
    harms: np.ndarray
    gains: np.ndarray
    n: int
    base_correct: int
    relative_saver_macs: float
    has_labels: bool

    @property
    def exit_rate(self) -> np.ndarray:
        return self.exited / self.n

    @property
    def relative_macs(self) -> np.ndarray:
        return self.relative_saver_macs + 1.0 - self.exited / self.n

    @property
    def agreement(self) -> np.ndarray:
        return 1.0 - self.disagreements / self.n

    @property
    def cascade_correct(self) -> np.ndarray:
        """Number of samples the cascade gets right at each point (requires labels)."""
        return self.base_correct - self.harms + self.gains

    @property
    def accuracy(self) -> np.ndarray | None:
        return self.cascade_correct / self.n if self.has_labels else None

    def __len__(self) -> int:
        return len(self.exited)


class CascadeSimulation:
    r"""
    Simulates a saver -> base cascade on recorded per-sample outputs and calibrates its exit threshold.

    Args:
        confidence (`array-like` of shape `(n,)`):
            The saver's confidence per sample, from [`compute_confidence`] (float64). Use
            [`CascadeSimulation.from_logits`] to compute it exactly as the deployed cascade does.
        saver_predictions (`array-like` of shape `(n,)`):
            The saver's predicted class per sample, in the base's label space.
        base_predictions (`array-like` of shape `(n,)`):
            The base model's predicted class per sample.
        labels (`array-like` of shape `(n,)`, *optional*):
            True classes. Needed by every objective but `exit-rate`, `budget` and `agreement`.
        relative_saver_macs (`float`, *optional*, defaults to 0.0):
            Saver MACs / base MACs.

    Example:

    ```python
    >>> import torch
    >>> from hf_tinysaver.calibration.simulation import CascadeSimulation

    >>> generator = torch.Generator().manual_seed(0)
    >>> labels = torch.randint(0, 10, (1000,), generator=generator)
    >>> saver_logits = torch.randn(1000, 10, generator=generator) + 4 * torch.nn.functional.one_hot(labels, 10)
    >>> base_logits = torch.randn(1000, 10, generator=generator) + 6 * torch.nn.functional.one_hot(labels, 10)
    >>> simulation = CascadeSimulation.from_logits(saver_logits, base_logits, labels, relative_saver_macs=0.1)
    >>> result = simulation.calibrate("max-drop", max_drop=0.5)
    >>> result.accuracy >= result.base_accuracy - 0.005
    True
    >>> sorted(result.to_dict())[:4]
    ['accuracy', 'agreement', 'base_accuracy', 'confidence_level']
    ```
    """

    def __init__(
        self,
        confidence: Any,
        saver_predictions: Any,
        base_predictions: Any,
        labels: Any = None,
        relative_saver_macs: float = 0.0,
    ):
        self.confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
        self.saver_predictions = _as_classes(saver_predictions, "saver_predictions")
        self.base_predictions = _as_classes(base_predictions, "base_predictions")
        self.labels = None if labels is None else _as_classes(labels, "labels")
        self.relative_saver_macs = float(relative_saver_macs)
        n = len(self.confidence)
        if n == 0:
            raise ValueError("Cannot calibrate on zero samples.")
        lengths = {"saver_predictions": len(self.saver_predictions), "base_predictions": len(self.base_predictions)}
        if self.labels is not None:
            lengths["labels"] = len(self.labels)
        mismatched = {name: length for name, length in lengths.items() if length != n}
        if mismatched:
            raise ValueError(f"confidence has {n} samples but {mismatched}; pass one entry per sample everywhere.")
        if not np.isfinite(self.confidence).all():
            raise ValueError("confidence contains NaN or infinite values; check the saver's logits.")
        if not (math.isfinite(self.relative_saver_macs) and self.relative_saver_macs >= 0):
            raise ValueError(f"relative_saver_macs must be a finite number >= 0, got {relative_saver_macs}.")

    @classmethod
    def from_logits(
        cls,
        saver_logits: Any,
        base_logits_or_predictions: Any,
        labels: Any = None,
        relative_saver_macs: float = 0.0,
        confidence_metric: str = "max_prob",
        temperature: float = 1.0,
        label_mapping: Sequence[int] | None = None,
    ) -> CascadeSimulation:
        """Builds a simulation from the saver's float32 logits, exactly as the deployed cascade decides.

        Args:
            saver_logits: `(n, num_saver_labels)` logits; the confidence is `compute_confidence` of these.
            base_logits_or_predictions: The base's `(n, num_labels)` logits or its `(n,)` predicted classes.
            labels: Optional `(n,)` true classes.
            relative_saver_macs: Saver MACs / base MACs.
            confidence_metric: `"max_prob"`, `"margin"` or `"entropy"`.
            temperature: Divides the saver's logits before the confidence is computed.
            label_mapping: Saver class `i` -> base class `label_mapping[i]`, as in `TinySaverConfig`.

        Returns:
            The simulation.
        """
        saver_logits = torch.as_tensor(np.asarray(saver_logits))
        if saver_logits.ndim == 2:
            check_finite_logits(saver_logits, "The saver")
        confidence = compute_confidence(saver_logits, confidence_metric, temperature).numpy()
        saver_predictions = saver_logits.argmax(dim=-1).numpy()
        if label_mapping is not None:
            saver_predictions = np.asarray(validate_label_mapping(label_mapping), dtype=np.int64)[saver_predictions]
        base = np.asarray(base_logits_or_predictions)
        if base.ndim == 2:
            check_finite_logits(base, "The base")
        base_predictions = base.argmax(axis=-1) if base.ndim == 2 else base
        return cls(confidence, saver_predictions, base_predictions, labels, relative_saver_macs)

    @property
    def n(self) -> int:
        return len(self.confidence)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @cached_property
    def _correctness(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.labels is None:
            return None
        return self.saver_predictions == self.labels, self.base_predictions == self.labels

    @property
    def base_accuracy(self) -> float | None:
        return None if self._correctness is None else float(self._correctness[1].mean())

    @property
    def saver_accuracy(self) -> float | None:
        return None if self._correctness is None else float(self._correctness[0].mean())

    @cached_property
    def sorted_order(self) -> np.ndarray:
        """Sample indices by descending confidence, ties in sample order (cached; `sorted_counts` follows it)."""
        return np.argsort(-self.confidence, kind="stable")

    @cached_property
    def sorted_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """The samples in descending confidence, with cumulative counts in that order (cached).

        Returns:
            `(descending, counts)`: `descending` the `n` confidences sorted high to low (ties in sample order);
            `counts` an int64 array `(rows, n + 1)` whose column `k` counts over the `k` most confident samples
            (the ones that exit when exactly they do). Row 0 counts saver/base disagreements; with labels, row 1
            the harms (base right, saver wrong) and row 2 the gains (saver right, base wrong).
        """
        order = self.sorted_order
        columns = [self.saver_predictions[order] != self.base_predictions[order]]
        if self._correctness is not None:
            saver_correct, base_correct = self._correctness[0][order], self._correctness[1][order]
            columns += [base_correct & ~saver_correct, saver_correct & ~base_correct]
        counts = np.zeros((len(columns), self.n + 1), dtype=np.int64)
        np.cumsum(np.stack(columns), axis=1, out=counts[:, 1:])
        return self.confidence[order], counts

    @cached_property
    def curve(self) -> TradeoffCurve:
        """The full trade-off curve (one point per tie group plus "nothing exits"), cached."""
        descending, counts = self.sorted_counts
        group_ends = np.flatnonzero(np.diff(descending)) + 1
        exited = np.concatenate([[0], group_ends, [self.n]]).astype(np.int64)
        group_confidences = descending[exited[1:] - 1]
        lowest = group_confidences[-1]
        below = np.append(group_confidences[1:], 0.0 if lowest > 0 else lowest - 1.0)
        thresholds = np.concatenate([[max(1.0, float(descending[0]))], _threshold_between(group_confidences, below)])
        zeros = np.zeros(len(exited), dtype=np.int64)
        has_labels = self.has_labels
        return TradeoffCurve(
            thresholds=thresholds,
            exited=exited,
            disagreements=counts[0][exited],
            harms=counts[1][exited] if has_labels else zeros,
            gains=counts[2][exited] if has_labels else zeros,
            n=self.n,
            base_correct=int(self._correctness[1].sum()) if has_labels else 0,
            relative_saver_macs=self.relative_saver_macs,
            has_labels=has_labels,
        )

    def _result(self, objective: str, point: int, threshold: float | None = None, **parameters) -> CalibrationResult:
        curve = self.curve
        exited = int(curve.exited[point])
        return CalibrationResult(
            objective=objective,
            threshold=float(curve.thresholds[point] if threshold is None else threshold),
            exit_rate=exited / self.n,
            accuracy=float(curve.cascade_correct[point]) / self.n if self.has_labels else None,
            base_accuracy=self.base_accuracy,
            saver_accuracy=self.saver_accuracy,
            relative_macs=self.relative_saver_macs + 1.0 - exited / self.n,
            agreement=1.0 - float(curve.disagreements[point]) / self.n,
            n=self.n,
            relative_saver_macs=self.relative_saver_macs,
            parameters=parameters,
        )

    def _require_labels(self, objective: str) -> None:
        if not self.has_labels:
            raise ValueError(
                f"The {objective!r} objective needs labels; record a labelled split, or use the label-free "
                "'agreement', 'exit-rate' or 'budget' objectives."
            )

    def evaluate(self, threshold: float) -> CalibrationResult:
        """The operating point of a given threshold on these samples (e.g. a calibrated one on a test split).

        Args:
            threshold: Samples whose confidence is strictly greater exit at the saver.

        Returns:
            A result with `objective="threshold"`.
        """
        threshold = validate_threshold(threshold)
        descending, _ = self.sorted_counts
        exited = int(np.count_nonzero(descending > threshold))
        point = int(np.searchsorted(self.curve.exited, exited))
        return self._result("threshold", point, threshold=float(threshold))

    def calibrate(self, objective: str, **parameters) -> CalibrationResult:
        """Picks the threshold of one objective.

        Objectives and their parameters:

        - `"paper-no-loss"` (`grid_size=1000`): the paper's rule as its official code runs it. Thresholds
          `t = 1, 1 - 1/grid_size, ..., 1/grid_size` are tried from the top; the first `t` at which the saver is
          less accurate than the base on the samples that exit stops the sweep, and the last passing `t` is
          returned (the official code reports the failing one, in `first_failing_threshold`). `grid_size=None`
          tries every distinct confidence instead. Fragile by design (see the design notes): prefer `max-drop`.
        - `"max-drop"` (`max_drop`, `confidence_level=None`, `certificate=None`): the largest exit rate whose cascade accuracy is at
          most `max_drop` points (absolute top-1, e.g. 0.5) below the base's.
        - `"exit-rate"` (`exit_rate`): the smallest achievable exit rate of at least `exit_rate`.
        - `"budget"` (`relative_macs`): the smallest exit rate whose cost `relative_saver_macs + 1 - exit_rate` is
          at most `relative_macs` base-model equivalents; the whole budget is spent on the base.
        - `"agreement"` (`max_disagreement`, `confidence_level=None`): label-free; the largest exit rate at which
          the cascade predicts what the base predicts on at least `1 - max_disagreement` of the samples.

        With `confidence_level` (e.g. 0.95), `max-drop` and `agreement` hold on fresh data, not only on these
        samples:

        - `agreement`: with probability at least `confidence_level` over the draw of the calibration samples, the
          returned threshold's disagreement rate on the distribution they were drawn from is at most
          `max_disagreement`. Admissible points have a Clopper-Pearson upper bound on their disagreement rate of at
          most `max_disagreement`. The rate only grows as the threshold falls, so a single binomial bound at the
          distribution's own crossing point covers any threshold chosen from the data: the guarantee is exact, with
          no correction for the many thresholds tried.
        - `max-drop` (`certificate`, default `"discordant-binomial"`): with probability at least
          `confidence_level` over the draw of the calibration samples, the returned threshold's expected accuracy
          drop on the distribution is at most `max_drop` points. The default certificate tests a fixed, data-free
          grid of thresholds from fewest exits to most, each with an exact test at the full level, and keeps
          every threshold before the first failure (fixed-sequence testing, Learn-then-Test); see
          `hf_tinysaver.calibration.certification` for the tests (`"discordant-binomial"`, `"cp-difference"`). The result's
          `certificate` records method, target, level, n and the drop bound (points) at the chosen threshold;
          `certified_points` lists every certified threshold (all valid at once), for
          `TinySaverForImageClassification.set_operating_point`. `certificate="clopper-pearson"` is the original
          guarantee: the drop is `harm - gain`, both rates grow as the threshold falls; for each credit `c` in
          `GUARANTEE_CREDITS` (fixed in advance), a point is admissible when the upper bound on `harm` is at most
          `max_drop / 100 + c` and the lower bound on `gain` at least `c`; with the
          `2 * len(GUARANTEE_CREDITS) - 1` bounds each taken at level
          `1 - (1 - confidence_level) / (2 * len(GUARANTEE_CREDITS) - 1)`, the union bound gives the same
          guarantee. "Nothing exits" (drop 0) is always certified for `max_drop >= 0`.

        Both guarantees are about the rate on the distribution; a finite test set adds its own sampling noise. They
        assume the calibration samples are i.i.d. draws from the deployment distribution.

        Args:
            objective: One of `OBJECTIVES`.
            **parameters: The objective's parameters, listed above.

        Returns:
            The chosen operating point; `to_dict()` holds the parameters too.

        Raises:
            InfeasibleTargetError: When no threshold meets the target (the message names the closest point).
        """
        methods = {
            "paper-no-loss": self._paper_no_loss,
            "max-drop": self._max_drop,
            "exit-rate": self._exit_rate,
            "budget": self._budget,
            "agreement": self._agreement,
        }
        if objective not in methods:
            raise ValueError(f"Unknown objective {objective!r}; choose one of {OBJECTIVES}.")
        try:
            return methods[objective](**parameters)
        except TypeError as error:
            raise TypeError(f"Wrong parameters for objective {objective!r}: {error}") from None

    def _paper_no_loss(self, grid_size: int | None = 1000) -> CalibrationResult:
        self._require_labels("paper-no-loss")
        curve = self.curve
        if grid_size is None:
            failing = np.flatnonzero(curve.gains < curve.harms)
            if len(failing) == 0:
                return self._result("paper-no-loss", len(curve) - 1, grid_size=None, first_failing_threshold=None)
            first = int(failing[0])
            return self._result(
                "paper-no-loss",
                first - 1,
                grid_size=None,
                first_failing_threshold=float(curve.thresholds[first]),
            )
        if int(grid_size) != grid_size or grid_size < 1:
            raise ValueError(f"grid_size must be a positive integer or None, got {grid_size}.")
        grid_size = int(grid_size)
        grid = np.arange(grid_size, 0, -1, dtype=np.int64) / grid_size
        descending, _ = self.sorted_counts
        exited = self.n - np.searchsorted(descending[::-1], grid, side="right")
        points = np.searchsorted(curve.exited, exited)
        failing = np.flatnonzero(curve.gains[points] < curve.harms[points])
        if len(failing) == 0:
            return self._result(
                "paper-no-loss",
                points[-1],
                threshold=float(grid[-1]),
                grid_size=grid_size,
                first_failing_threshold=None,
            )
        first = int(failing[0])
        if first == 0:  # fails with the grid's top threshold: only scores above 1 exit there; send nothing
            return self._result("paper-no-loss", 0, grid_size=grid_size, first_failing_threshold=float(grid[0]))
        return self._result(
            "paper-no-loss",
            points[first - 1],
            threshold=float(grid[first - 1]),
            grid_size=grid_size,
            first_failing_threshold=float(grid[first]),
        )

    def _pick_largest(self, admissible: np.ndarray, objective: str, target: str, closest: int, hint: str, **params):
        indices = np.flatnonzero(admissible)
        if len(indices) == 0:
            nearest = self._result(objective, closest, **params)
            raise InfeasibleTargetError(
                f"No threshold meets {target} on these {self.n} samples. Closest achievable point: "
                f"{nearest.describe()}. {hint}"
            )
        return self._result(objective, int(indices[-1]), **params)

    def _max_drop(
        self, max_drop: float, confidence_level: float | None = None, certificate: str | None = None
    ) -> CalibrationResult:
        self._require_labels("max-drop")
        curve = self.curve
        max_drop = check_number("max_drop", max_drop, meaning="the allowed top-1 drop in points, e.g. 0.5")
        allowed_drop = max_drop / 100.0
        params = {"max_drop": max_drop, "confidence_level": confidence_level}
        if certificate is not None and confidence_level is None:
            raise ValueError(
                f"certificate={certificate!r} needs a confidence_level (e.g. 0.95, --confidence-level 0.95)."
            )
        if confidence_level is not None:
            check_confidence_level(confidence_level)
            certificate = DEFAULT_CERTIFICATE if certificate is None else certificate
            if certificate not in CERTIFICATE_METHODS:
                raise ValueError(f"Unknown certificate {certificate!r}; choose one of {CERTIFICATE_METHODS}.")
            if certificate != "clopper-pearson":
                threshold, record, table = certify_max_drop(self, max_drop, confidence_level, certificate)
                point = int(np.searchsorted(self.curve.exited, np.count_nonzero(self.confidence > threshold)))
                return self._result(
                    "max-drop", point, threshold=threshold, certificate=record, certified_points=table, **params
                )
        if confidence_level is None:
            # Compare integer counts: losses - wins <= max_drop% of n, with n * rate rounded off float noise.
            allowed_loss = math.floor(round(allowed_drop * self.n, 9))
            admissible = curve.harms - curve.gains <= allowed_loss
        else:
            admissible, bounds = self._clopper_pearson_guarantee(allowed_drop, confidence_level)
        closest = int(np.argmax(curve.cascade_correct))
        result = self._pick_largest(
            admissible,
            "max-drop",
            f"an accuracy drop of at most {max_drop} points"
            + (f" at confidence {confidence_level}" if confidence_level is not None else ""),
            closest,
            "Allow a larger drop"
            + (", calibrate on more samples or lower confidence_level." if confidence_level is not None else "."),
            **params,
        )
        if confidence_level is not None:
            self._add_clopper_pearson_certificate(result, admissible, bounds, float(max_drop), confidence_level)
        return result

    def _clopper_pearson_guarantee(self, allowed_drop: float, confidence_level: float):
        """Admissible curve points of the original guarantee, and each point's smallest drop bound (fraction)."""
        curve = self.curve
        tests = 2 * len(GUARANTEE_CREDITS) - 1
        level = 1.0 - (1.0 - confidence_level) / tests
        credits = np.asarray(GUARANTEE_CREDITS)
        max_harms = largest_count_with_upper_at_most(allowed_drop + credits, self.n, level)
        min_gains = smallest_count_with_lower_at_least(credits, self.n, level)
        admissible = np.zeros(len(curve), dtype=bool)
        harm_upper = clopper_pearson_upper(curve.harms, self.n, level)
        bounds = np.full(len(curve), np.inf)
        for credit, max_harm, min_gain in zip(credits, max_harms, min_gains, strict=True):
            admissible |= (curve.harms <= max_harm) & (curve.gains >= min_gain)
            bounds = np.where(curve.gains >= min_gain, np.minimum(bounds, harm_upper - credit), bounds)
        admissible[0] |= allowed_drop >= 0
        bounds[0] = 0.0
        return admissible, bounds

    def _add_clopper_pearson_certificate(self, result, admissible, bounds, max_drop, confidence_level) -> None:
        """Certificate record and table of the original guarantee: every admissible point is valid at once."""
        point = int(np.searchsorted(self.curve.exited, round(result.exit_rate * self.n)))
        # The table keeps the admissible points at the certificate grid's exit sets (plus the chosen one).
        exited, _, _ = grid_counts(self, certificate_grid())
        indices = np.unique(np.append(np.searchsorted(self.curve.exited, exited), point))
        indices = indices[admissible[indices]]
        curve = self.curve
        result.parameters["certificate"] = certificate_record(
            "clopper-pearson",
            max_drop,
            confidence_level,
            self.n,
            result.threshold,
            bounds[point],
            procedure="simultaneous (monotone harm and gain)",
        )
        result.parameters["certified_points"] = certified_table(
            curve.thresholds[indices], curve.exited[indices], bounds[indices], self.n, self.relative_saver_macs
        )

    def _agreement(self, max_disagreement: float, confidence_level: float | None = None) -> CalibrationResult:
        max_disagreement = check_number(
            "max_disagreement", max_disagreement, 0.0, 1.0, meaning="a fraction of samples"
        )
        curve = self.curve
        params = {"max_disagreement": float(max_disagreement), "confidence_level": confidence_level}
        if confidence_level is None:
            admissible = curve.disagreements <= math.floor(round(max_disagreement * self.n, 9))
        else:
            check_confidence_level(confidence_level)
            max_count = largest_count_with_upper_at_most(max_disagreement, self.n, confidence_level)[0]
            admissible = curve.disagreements <= max_count
            admissible[0] = True  # nothing exits: the cascade is the base, disagreement 0 for certain
        return self._pick_largest(admissible, "agreement", "the agreement target", 0, "", **params)

    def _exit_rate(self, exit_rate: float) -> CalibrationResult:
        exit_rate = check_number("exit_rate", exit_rate, 0.0, 1.0, meaning="a fraction of samples")
        point = int(np.searchsorted(self.curve.exited, count_for_rate(exit_rate, self.n)))
        return self._result("exit-rate", point, target_exit_rate=float(exit_rate))

    def _budget(self, relative_macs: float) -> CalibrationResult:
        relative_macs = check_number(
            "relative_macs", relative_macs, 0.0, meaning="the budget in base-model equivalents, e.g. 0.5"
        )
        required_exit_rate = self.relative_saver_macs + 1.0 - relative_macs
        params = {"target_relative_macs": float(relative_macs)}
        if required_exit_rate > 1.0 + 1e-12:
            nearest = self._result("budget", len(self.curve) - 1, **params)
            raise InfeasibleTargetError(
                f"A budget of {relative_macs} relative MACs is below the saver's own cost "
                f"(relative_saver_macs={self.relative_saver_macs:.4g}), which every sample pays. Closest achievable "
                f"point: {nearest.describe()}. Raise the budget to at least {self.relative_saver_macs:.4g} or pick a "
                "smaller saver."
            )
        required = count_for_rate(min(max(required_exit_rate, 0.0), 1.0), self.n)
        return self._result("budget", int(np.searchsorted(self.curve.exited, required)), **params)

    def oracle_relative_macs(self) -> float:
        """Cost of an oracle cascade that runs the base only where the saver is wrong and the base right.

        It is the lowest cost of any cascade of these two models that loses no accuracy against the base:
        `relative_saver_macs + P(saver wrong, base right)`.
        """
        self._require_labels("oracle")
        saver_correct, base_correct = self._correctness
        return self.relative_saver_macs + float(np.count_nonzero(base_correct & ~saver_correct)) / self.n

    def delta_c(self, grid_size: int | None = 1000) -> float:
        """The paper's saver-ranking score ΔC = `relative_saver_macs - exit_rate` at the `paper-no-loss` point.

        Negative values mean a saving; the paper ranks candidate savers by it (lowest first).
        """
        return self._paper_no_loss(grid_size=grid_size).delta_c


def calibrate(simulation: CascadeSimulation, objective: str, **parameters) -> CalibrationResult:
    """Picks a threshold for `objective`; see [`CascadeSimulation.calibrate`] for objectives and parameters."""
    return simulation.calibrate(objective, **parameters)


def oracle_relative_macs(simulation: CascadeSimulation) -> float:
    """See [`CascadeSimulation.oracle_relative_macs`]."""
    return simulation.oracle_relative_macs()


def delta_c(simulation: CascadeSimulation, grid_size: int | None = 1000) -> float:
    """See [`CascadeSimulation.delta_c`]."""
    return simulation.delta_c(grid_size=grid_size)


def fit_temperature(
    logits: Any, labels: Any, min_temperature: float = 0.01, max_temperature: float = 100.0, tolerance: float = 1e-8
) -> float:
    r"""
    Fits the temperature `T` that minimises the negative log-likelihood of `softmax(logits / T)` on labelled data.

    The NLL is convex in `1 / T`, so a safeguarded Newton search on its derivative finds the global minimum in a
    few passes over the logits (in float64). Predictions do not change with `T`; only the confidences do.

    Args:
        logits: `(n, num_labels)` logits of the saver on the calibration split.
        labels: `(n,)` true classes.
        min_temperature: Lower end of the search range; returned when the minimum lies below it.
        max_temperature: Upper end of the search range; returned when the minimum lies above it.
        tolerance: Stop when a step on `1 / T` is this small, relative to its value.

    Returns:
        The fitted temperature.

    Example:

    ```python
    >>> import torch
    >>> from hf_tinysaver.calibration.simulation import fit_temperature

    >>> generator = torch.Generator().manual_seed(0)
    >>> labels = torch.randint(0, 5, (4000,), generator=generator)
    >>> logits = torch.randn(4000, 5, generator=generator) + 2 * torch.nn.functional.one_hot(labels, 5)
    >>> round(fit_temperature(3 * logits, labels) / fit_temperature(logits, labels), 3)
    3.0
    ```
    """
    logits = torch.as_tensor(np.asarray(logits)).to(torch.float64)
    labels = torch.as_tensor(np.asarray(labels)).to(torch.int64)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(
            f"Expected logits (n, num_labels) and labels (n,) with n > 0, got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if not 0 < min_temperature < max_temperature:
        raise ValueError("Need 0 < min_temperature < max_temperature.")
    true_logits = logits.gather(1, labels[:, None])[:, 0]

    def derivatives(inverse_temperature: float) -> tuple[float, float]:
        probs = torch.softmax(logits * inverse_temperature, dim=-1)
        expected = (probs * logits).sum(dim=-1)
        variance = (probs * logits.square()).sum(dim=-1) - expected.square()
        return float((expected - true_logits).mean()), float(variance.clamp_min(0).mean())

    low, high = 1.0 / max_temperature, 1.0 / min_temperature
    if derivatives(low)[0] >= 0:
        return max_temperature
    if derivatives(high)[0] <= 0:
        return min_temperature
    beta = 1.0 if low < 1.0 < high else math.sqrt(low * high)
    for _ in range(200):
        slope, curvature = derivatives(beta)
        if slope > 0:
            high = beta
        else:
            low = beta
        step = beta - slope / curvature if curvature > 0 else math.nan
        next_beta = step if low < step < high else (low + high) / 2.0
        converged = abs(next_beta - beta) <= tolerance * beta or high - low <= tolerance * beta
        beta = next_beta
        if converged:
            break
    return 1.0 / beta


__all__ = [
    "GUARANTEE_CREDITS",
    "OBJECTIVES",
    "CalibrationResult",
    "CascadeSimulation",
    "InfeasibleTargetError",
    "OperatingPointResult",
    "TradeoffCurve",
    "calibrate",
    "check_finite_logits",
    "delta_c",
    "fit_temperature",
    "format_drop",
    "oracle_relative_macs",
]
