"""Joint calibration of a chain of savers: `s_1 -> s_2 -> ... -> s_{K-1} -> base`.

Stage `k` runs only on the images no earlier stage answered; an image leaves at the first stage whose confidence is
strictly greater than its threshold ([`~hf_tinysaver.models.confidence.first_exit`], the deployed rule), else the
base answers it. An image answered at stage `k` costs the MACs of stages `1..k`; one the base answers costs every
saver's MACs plus the base's. `stage_macs` are the savers' MACs relative to the base's (the base is 1).

The search ([`ChainSimulation.calibrate`]) picks all `K - 1` thresholds together:

- **Candidates.** Exit decisions on the calibration images only depend on where each threshold cuts that stage's
  confidences over *all* images, so each stage's candidates are the cut points of its own trade-off curve
  ([`CascadeSimulation.curve`]: one per tie group, placed midway between neighbouring confidences, plus "nothing
  exits"). Every threshold vector is equivalent, on these images, to one of these.
- **Exact last stage.** For each setting of the leading thresholds `t_1 .. t_{K-2}`, the images reaching the last
  saver are fixed; one cumulative sum over them, in that saver's descending confidence order, gives the counts of
  every one of its cut points at once (read at the ends of their tie groups), and the objective picks its best cut
  exactly (`O(n)` per leading setting; a bisection on the count for `budget` and `exit-rate`).
- **Leading stages.** Every cut point of a leading stage is tried when there are at most `grid_size` of them (for
  `K = 3` that is the exact optimum over all thresholds); otherwise `grid_size` cut points evenly spaced in exit
  count, plus the special points below; then, around each of the `REFINE_SEEDS` best, a local refinement per
  leading stage (up to `REFINE_POINTS` cuts between the best cut's evaluated neighbours, repeated until every cut in
  between is evaluated). Cost for `K = 3`: one sort per stage plus `O(G * n)`, G the number of leading settings tried.
- **Never worse than greedy or a single saver.** The leading candidates always include "nothing exits" (the chain
  is then the cascade of the last saver alone), "everything exits" and the threshold the two-model calibration of
  the first saver alone picks for the same objective; for `max-drop`, also the first thresholds of the sequential
  search of [`~hf_tinysaver.calibration.multi_exit.search_exit_thresholds`] (each budget split). Since the last
  stage is solved exactly, the result is at least as good as each of these, as every single-saver cascade in the
  chain and as any greedy per-stage choice whose leading thresholds are among the candidates.

So the optimum found is: the exact optimum over (candidate leading cuts) x (every cut of the last saver) - the
global optimum over all thresholds whenever every leading cut is a candidate (`K = 3` with at most `grid_size`
distinct first-stage confidences, e.g. 50,000 samples with `grid_size=None`).

Objectives (a two-stage chain gives exactly [`CascadeSimulation`]'s point for each):

- `max-drop` (`max_drop`): fewest relative MACs with at most `max_drop` points lost against the base (integer
  counts); ties: the more accurate.
- `max-drop` with `confidence_level` (`certificate="discordant-binomial"` or `"cp-difference"`): the cheapest
  certified point. For `K = 2` it is [`CascadeSimulation`]'s certificate. For `K > 2`, fixed-sequence testing
  (`hf_tinysaver.calibration.certification`) runs along each of `P` data-free paths through the certificate grid
  (`CHAIN_CERTIFICATE_LAGS`: stage `k > 1` lags or leads stage 1 by a fixed number of grid steps) at level
  `1 - (1 - confidence_level) / P` (Bonferroni over paths): with probability at least `confidence_level`, every
  certified point on every path has a drop of at most `max_drop` on the distribution, so the cheapest is valid.
- `agreement` (`max_disagreement`, `confidence_level=None`): fewest relative MACs with at most that share of
  disagreements with the base; with `confidence_level` the same path-wise fixed sequence on Clopper-Pearson upper
  bounds of the disagreement rate (a chain's disagreement is not monotone in its thresholds, so the two-model
  argument does not carry over).
- `budget` (`relative_macs`): label-free; within the budget, the fewest disagreements with the base, then the most
  MACs (the budget is spent on the larger models).
- `exit-rate` (`exit_rate`): the smallest achievable share of images answered before the base that is at least
  `exit_rate`; ties: fewest disagreements, then fewest MACs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from ..models.confidence import first_exit
from ..models.configuration_tinysaver import validate_threshold
from .bounds import clopper_pearson_upper
from .certification import (
    CERTIFICATE_METHODS,
    DEFAULT_CERTIFICATE,
    certificate_grid,
    certificate_record,
    certify_fixed_sequence,
    drop_upper_bounds,
)
from .checks import check_confidence_level, check_number
from .simulation import CascadeSimulation, InfeasibleTargetError, OperatingPointResult, count_for_rate

CHAIN_OBJECTIVES = ("max-drop", "exit-rate", "budget", "agreement")

# Relative lags (certificate-grid steps) of stage k > 1 behind stage 1 along the data-free certification paths.
CHAIN_CERTIFICATE_LAGS = (0, 25, -25, 50, -50, 100, -100, 200, -200)

DEFAULT_GRID_SIZE = 256
REFINE_POINTS = 16
REFINE_SEEDS = 3
_CHUNK_ROWS = 64


@dataclass
class ChainCalibrationResult(OperatingPointResult):
    """The operating point of a chain an objective picked (or that given thresholds give).

    Attributes:
        objective: Name of the objective (`"thresholds"` for [`ChainSimulation.evaluate`]).
        thresholds: One threshold per saver, the smallest first (`confidence > threshold` exits).
        exit_rates: Share of images answered at each stage, the base's last (sums to 1).
        exit_rate: Share of images answered before the base.
        accuracy: Top-1 accuracy of the chain (None without labels).
        base_accuracy: Top-1 accuracy of the base alone (None without labels).
        relative_macs: Mean MACs per image relative to the base alone.
        agreement: Share of images on which the chain predicts what the base predicts.
        n: Number of images.
        stage_macs: The savers' MACs relative to the base.
        candidates: How many settings of the leading thresholds the search tried (0 for `evaluate`).
        parameters: The objective's parameters and extra facts (flattened into `to_dict()`).
    """

    objective: str
    thresholds: list[float]
    exit_rates: list[float]
    exit_rate: float
    accuracy: float | None
    base_accuracy: float | None
    relative_macs: float
    agreement: float
    n: int
    stage_macs: list[float]
    candidates: int = 0
    parameters: dict[str, Any] = field(default_factory=dict)

    def derived_fields(self) -> dict[str, Any]:
        """`to_dict` also holds the accuracy drop."""
        return {"accuracy_drop": self.accuracy_drop}


class ChainSimulation:
    r"""
    Simulates a chain `s_1 -> ... -> s_{K-1} -> base` on recorded outputs and calibrates all thresholds together.

    See the module docstring of `hf_tinysaver.calibration.chain` for the search and the optimum it finds.

    Args:
        confidences (`Sequence` of `array-like` of shape `(n,)`):
            Each saver's confidence per image ([`compute_confidence`], float64), the first stage first. Use
            [`ChainSimulation.from_logits`] to compute them as the deployed chain does.
        predictions (`Sequence` of `array-like` of shape `(n,)`):
            Each saver's predicted class, in the base's label space.
        base_predictions (`array-like` of shape `(n,)`):
            The base's predicted class.
        labels (`array-like` of shape `(n,)`, *optional*):
            True classes; needed by `max-drop`.
        stage_macs (`Sequence[float]`, *optional*):
            Each saver's MACs relative to the base's (finite, >= 0); zeros by default. They need not increase (a
            chain is simulated exactly in any order; [`~hf_tinysaver.calibration.chain_search`] only builds
            smallest-first chains).

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_tinysaver.calibration.chain import ChainSimulation

    >>> rng = np.random.default_rng(0)
    >>> labels = rng.integers(0, 10, 5000)
    >>> def model(accuracy):  # a confidence, and predictions right more often when confident
    ...     confidence = rng.random(5000)
    ...     right = rng.random(5000) < accuracy + (1 - accuracy) * confidence**2
    ...     return confidence, np.where(right, labels, (labels + 1) % 10)
    >>> (c1, p1), (c2, p2), (_, base) = model(0.6), model(0.75), model(0.9)
    >>> chain = ChainSimulation([c1, c2], [p1, p2], base, labels, stage_macs=[0.05, 0.2])
    >>> result = chain.calibrate("max-drop", max_drop=0.5)
    >>> round(result.accuracy_drop, 9) <= 0.5, len(result.thresholds), len(result.exit_rates)
    (True, 2, 3)
    >>> result.relative_macs == chain.evaluate(result.thresholds).relative_macs
    True
    ```
    """

    def __init__(
        self,
        confidences: Sequence[Any],
        predictions: Sequence[Any],
        base_predictions: Any,
        labels: Any = None,
        stage_macs: Sequence[float] | None = None,
    ):
        if isinstance(confidences, np.ndarray) and confidences.ndim == 2:
            confidences = list(confidences.T)
        if isinstance(predictions, np.ndarray) and predictions.ndim == 2:
            predictions = list(predictions.T)
        num_savers = len(confidences)
        if num_savers < 1:
            raise ValueError("A chain needs at least one saver before the base.")
        if len(predictions) != num_savers:
            raise ValueError(f"Got {num_savers} savers' confidences but {len(predictions)} savers' predictions.")
        stage_macs = [0.0] * num_savers if stage_macs is None else [float(value) for value in stage_macs]
        if len(stage_macs) != num_savers:
            raise ValueError(f"Got {num_savers} savers but {len(stage_macs)} stage_macs; give one per saver.")
        # Each stage's two-model simulation against the base checks lengths, NaN and classes, and gives its curve.
        self.stages = []
        for index, (confidence, prediction, macs) in enumerate(zip(confidences, predictions, stage_macs, strict=True)):
            try:
                self.stages.append(CascadeSimulation(confidence, prediction, base_predictions, labels, macs))
            except ValueError as error:
                raise ValueError(f"Stage {index + 1} of {num_savers}: {error}") from None
        self._init_from_stages(self.stages)

    def _init_from_stages(self, stages: Sequence[CascadeSimulation]) -> None:
        self.stages = list(stages)
        lengths = [stage.n for stage in self.stages]
        if len(set(lengths)) != 1:
            raise ValueError(f"Every stage needs the same images; got {lengths} samples per stage.")
        first = self.stages[0]
        for index, stage in enumerate(self.stages[1:], start=2):
            same_labels = (stage.labels is None) == (first.labels is None) and (
                stage.labels is None or np.array_equal(stage.labels, first.labels)
            )
            if not (np.array_equal(stage.base_predictions, first.base_predictions) and same_labels):
                raise ValueError(f"Stage {index} was simulated against other base predictions or labels than stage 1.")
        self.base_predictions, self.labels = first.base_predictions, first.labels
        self.stage_macs = [stage.relative_saver_macs for stage in self.stages]
        self.confidences = np.stack([stage.confidence for stage in self.stages], axis=1)
        self.predictions = np.stack([stage.saver_predictions for stage in self.stages] + [self.base_predictions], 1)
        # Saving (base units) when an image leaves at stage k instead of reaching the base: the later stages' MACs.
        savings = [1.0]
        for macs in reversed(self.stage_macs[1:]):
            savings.insert(0, macs + savings[0])
        self._savings = np.asarray(savings, dtype=np.float64)
        self._full_cost = sum(self.stage_macs) + 1.0

    @classmethod
    def from_stages(cls, stages: Sequence[CascadeSimulation]) -> ChainSimulation:
        """The chain of several two-model simulations against one base (their curves, already cached, are reused).

        Args:
            stages: One [`CascadeSimulation`] per saver, the first stage first, all with the same base predictions
                and labels; each one's `relative_saver_macs` is that stage's MACs relative to the base.

        Returns:
            The simulation.
        """
        if len(stages) < 1:
            raise ValueError("A chain needs at least one saver before the base.")
        chain = cls.__new__(cls)
        chain._init_from_stages(stages)
        return chain

    @classmethod
    def from_logits(
        cls,
        saver_logits: Sequence[Any],
        base_logits_or_predictions: Any,
        labels: Any = None,
        stage_macs: Sequence[float] | None = None,
        confidence_metrics: str | Sequence[str] = "max_prob",
        temperatures: float | Sequence[float] = 1.0,
        label_mappings: Sequence[Sequence[int] | None] | None = None,
    ) -> ChainSimulation:
        """Builds a chain simulation from each saver's float32 logits, exactly as the deployed stages decide.

        Args:
            saver_logits: One `(n, num_saver_labels)` logits array per saver, the first stage first.
            base_logits_or_predictions: The base's `(n, num_labels)` logits or `(n,)` predicted classes.
            labels: Optional `(n,)` true classes.
            stage_macs: Each saver's MACs relative to the base's.
            confidence_metrics: One metric for all savers or one per saver.
            temperatures: One temperature for all savers or one per saver.
            label_mappings: Per saver, `None` or its saver class -> base class mapping.

        Returns:
            The simulation.
        """
        count = len(saver_logits)
        metrics = [confidence_metrics] * count if isinstance(confidence_metrics, str) else list(confidence_metrics)
        if isinstance(temperatures, (int, float)):
            temperatures = [float(temperatures)] * count
        mappings = [None] * count if label_mappings is None else list(label_mappings)
        if not len(metrics) == len(temperatures) == len(mappings) == count:
            raise ValueError(f"Give one confidence metric, temperature and label mapping per saver ({count}).")
        stages = [
            CascadeSimulation.from_logits(
                logits, base_logits_or_predictions, labels, 0.0, metric, temperature, mapping
            )
            for logits, metric, temperature, mapping in zip(saver_logits, metrics, temperatures, mappings, strict=True)
        ]
        return cls(
            [stage.confidence for stage in stages],
            [stage.saver_predictions for stage in stages],
            stages[0].base_predictions,
            labels,
            stage_macs,
        )

    @property
    def n(self) -> int:
        return self.stages[0].n

    @property
    def num_savers(self) -> int:
        return len(self.stages)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def exit_stages(self, thresholds: Sequence[float]) -> np.ndarray:
        """The stage answering each image (`0 .. K-2` a saver, `K-1` the base), by [`first_exit`]."""
        thresholds = self._check_thresholds(thresholds)
        return first_exit(torch.from_numpy(self.confidences), thresholds).numpy()

    def _check_thresholds(self, thresholds: Sequence[float]) -> list[float]:
        thresholds = list(thresholds)
        if len(thresholds) != self.num_savers:
            raise ValueError(f"The chain has {self.num_savers} savers: give {self.num_savers} thresholds.")
        return [validate_threshold(value, f"thresholds[{index}]") for index, value in enumerate(thresholds)]

    def evaluate(self, thresholds: Sequence[float]) -> ChainCalibrationResult:
        """The operating point of given thresholds on these images (e.g. calibrated ones on a test split).

        Args:
            thresholds: One threshold per saver, the first stage's first.

        Returns:
            A result with `objective="thresholds"`.
        """
        return self._result("thresholds", self._check_thresholds(thresholds), 0, {})

    def _result(self, objective, thresholds, candidates, parameters) -> ChainCalibrationResult:
        stage = self.exit_stages(thresholds)
        n = self.n
        exits = np.bincount(stage, minlength=self.num_savers + 1)
        answer = self.predictions[np.arange(n), stage]
        accuracy = base_accuracy = None
        if self.labels is not None:
            accuracy = int(np.count_nonzero(answer == self.labels)) / n
            base_accuracy = int(np.count_nonzero(self.base_predictions == self.labels)) / n
        saved = float(np.dot(exits[:-1].astype(np.float64), self._savings))
        return ChainCalibrationResult(
            objective=objective,
            thresholds=[float(value) for value in thresholds],
            exit_rates=(exits / n).tolist(),
            exit_rate=int(n - exits[-1]) / n,
            accuracy=accuracy,
            base_accuracy=base_accuracy,
            relative_macs=self._full_cost - saved / n,
            agreement=1.0 - int(np.count_nonzero(answer != self.base_predictions)) / n,
            n=n,
            stage_macs=list(self.stage_macs),
            candidates=candidates,
            parameters=parameters,
        )

    # --- the search -----------------------------------------------------------------------------------------------

    @cached_property
    def _last_order(self) -> dict[str, np.ndarray]:
        """Per-image arrays permuted into the last saver's descending confidence order (ties in image order)."""
        last_index = self.num_savers - 1
        order = self.stages[last_index].sorted_order
        arrays = {"order": order}
        # rank_k: position of each image in stage k's own descending order (stage k exits its top e_k images).
        for k in range(last_index):
            rank = np.empty(self.n, dtype=np.int64)
            rank[self.stages[k].sorted_order] = np.arange(self.n)
            arrays[f"rank{k}"] = rank[order]
        # The last saver's tie group at each sorted position: its cut point `c` exits the groups before `c`.
        arrays["group"] = np.searchsorted(self.stages[-1].curve.exited, np.arange(self.n), side="right") - 1
        disagree = self.predictions[:, :-1] != self.base_predictions[:, None]
        arrays["dis"] = disagree[order]
        if self.labels is not None:
            correct = self.predictions == self.labels[:, None]
            harm, gain = correct[:, -1:] & ~correct[:, :-1], correct[:, :-1] & ~correct[:, -1:]
            arrays["harm"], arrays["gain"] = harm[order], gain[order]
            arrays["loss"] = harm[order].astype(np.int8) - gain[order].astype(np.int8)
        return arrays

    def reaching_last(self, leading_exits: np.ndarray) -> np.ndarray:
        """`(rows, n)` bool, in the last saver's confidence order: which images reach the last saver.

        Row `r` exits, at each leading stage `k`, the `leading_exits[r, k]` most confident images of that stage
        (its cut points: `confidence > threshold`) among those still running: the rule of [`first_exit`], vectorized
        over many settings at once (tests check it against `first_exit`).
        """
        leading_exits = np.asarray(leading_exits, dtype=np.int64).reshape(-1, self.num_savers - 1)
        return np.concatenate([part[3] for part in self._tables(leading_exits, ())])

    def _tables(self, leading_exits: np.ndarray, quantities: Sequence[str], positions: np.ndarray | None = None):
        """Yields, per chunk of rows of leading exit counts, `(chunk, lead, last, reach)`: the vectorized exit rule.

        `lead[q]` is `(rows,)`: the quantity over images leaving at a leading stage (`"exits"`, `"harm"`, `"gain"`,
        `"loss"` = harm - gain, `"dis"`), plus `"savings"` (base units summed over images). `last[q]` is
        `(rows, len(positions))`: column `j` counts over the `positions[j]` most confident images of the last saver
        among those reaching it (`positions` default: the last saver's cut points). `reach` is [`reaching_last`].
        """
        arrays = self._last_order
        last_index = self.num_savers - 1
        if positions is None:
            positions = self.stages[-1].curve.exited
        all_positions = len(positions) == self.n + 1
        _, first_counts = self.stages[0].sorted_counts if last_index else (None, None)
        rows_total = len(leading_exits)
        for start in range(0, rows_total, _CHUNK_ROWS):
            chunk = slice(start, min(start + _CHUNK_ROWS, rows_total))
            exits = leading_exits[chunk]
            rows = len(exits)
            lead = {name: np.zeros(rows, dtype=np.int64) for name in ("exits", "harm", "gain", "loss", "dis")}
            lead["savings"] = np.zeros(rows, dtype=np.float64)
            reach = np.ones((rows, self.n), dtype=bool)
            for k in range(last_index):
                leaves = arrays[f"rank{k}"][None, :] < exits[:, k : k + 1]
                if k == 0:  # everyone reaches the first stage: its own cumulative counts
                    counts = {"dis": first_counts[0][exits[:, 0]], "exits": exits[:, 0]}
                    if self.labels is not None:
                        counts["harm"], counts["gain"] = first_counts[1][exits[:, 0]], first_counts[2][exits[:, 0]]
                else:
                    leaves &= reach
                    counts = {"exits": np.count_nonzero(leaves, axis=1), "dis": None}
                    counts["dis"] = np.count_nonzero(leaves & arrays["dis"][None, :, k], axis=1)
                    if self.labels is not None:
                        counts["harm"] = np.count_nonzero(leaves & arrays["harm"][None, :, k], axis=1)
                        counts["gain"] = np.count_nonzero(leaves & arrays["gain"][None, :, k], axis=1)
                for name, value in counts.items():
                    lead[name] += value
                lead["savings"] += counts["exits"] * self._savings[k]
                reach &= ~leaves
            lead["loss"] = lead["harm"] - lead["gain"]
            last = {}
            for name in quantities:
                if name == "exits":
                    values = reach
                elif name == "loss":
                    values = reach * arrays["loss"][None, :, last_index]
                else:
                    values = reach & arrays[name][None, :, last_index]
                table = np.zeros((rows, self.n + 1), dtype=np.int32)
                # torch's cumsum is about 3x numpy's here; integers, so the counts are exact either way.
                table[:, 1:] = torch.cumsum(torch.from_numpy(values), dim=1, dtype=torch.int32).numpy()
                last[name] = table if all_positions else table[:, positions]
            yield chunk, lead, last, reach

    def _leading_candidates(self, objective: str, parameters: dict, grid_size: int | None) -> list[np.ndarray]:
        """Candidate cut indices per leading stage (into that stage's curve), sorted."""
        candidates = []
        leading = self.num_savers - 1
        per_stage = None if grid_size is None else max(2, int(round(grid_size ** (1.0 / max(leading, 1)))))
        for k in range(leading):
            curve = self.stages[k].curve
            size = len(curve)
            if per_stage is None or size <= per_stage:
                indices = np.arange(size)
            else:
                indices = np.unique(np.linspace(0, size - 1, per_stage).round().astype(np.int64))
            extra = [0, size - 1]
            if k == 0:
                extra += self._greedy_first_cuts(objective, parameters)
            candidates.append(np.unique(np.concatenate([indices, np.asarray(extra, dtype=np.int64)])))
        return candidates

    def _greedy_first_cuts(self, objective: str, parameters: dict) -> list[int]:
        """Cut indices of the first saver chosen greedily: its own two-model calibration, the sequential search."""
        first = self.stages[0]
        thresholds = []
        try:
            thresholds.append(first.calibrate(objective, **parameters).threshold)
        except (InfeasibleTargetError, ValueError):
            pass
        if objective == "max-drop" and self.labels is not None and self.num_savers > 1:
            # The first thresholds of `multi_exit.sequential_thresholds` under each budget split of
            # `search_exit_thresholds`: its first step is this stage's own max-drop at that share of the drop.
            max_drop = float(parameters["max_drop"])
            for step in range(11):
                thresholds.append(first.calibrate("max-drop", max_drop=max_drop * step / 10).threshold)
        curve = first.curve
        descending, _ = first.sorted_counts
        cuts = []
        for threshold in thresholds:
            exited = int(np.count_nonzero(descending > threshold))
            cuts.append(int(np.searchsorted(curve.exited, exited)))
        return cuts

    def _search(self, objective: str, pick, quantities: Sequence[str], parameters: dict, grid_size):
        """Best point over candidate leading cuts x every cut of the last saver; `pick` scores one table chunk."""
        leading = self.num_savers - 1
        curves = [stage.curve for stage in self.stages]
        candidates = self._leading_candidates(objective, self._raw_parameters, grid_size)
        tried = 0

        def best_of(rows: np.ndarray):
            nonlocal tried
            tried += len(rows)
            leading_exits = np.zeros(rows.shape, dtype=np.int64)
            for k in range(leading):
                leading_exits[:, k] = curves[k].exited[rows[:, k]]
            keys, columns = [], []
            for _, lead, last, reach in self._tables(leading_exits, quantities):
                chunk_keys, chunk_columns = pick(lead, last, reach)  # keys (rows, keys) to minimise; column or -1
                keys.append(chunk_keys)
                columns.append(chunk_columns)
            return np.concatenate(keys), np.concatenate(columns)

        def choose(rows: np.ndarray, top: int = 1):
            """The `top` best rows (fewer when fewer are feasible), best first, as (key, row, column)."""
            keys, columns = best_of(rows)
            feasible = np.flatnonzero(columns >= 0)
            order = feasible[np.lexsort(keys[feasible].T[::-1])]
            return [(tuple(keys[i]), rows[i], int(columns[i])) for i in order[:top]]

        def refine(best):
            """Local refinement, one leading stage at a time: between the best cut's evaluated neighbours, up to
            REFINE_POINTS evenly spaced cuts, again around the new best, until every cut in between is evaluated."""
            for k in range(leading):
                evaluated = set(candidates[k].tolist())
                while True:
                    grid = np.array(sorted(evaluated))
                    position = int(np.searchsorted(grid, best[1][k]))
                    low, high = grid[max(position - 1, 0)], grid[min(position + 1, len(grid) - 1)]
                    local = np.setdiff1d(np.arange(low, high + 1), grid)
                    if len(local) == 0:
                        break
                    if len(local) > REFINE_POINTS:
                        local = local[np.unique(np.linspace(0, len(local) - 1, REFINE_POINTS).round().astype(int))]
                    evaluated.update(local.tolist())
                    refined_rows = np.repeat(best[1][None, :], len(local), axis=0)
                    refined_rows[:, k] = local
                    refined = choose(refined_rows)
                    if refined and refined[0][0] < best[0]:
                        best = refined[0]
            return best

        if leading:
            rows = np.array(list(itertools.product(*candidates)), dtype=np.int64)
        else:
            rows = np.zeros((1, 0), dtype=np.int64)
        seeds = choose(rows, top=REFINE_SEEDS if leading else 1)
        best = None
        for seed in seeds:  # the objective is not unimodal in the leading cuts: refine around several
            refined = refine(seed) if leading else seed
            if best is None or refined[0] < best[0]:
                best = refined
        if best is None:
            return None
        _, row, column = best
        # Among the last saver's cuts that exit the same images reaching it, the highest threshold.
        row_exits = np.asarray([[curves[k].exited[row[k]] for k in range(leading)]], dtype=np.int64)
        exits_of_row = next(self._tables(row_exits.reshape(1, leading), ("exits",)))[2]["exits"][0]
        column = int(np.argmax(exits_of_row == exits_of_row[column]))
        thresholds = [curves[k].thresholds[row[k]] for k in range(leading)] + [curves[-1].thresholds[column]]
        return self._result(objective, thresholds, tried, parameters)

    def calibrate(self, objective: str, grid_size: int | None = DEFAULT_GRID_SIZE, **parameters):
        """Picks all thresholds of one objective together (see the module docstring for objectives and optimum).

        Args:
            objective: One of `CHAIN_OBJECTIVES`.
            grid_size: Most settings of the leading thresholds tried before the local refinement (None: every cut
                point, the exact optimum; for `K = 2` there is no leading stage and the optimum is always exact).
            **parameters: The objective's parameters, as for [`CascadeSimulation.calibrate`].

        Returns:
            A [`ChainCalibrationResult`].

        Raises:
            InfeasibleTargetError: When no setting meets the target (e.g. a budget below the first saver's cost).
        """
        if grid_size is not None and (int(grid_size) != grid_size or grid_size < 1):
            raise ValueError(f"grid_size must be a positive integer or None, got {grid_size}.")
        methods = {
            "max-drop": self._max_drop,
            "exit-rate": self._exit_rate,
            "budget": self._budget,
            "agreement": self._agreement,
        }
        if objective not in methods:
            hint = (
                " ('paper-no-loss' is defined for one saver: use CascadeSimulation)"
                if objective == "paper-no-loss"
                else ""
            )
            raise ValueError(f"Unknown chain objective {objective!r}; choose one of {CHAIN_OBJECTIVES}{hint}.")
        self._raw_parameters = dict(parameters)
        try:
            return methods[objective](grid_size=grid_size, **parameters)
        except TypeError as error:
            raise TypeError(f"Wrong parameters for objective {objective!r}: {error}") from None

    def _require_labels(self, objective: str) -> None:
        if self.labels is None:
            raise ValueError(f"The {objective!r} objective needs labels; or use 'agreement', 'exit-rate' or 'budget'.")

    def _last_feasible_rows(self, lead, reach, name: str, allowed: int):
        """Per row, the last cut of the last saver at which `lead[name]` plus the count of `name` among the images
        reaching it and exiting there is at most `allowed` (-1: none); keys `(-savings, count)`.

        Row by row over the images reaching the last saver only (a cumulative sum over them, read at the end of each
        of their tie groups): counts only change at those groups, so the cuts between them form segments.
        """
        arrays = self._last_order
        values, groups = arrays[name][:, -1], arrays["group"]
        last_column = len(self.stages[-1].curve) - 1
        keys = np.zeros((len(reach), 2))
        columns = np.full(len(reach), -1, dtype=np.int64)
        distinct = last_column == self.n  # no ties: every image is its own group, and group == position
        for r in range(len(reach)):
            positions = np.flatnonzero(reach[r])
            cumulative = np.zeros(len(positions) + 1, dtype=np.int64)
            np.cumsum(values[positions], out=cumulative[1:])
            # Segment 0: cuts 0 .. first group (nothing of these exits); segment i: after the i-th group's end.
            if distinct:
                totals, exits = lead[name][r] + cumulative, np.arange(len(positions) + 1)
                segment_end = np.append(positions, last_column)
            else:
                group = groups[positions]
                ends = np.flatnonzero(np.append(group[1:] != group[:-1], True)) if len(positions) else positions
                totals = lead[name][r] + cumulative[np.append(0, ends + 1)]
                segment_end = np.append(group[ends], last_column)
                exits = np.append(0, ends + 1)
            feasible = np.flatnonzero(totals <= allowed)
            if len(feasible) == 0:
                continue
            segment = feasible[-1]
            columns[r] = segment_end[segment]
            keys[r] = (-(lead["savings"][r] + exits[segment]), totals[segment])
        return keys, columns

    def _max_drop(self, grid_size, max_drop: float, confidence_level: float | None = None, certificate=None):
        self._require_labels("max-drop")
        max_drop = check_number("max_drop", max_drop, meaning="the allowed top-1 drop in points, e.g. 0.5")
        parameters = {"max_drop": max_drop, "confidence_level": confidence_level}
        if certificate is not None and confidence_level is None:
            raise ValueError(f"certificate={certificate!r} needs a confidence_level (e.g. 0.95).")
        if confidence_level is not None:
            return self._certified("max-drop", max_drop, confidence_level, certificate, parameters)
        allowed_loss = math.floor(round(max_drop / 100.0 * self.n, 9))

        def pick(lead, last, reach):
            return self._last_feasible_rows(lead, reach, "loss", allowed_loss)

        return self._search("max-drop", pick, (), parameters, grid_size)

    def _agreement(self, grid_size, max_disagreement: float, confidence_level: float | None = None):
        max_disagreement = check_number(
            "max_disagreement", max_disagreement, 0.0, 1.0, meaning="a fraction of samples"
        )
        parameters = {"max_disagreement": float(max_disagreement), "confidence_level": confidence_level}
        if confidence_level is not None:
            return self._certified("agreement", max_disagreement, confidence_level, None, parameters)
        allowed = math.floor(round(max_disagreement * self.n, 9))

        def pick(lead, last, reach):
            return self._last_feasible_rows(lead, reach, "dis", allowed)

        return self._search("agreement", pick, (), parameters, grid_size)

    def _first_reaching_rows(self, reach, enough):
        """Per row, the first cut of the last saver at which `enough(row, count)` holds, `count` the images reaching
        it that exit there (non-decreasing along the cuts); with that count and their disagreements with the base.

        Returns `(columns, counts, disagreements)`; column -1 where no cut is enough.
        """
        arrays = self._last_order
        groups, disagree = arrays["group"], arrays["dis"][:, -1]
        columns = np.full(len(reach), -1, dtype=np.int64)
        counts = np.zeros(len(reach), dtype=np.int64)
        disagreements = np.zeros(len(reach), dtype=np.int64)
        for r in range(len(reach)):
            positions = np.flatnonzero(reach[r])
            if enough(r, 0):
                columns[r] = 0
                continue
            if not enough(r, len(positions)):
                continue
            low, high = 0, len(positions)  # enough(high) and not enough(low): bisect on the count
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if enough(r, middle) else (middle, high)
            group = groups[positions[high - 1]]  # the group of the last image needed: the whole group exits
            count = int(np.searchsorted(groups[positions], group, side="right"))
            columns[r], counts[r] = group + 1, count
            disagreements[r] = np.count_nonzero(disagree[positions[:count]])
        return columns, counts, disagreements

    def _budget(self, grid_size, relative_macs: float):
        relative_macs = check_number(
            "relative_macs", relative_macs, 0.0, meaning="the budget in base-model equivalents, e.g. 0.5"
        )
        parameters = {"target_relative_macs": float(relative_macs)}
        cheapest = self.stage_macs[0]
        if relative_macs < cheapest - 1e-12:
            raise InfeasibleTargetError(
                f"A budget of {relative_macs} relative MACs is below the first saver's own cost ({cheapest:.4g}), "
                f"which every image pays. Raise the budget to at least {cheapest:.4g} or pick a smaller first saver."
            )
        # Savings needed, in base units summed over images; the same rounding as the two-model budget.
        needed = round((self._full_cost - relative_macs) * self.n, 9)
        tolerance = 1e-9 * max(self.n, 1)

        def pick(lead, last, reach):
            def enough(row, count):
                return lead["savings"][row] + count >= needed - tolerance

            columns, exits, disagreements = self._first_reaching_rows(reach, enough)
            savings = lead["savings"] + exits
            return np.stack([(lead["dis"] + disagreements).astype(np.float64), savings], axis=1), columns

        result = self._search("budget", pick, (), parameters, grid_size)
        if result is None:  # a budget between the first saver's cost and what the candidates reach
            raise InfeasibleTargetError(f"No candidate setting meets a budget of {relative_macs} relative MACs.")
        return result

    def _exit_rate(self, grid_size, exit_rate: float):
        exit_rate = check_number("exit_rate", exit_rate, 0.0, 1.0, meaning="a fraction of samples")
        needed = count_for_rate(exit_rate, self.n)
        parameters = {"target_exit_rate": float(exit_rate)}

        def pick(lead, last, reach):
            def enough(row, count):
                return lead["exits"][row] + count >= needed

            columns, exits, disagreements = self._first_reaching_rows(reach, enough)
            keys = [lead["exits"] + exits, lead["dis"] + disagreements, -(lead["savings"] + exits)]
            return np.stack(keys, axis=1).astype(np.float64), columns

        return self._search("exit-rate", pick, (), parameters, grid_size)

    # --- certified objectives ---------------------------------------------------------------------------------------

    def _certified(self, objective, target, confidence_level, certificate, parameters):
        """Cheapest point certified by fixed-sequence testing along data-free paths (see the module docstring)."""
        confidence_level = check_confidence_level(confidence_level)
        if objective == "max-drop":
            certificate = DEFAULT_CERTIFICATE if certificate is None else certificate
            if certificate not in CERTIFICATE_METHODS:
                raise ValueError(f"Unknown certificate {certificate!r}; choose one of {CERTIFICATE_METHODS}.")
        if self.num_savers == 1:  # the two-model cascade: its own certificate, unchanged
            extra = {"certificate": certificate} if objective == "max-drop" else {}
            point = self.stages[0].calibrate(
                objective,
                confidence_level=confidence_level,
                **extra,
                **{"max-drop": {"max_drop": target}, "agreement": {"max_disagreement": target}}[objective],
            )
            keep = {
                key: point.parameters[key] for key in ("certificate", "certified_points") if key in point.parameters
            }
            return self._result(objective, [point.threshold], 1, {**parameters, **keep})
        if certificate == "clopper-pearson":
            raise ValueError(
                "certificate='clopper-pearson' relies on harms and gains growing as one threshold falls, which does "
                "not hold for a chain; use 'discordant-binomial' or 'cp-difference'."
            )
        grid = certificate_grid()
        size = len(grid)
        lags = list(itertools.product(CHAIN_CERTIFICATE_LAGS, repeat=self.num_savers - 1))
        level = 1.0 - (1.0 - confidence_level) / len(lags)
        paths = []
        for lag in lags:
            offsets = np.asarray((0, *lag), dtype=np.int64)
            offsets -= offsets.min()
            steps = np.arange(size + offsets.max())
            paths.append(np.clip(steps[:, None] - offsets[None, :], 0, size - 1))
        points = np.unique(np.concatenate(paths), axis=0)  # distinct grid-index vectors
        leading_rows, row_of_point = np.unique(points[:, :-1], axis=0, return_inverse=True)
        row_of_point = row_of_point.reshape(-1)
        quantities = ("exits", "harm", "gain") if objective == "max-drop" else ("exits", "dis")
        # Grid threshold -> number of images above it, per stage (`confidence > threshold` exits).
        above = np.stack(
            [np.searchsorted(-stage.sorted_counts[0], -grid, side="left") for stage in self.stages], axis=1
        )
        leading_exits = np.stack([above[leading_rows[:, k], k] for k in range(self.num_savers - 1)], axis=1)
        positions, column_of_point = np.unique(above[points[:, -1], -1], return_inverse=True)
        column_of_point = column_of_point.reshape(-1)
        parts = list(self._tables(leading_exits, quantities, positions))
        lead = {name: np.concatenate([part[1][name] for part in parts]) for name in parts[0][1]}
        last = {name: np.concatenate([part[2][name] for part in parts]) for name in quantities}
        counts = {name: lead[name][row_of_point] + last[name][row_of_point, column_of_point] for name in quantities}
        savings = lead["savings"][row_of_point] + last["exits"][row_of_point, column_of_point]
        if objective == "max-drop":
            bounds = drop_upper_bounds(counts["harm"], counts["gain"], self.n, level, certificate)
            loss = counts["harm"] - counts["gain"]
            target_fraction = target / 100.0
        else:
            bounds = clopper_pearson_upper(counts["dis"], self.n, level)
            loss = counts["dis"]
            target_fraction = target
        bounds = np.where((points == 0).all(axis=1), 0.0, bounds)  # all thresholds 1.0: nothing exits, certain
        index_of = {tuple(point): i for i, point in enumerate(points)}
        certified = set()
        for path in paths:
            along = np.array([index_of[tuple(point)] for point in path])
            certified.update(along[: certify_fixed_sequence(bounds[along], target_fraction)].tolist())
        certified = np.array(sorted(certified))
        best = certified[np.lexsort((loss[certified], -savings[certified]))[0]]
        thresholds = [float(grid[index]) for index in points[best]]
        if objective == "max-drop":
            record = certificate_record(
                certificate,
                target,
                confidence_level,
                self.n,
                thresholds[0],
                bounds[best],
                procedure=f"fixed-sequence along {len(paths)} data-free paths (Bonferroni)",
                paths=len(paths),
            )
        else:
            record = {
                "method": "clopper-pearson",
                "target": float(target),
                "level": float(confidence_level),
                "n": self.n,
                "bound": float(bounds[best]),
                "paths": len(paths),
            }
        record["threshold"] = thresholds
        return self._result(
            objective,
            thresholds,
            len(points),
            {**parameters, "certificate": record, "certified_points": int(len(certified))},
        )


__all__ = ["CHAIN_CERTIFICATE_LAGS", "CHAIN_OBJECTIVES", "ChainCalibrationResult", "ChainSimulation"]
