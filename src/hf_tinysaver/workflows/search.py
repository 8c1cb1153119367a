"""Saver search: which of several candidate savers gives a base model the cheapest TinySaver cascade.

Every candidate and the base are recorded once on a labelled split (cached, distributed like [`record`]); each
candidate is then scored from those records alone:

- **Rank** (the ranking key): the cascade's relative MACs (cost per image / the base's) at the primary allowed
  accuracy drop (`primary_max_drop`, default 0.5 points), i.e. the cost of the cascade `calibrate_cascade(...,
  objective="max-drop")` would deploy. Lower is better. Ties (equal relative MACs: the same exit count at the same
  cost) are broken by the paper's ΔC, then by fewer MACs, then by name. A candidate whose target is infeasible
  (possible only with a negative drop) ranks after every feasible one.
- **ΔC** (reported beside, with the paper's own ranking in `paper_rank`): `s - r` at the paper's no-loss point
  (`paper-no-loss`, 0.001 grid). The paper ranks savers by it, but that point hinges on the first grid step where
  the saver loses to the base on the exited images, which is noisy and grid-dependent (see the design notes), and it
  ignores the accuracy the user is willing to give up. The relative MACs at an allowed drop is the cost actually
  paid at the operating point actually deployed.

A candidate is rejected, with the reason, when its label space differs from the base's (mapped label sets are out
of scope here) or when its MACs are not below the base's.

Pre-screen (`prescreen=True`) for large pools. With `s` = candidate MACs / base MACs, `r` its exit rate at the
primary drop `d`, and `a`, `a_B` the candidate's and the base's top-1 accuracy on the search split, the cascade's
relative MACs `s + 1 - r` is at least

    oracle(d) = s + max(0, a_B - a - d)

because the exited images must satisfy `harms - gains <= d n` (`harms`: exited images the base gets right and the
saver wrong, `gains` the reverse), and the most images that can exit is every image but the
`max(0, H - G - d n)` harm images that do not fit, where `H - G = (a_B - a) n` whatever the two models' joint errors
are. It is the cost of the best threshold-free (oracle) exit rule at that drop. Without a known accuracy the bound is
`s`. Candidates are recorded in order of increasing bound; one whose bound is greater than the best relative MACs
found so far cannot rank first and is skipped before it is recorded. The rule is sound when the MACs used are the
candidate's MACs (as they are in the scores) and any tabulated accuracy is at least its accuracy on the search split
(an optimistic accuracy only weakens the bound); the base accuracy is always measured on the split.

Example:

```python
>>> import numpy as np
>>> from hf_tinysaver.records import Records
>>> from hf_tinysaver.workflows.search import SaverCandidate, rank_savers

>>> rng = np.random.default_rng(0)
>>> labels = rng.integers(0, 10, 2000)

>>> def records(name, signal):
...     logits = rng.normal(size=(2000, 10)).astype(np.float32) + signal * np.eye(10, dtype=np.float32)[labels]
...     return Records(logits, logits.argmax(1), labels, name, name, "toy", "test")

>>> base = records("base", 5.0)
>>> result = rank_savers(
...     base,
...     base_macs=100e6,
...     candidates=[SaverCandidate("small", 10e6, records("small", 2.0)), SaverCandidate("mid", 40e6, records("mid", 4.0))],
... )
>>> [(c.name, c.rank) for c in result.candidates]
[('mid', 1), ('small', 2)]
>>> result.winner.relative_macs["0.5"] < 1.0
True
```
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..calibration.simulation import CalibrationResult, CascadeSimulation, InfeasibleTargetError
from ..records import Records, pair_from_records

logger = logging.getLogger(__name__)

DEFAULT_MAX_DROPS = (0.0, 0.5, 1.0)
DEFAULT_PRIMARY_MAX_DROP = 0.5
RANKING_RULE = (
    "relative MACs of the cascade calibrated with max-drop at the primary allowed drop, lowest first; ties by the "
    "paper's delta C, then fewer MACs, then name; infeasible targets last"
)
PRESCREEN_RULE = (
    "record candidates by increasing lower bound s + max(0, base accuracy - candidate accuracy - primary drop) "
    "(s = MACs / base MACs; the accuracy term only with a tabulated accuracy); skip a candidate whose bound exceeds "
    "the best relative MACs found so far"
)
# Float slack on the pre-screen bound: it may only ever be lowered, never raised above a value a candidate reaches.
_BOUND_SLACK = 1e-9


def drop_key(max_drop: float) -> str:
    """The key of an allowed drop (in points) in the per-drop dicts: `repr(float(max_drop))`, e.g. `"0.5"`."""
    return repr(float(max_drop))


def oracle_relative_macs_at_drop(
    relative_saver_macs: float, saver_accuracy: float | None, base_accuracy: float | None, max_drop: float
) -> float:
    """The lowest relative MACs any exit rule of a saver and a base can reach within an allowed accuracy drop.

    An oracle exits every image but the fewest harmful ones (saver wrong, base right) that keep the drop within
    `max_drop` points: `relative_saver_macs + max(0, base_accuracy - saver_accuracy - max_drop / 100)`. It depends
    only on the two accuracies, so it bounds every threshold of the saver's confidence from below.

    Args:
        relative_saver_macs: Saver MACs / base MACs.
        saver_accuracy: The saver's top-1 accuracy on the split (None: unknown, the bound is `relative_saver_macs`).
        base_accuracy: The base's top-1 accuracy on the same split (None: unknown).
        max_drop: The allowed drop in points.

    Returns:
        The bound.
    """
    if saver_accuracy is None or base_accuracy is None:
        return float(relative_saver_macs)
    return float(relative_saver_macs) + max(0.0, float(base_accuracy) - float(saver_accuracy) - max_drop / 100.0)


@dataclass
class SaverCandidate:
    """One candidate saver for [`rank_savers`].

    Attributes:
        name: Unique name in the results.
        macs: The candidate's MACs per image (same counting as `base_macs`); may be None for a rejected one.
        records: Its [`Records`] on the search split, or a zero-argument callable that records them on demand (so
            that the pre-screen can skip it unrecorded). None only for a rejected candidate.
        accuracy: For the pre-screen: its top-1 accuracy on the search split, or any value at least as high (e.g.
            from a table); None when unknown.
        rejection: Why the candidate was rejected before recording (e.g. another label space), or None.
    """

    name: str
    macs: float | None
    records: Records | Callable[[], Records] | None = None
    accuracy: float | None = None
    rejection: str | None = None


@dataclass
class CandidateScore:
    """How one candidate saver scored (or why it was not scored).

    Per-drop dicts are keyed by [`drop_key`] (e.g. `"0.5"`); their values are None when the target is infeasible.

    Attributes:
        name: The candidate's name.
        status: `"ranked"`, `"rejected"` (label space or MACs) or `"skipped"` (by the pre-screen).
        macs: MACs per image.
        relative_saver_macs: MACs / base MACs.
        accuracy: The saver's own top-1 accuracy on the split.
        delta_c: The paper's ΔC = `s - r` at its no-loss point (lower is better).
        paper_exit_rate: The exit rate at that point.
        paper_threshold: The grid threshold of that point.
        relative_macs: Cascade cost / base cost at each allowed drop.
        exit_rate: Exit rate at each allowed drop.
        cascade_accuracy: Cascade top-1 accuracy at each allowed drop.
        threshold: The calibrated threshold at each allowed drop.
        oracle_relative_macs: Cost of the oracle that runs the base only where the saver is wrong and the base right.
        lower_bound: The pre-screen's lower bound on the primary relative MACs (with the pre-screen on).
        rank: 1 = best by the ranking rule (None unless ranked).
        paper_rank: Rank by ΔC, as the paper ranks (None unless ranked).
        reason: Why it was rejected or skipped.
    """

    name: str
    status: str
    macs: float | None = None
    relative_saver_macs: float | None = None
    accuracy: float | None = None
    delta_c: float | None = None
    paper_exit_rate: float | None = None
    paper_threshold: float | None = None
    relative_macs: dict[str, float | None] = field(default_factory=dict)
    exit_rate: dict[str, float | None] = field(default_factory=dict)
    cascade_accuracy: dict[str, float | None] = field(default_factory=dict)
    threshold: dict[str, float | None] = field(default_factory=dict)
    oracle_relative_macs: float | None = None
    lower_bound: float | None = None
    rank: int | None = None
    paper_rank: int | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with stable keys."""
        return {
            "name": self.name,
            "status": self.status,
            "rank": self.rank,
            "paper_rank": self.paper_rank,
            "macs": int(self.macs) if self.macs is not None and float(self.macs).is_integer() else self.macs,
            "relative_saver_macs": self.relative_saver_macs,
            "accuracy": self.accuracy,
            "delta_c": self.delta_c,
            "paper_exit_rate": self.paper_exit_rate,
            "paper_threshold": self.paper_threshold,
            "relative_macs": dict(self.relative_macs),
            "exit_rate": dict(self.exit_rate),
            "cascade_accuracy": dict(self.cascade_accuracy),
            "threshold": dict(self.threshold),
            "oracle_relative_macs": self.oracle_relative_macs,
            "lower_bound": self.lower_bound,
            "reason": self.reason,
        }


def score_simulation(
    name: str,
    simulation: CascadeSimulation,
    macs: float,
    max_drops: Sequence[float] = DEFAULT_MAX_DROPS,
    confidence_level: float | None = None,
) -> tuple[CandidateScore, dict[str, CalibrationResult | None]]:
    """Scores one saver's cascade simulation: ΔC, the oracle, and the max-drop operating point at each drop.

    Args:
        name: The candidate's name.
        simulation: Its labelled [`CascadeSimulation`] with the base.
        macs: Its MACs per image.
        max_drops: Allowed top-1 drops in points.
        confidence_level: Passed to the `max-drop` objective (guarantee mode) when given.

    Returns:
        The score (status `"ranked"`, no rank yet) and the operating point per drop key (None where infeasible).
    """
    if not simulation.has_labels:
        raise ValueError("Scoring savers needs labels; record a labelled split.")
    paper = simulation.calibrate("paper-no-loss")
    score = CandidateScore(
        name=name,
        status="ranked",
        macs=float(macs),
        relative_saver_macs=simulation.relative_saver_macs,
        accuracy=simulation.saver_accuracy,
        delta_c=paper.delta_c,
        paper_exit_rate=paper.exit_rate,
        paper_threshold=paper.threshold,
        oracle_relative_macs=simulation.oracle_relative_macs(),
    )
    points: dict[str, CalibrationResult | None] = {}
    for max_drop in max_drops:
        key = drop_key(max_drop)
        try:
            point = simulation.calibrate("max-drop", max_drop=float(max_drop), confidence_level=confidence_level)
        except InfeasibleTargetError:
            point = None
        points[key] = point
        score.relative_macs[key] = None if point is None else point.relative_macs
        score.exit_rate[key] = None if point is None else point.exit_rate
        score.cascade_accuracy[key] = None if point is None else point.accuracy
        score.threshold[key] = None if point is None else point.threshold
    return score, points


def _primary_value(score: CandidateScore, primary_key: str) -> float:
    value = score.relative_macs.get(primary_key)
    return math.inf if value is None else value


def rank_scores(scores: Sequence[CandidateScore], primary_max_drop: float = DEFAULT_PRIMARY_MAX_DROP) -> None:
    """Sets `rank` (the ranking rule, see the module docstring) and `paper_rank` (by ΔC) of the ranked scores.

    Args:
        scores: Candidate scores; only those with status `"ranked"` get ranks.
        primary_max_drop: The allowed drop whose relative MACs ranks.
    """
    ranked = [score for score in scores if score.status == "ranked"]
    primary_key = drop_key(primary_max_drop)

    # Rounded so that float noise between two candidates of equal cost does not decide; real differences are far
    # larger (one image of 1,000 is 1e-3).
    def ranking_key(score: CandidateScore):
        return (round(_primary_value(score, primary_key), 12), round(score.delta_c, 12), score.macs, score.name)

    for rank, score in enumerate(sorted(ranked, key=ranking_key), start=1):
        score.rank = rank
    for rank, score in enumerate(sorted(ranked, key=lambda s: (round(s.delta_c, 12), s.macs, s.name)), start=1):
        score.paper_rank = rank


@dataclass
class SearchResult:
    """The outcome of a saver search: every candidate's score, rank or reason, and the winner.

    Attributes:
        base: The base model's name.
        base_macs: Its MACs per image.
        base_accuracy: Its top-1 accuracy on the split.
        n: Number of images in the split.
        max_drops: The allowed drops (points) scored.
        primary_max_drop: The drop whose relative MACs ranks.
        candidates: Ranked candidates by rank, then the skipped, then the rejected.
        confidence: The saver confidence metric.
        confidence_level: Guarantee level of the `max-drop` objective, or None.
        prescreen: Whether the pre-screen was on.
        dataset: Readable dataset name.
        split: The split.
        shuffle_seed: The seed of the permutation applied to the split before slicing, or None.
        label_map: The dataset class -> model class map the labels were read with, or None.
        scoring_seconds: Time spent scoring from records (recording excluded).
        simulations: Each ranked candidate's [`CascadeSimulation`] (not serialised).
        operating_points: Each ranked candidate's operating point per drop key (not serialised).
        sources: Candidate name -> what it was loaded from, and `base_source` (set by [`search_savers`]).
    """

    base: str
    base_macs: float
    base_accuracy: float
    n: int
    max_drops: tuple[float, ...]
    primary_max_drop: float
    candidates: list[CandidateScore]
    confidence: str = "max_prob"
    confidence_level: float | None = None
    prescreen: bool = False
    dataset: str | None = None
    split: str | None = None
    shuffle_seed: int | None = None
    label_map: Any = field(default=None, repr=False)
    scoring_seconds: float = 0.0
    simulations: dict[str, CascadeSimulation] = field(default_factory=dict, repr=False)
    operating_points: dict[str, dict[str, CalibrationResult | None]] = field(default_factory=dict, repr=False)
    sources: dict[str, Any] = field(default_factory=dict, repr=False)
    base_source: Any = field(default=None, repr=False)
    dataset_source: Any = field(default=None, repr=False)

    @property
    def ranked(self) -> list[CandidateScore]:
        return sorted((c for c in self.candidates if c.status == "ranked"), key=lambda c: c.rank)

    @property
    def winner(self) -> CandidateScore | None:
        """The rank-1 candidate when its cascade costs less than the base alone at the primary drop, else None."""
        ranked = self.ranked
        if not ranked:
            return None
        best = ranked[0]
        value = best.relative_macs.get(drop_key(self.primary_max_drop))
        return best if value is not None and value < 1.0 else None

    @property
    def paper_winner(self) -> CandidateScore | None:
        """The candidate the paper's rule picks (lowest ΔC), or None when nothing was ranked."""
        return next((c for c in self.candidates if c.paper_rank == 1), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with stable, self-describing keys."""
        from ..models.configuration_tinysaver import TINYSAVER_VERSION

        winner, paper_winner = self.winner, self.paper_winner
        return {
            "base": self.base,
            "base_macs": self.base_macs,
            "base_accuracy": self.base_accuracy,
            "dataset": self.dataset,
            "split": self.split,
            "shuffle_seed": self.shuffle_seed,
            "n": self.n,
            "max_drops": list(self.max_drops),
            "primary_max_drop": self.primary_max_drop,
            "confidence": self.confidence,
            "confidence_level": self.confidence_level,
            "ranking_rule": RANKING_RULE,
            "winner": winner.name if winner else None,
            "paper_winner": paper_winner.name if paper_winner else None,
            "prescreen": {
                "enabled": self.prescreen,
                "rule": PRESCREEN_RULE,
                "skipped": [c.name for c in self.candidates if c.status == "skipped"],
            },
            "rejected": {c.name: c.reason for c in self.candidates if c.status == "rejected"},
            "scoring_seconds": self.scoring_seconds,
            "candidates": [c.to_dict() for c in self.candidates],
            "date": datetime.date.today().isoformat(),
            "hf_tinysaver_version": TINYSAVER_VERSION,
        }

    def csv_rows(self) -> list[list[Any]]:
        """The candidates as CSV rows (header first), one column per drop for the per-drop values."""
        keys = [drop_key(d) for d in self.max_drops]
        per_drop = ("relative_macs", "exit_rate", "cascade_accuracy", "threshold")
        header = ["rank", "paper_rank", "name", "status", "macs", "relative_saver_macs", "accuracy", "delta_c"]
        header += [f"{name}_drop_{key}" for name in per_drop for key in keys]
        header += ["oracle_relative_macs", "lower_bound", "reason"]
        rows: list[list[Any]] = [header]
        for candidate in self.candidates:
            values = candidate.to_dict()
            row = [values[name] for name in header[:8]]
            row += [values[name].get(key) for name in per_drop for key in keys]
            row += [values[name] for name in header[-3:]]
            rows.append(["" if value is None else value for value in row])
        return rows

    def write(self, results_file: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
        """Writes the results as JSON and, beside it with the same basename, as CSV (both atomically).

        Args:
            results_file: The JSON path, e.g. `"search.json"`; the CSV goes to `"search.csv"`.
            extra: More top-level keys for the JSON (e.g. a held-out evaluation). The JSON also carries
                `provenance` ([`~hf_tinysaver.provenance.provenance`]: versions, device, threads, command).

        Returns:
            The JSON and CSV paths.
        """
        from ..provenance import PROVENANCE_KEY, provenance
        from ..records import distributed_state
        from ..storage import write_json_atomic, write_text_atomic

        state = distributed_state()
        device = state.device if state.num_processes > 1 else None
        json_path = Path(results_file)
        csv_path = json_path.with_suffix(".csv")
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(self.csv_rows())
        write_json_atomic(json_path, self.to_dict() | {PROVENANCE_KEY: provenance(device=device)} | dict(extra or {}))
        write_text_atomic(csv_path, buffer.getvalue())
        return json_path, csv_path

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Plots every ranked candidate's accuracy-vs-relative-MACs curve, the Pareto frontier over all of them,
        the base, and the winner's operating point at the primary drop (PNG, written atomically)."""
        from ..plotting import plot_tradeoff

        ranked = self.ranked
        if not ranked:
            raise ValueError("No candidate was ranked, so there is no curve to plot.")
        winner = self.winner
        # Only the winner's point is annotated: one label per candidate would pile up where the curves meet.
        points = {winner.name: self.operating_points[winner.name][drop_key(self.primary_max_drop)]} if winner else {}
        return plot_tradeoff(
            path,
            {c.name: self.simulations[c.name].curve for c in ranked},
            base_accuracy=self.base_accuracy,
            base_name=self.base,
            operating_points=points,
            show_frontier=True,
            title=title or f"Savers for {self.base} on {self.dataset} {self.split}",
        )

    def table(self) -> str:
        """The ranking as a plain-text table, one line per candidate, with the reasons of rejects and skips."""
        keys = [drop_key(d) for d in self.max_drops]
        primary_key = drop_key(self.primary_max_drop)
        header = ["rank", "candidate", "MACs (M)", "top-1 %", "ΔC", *[f"rel. MACs @{k}" for k in keys]]
        header += [f"exit @{primary_key}", "paper rank"]
        lines = [header]

        def number(value: float | None, digits: int = 4) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        for c in self.candidates:
            if c.status != "ranked":
                continue
            row = [str(c.rank), c.name, number(c.macs / 1e6, 1), number(100 * c.accuracy, 2), number(c.delta_c)]
            row += [number(c.relative_macs.get(k)) for k in keys]
            row += [number(c.exit_rate.get(primary_key)), str(c.paper_rank)]
            lines.append(row)
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = [
            "  ".join(
                cell.ljust(width) if i == 1 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(line, widths, strict=True))
            )
            for line in lines
        ]
        text.insert(
            0,
            f"Base {self.base}: {self.base_macs / 1e6:.1f} M MACs, top-1 {100 * self.base_accuracy:.2f} % on "
            f"{self.dataset} {self.split} (n={self.n}). Ranked by {RANKING_RULE}.",
        )
        for c in self.candidates:
            if c.status != "ranked":
                text.append(f"{c.status}: {c.name}: {c.reason}")
        winner = self.winner
        if winner is None:
            text.append(
                f"No candidate makes the cascade cheaper than {self.base} alone at a {self.primary_max_drop}-point "
                "drop."
            )
            return "\n".join(text)
        text.append(
            f"Winner: {winner.name} (relative MACs {winner.relative_macs[primary_key]:.4f} at a "
            f"{self.primary_max_drop}-point drop)."
        )
        if winner.exit_rate[primary_key] == 1.0:
            text.append(
                f"Every image exits at {winner.name}: on this split it alone meets the allowed drop, so the cascade "
                "never runs the base."
            )
        return "\n".join(text)


def rank_savers(
    base_records: Records,
    base_macs: float,
    candidates: Sequence[SaverCandidate],
    max_drops: Sequence[float] = DEFAULT_MAX_DROPS,
    primary_max_drop: float = DEFAULT_PRIMARY_MAX_DROP,
    confidence: str = "max_prob",
    confidence_level: float | None = None,
    prescreen: bool = False,
    base_name: str | None = None,
) -> SearchResult:
    r"""
    Scores and ranks candidate savers for one base from per-sample records on the same labelled split.

    See the module docstring for the ranking rule and the pre-screen. Candidates whose MACs are not below the base's,
    or whose records have another number of classes, are rejected with the reason.

    Args:
        base_records ([`Records`]):
            The base's records on the search split (labelled).
        base_macs (`float`):
            The base's MACs per image.
        candidates (`Sequence[SaverCandidate]`):
            The candidates, with their records (or callables that record them) on the same split.
        max_drops (`Sequence[float]`, *optional*, defaults to `(0.0, 0.5, 1.0)`):
            Allowed top-1 drops in points at which every candidate is scored.
        primary_max_drop (`float`, *optional*, defaults to 0.5):
            The drop whose relative MACs ranks (added to `max_drops` when missing).
        confidence (`str`, *optional*, defaults to `"max_prob"`):
            The saver's confidence metric.
        confidence_level (`float`, *optional*):
            Guarantee level of the `max-drop` objective (see [`CascadeSimulation.calibrate`]).
        prescreen (`bool`, *optional*, defaults to `False`):
            Skip, unrecorded, the candidates that provably cannot rank first.
        base_name (`str`, *optional*):
            The base's name in the results (defaults to `base_records.model_name`).

    Returns:
        [`SearchResult`]
    """
    if base_records.labels is None:
        raise ValueError("The saver search needs labels; record the base on a labelled split.")
    if not base_macs or base_macs <= 0:
        raise ValueError(f"base_macs must be a positive MAC count, got {base_macs}.")
    names = [candidate.name for candidate in candidates]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Candidate names must be unique; repeated: {duplicates}.")
    max_drops = tuple(sorted({float(d) for d in (*max_drops, primary_max_drop)}))
    primary_key = drop_key(primary_max_drop)
    base_accuracy = float(base_records.accuracy)
    num_labels = base_records.logits.shape[1]

    scores: dict[str, CandidateScore] = {}
    pending: list[SaverCandidate] = []
    for candidate in candidates:
        if candidate.rejection is None:
            if candidate.macs is None or not candidate.macs > 0:
                raise ValueError(f"Candidate {candidate.name!r} needs a positive MAC count, got {candidate.macs}.")
            if not candidate.macs < base_macs:
                candidate = SaverCandidate(
                    candidate.name,
                    candidate.macs,
                    rejection=f"its MACs ({candidate.macs / 1e6:.1f} M) are not below the base's "
                    f"({base_macs / 1e6:.1f} M); a saver must be cheaper than the base",
                )
        if candidate.rejection is not None:
            scores[candidate.name] = CandidateScore(
                candidate.name, "rejected", macs=candidate.macs, reason=candidate.rejection
            )
        else:
            pending.append(candidate)

    bounds = {
        c.name: oracle_relative_macs_at_drop(c.macs / base_macs, c.accuracy, base_accuracy, primary_max_drop)
        for c in pending
    }
    if prescreen:
        pending.sort(key=lambda c: (bounds[c.name], c.name))
    result = SearchResult(
        base=base_name or base_records.model_name,
        base_macs=float(base_macs),
        base_accuracy=base_accuracy,
        n=base_records.n,
        max_drops=max_drops,
        primary_max_drop=float(primary_max_drop),
        candidates=[],
        confidence=confidence,
        confidence_level=confidence_level,
        prescreen=prescreen,
        split=base_records.split,
        shuffle_seed=base_records.shuffle_seed,
    )
    best_name, best_value = None, math.inf
    scoring_seconds = 0.0
    for candidate in pending:
        lower_bound = bounds[candidate.name] if prescreen else None
        if prescreen and lower_bound - _BOUND_SLACK > best_value:
            basis = "MACs and tabulated accuracy" if candidate.accuracy is not None else "MACs"
            scores[candidate.name] = CandidateScore(
                candidate.name,
                "skipped",
                macs=candidate.macs,
                relative_saver_macs=candidate.macs / base_macs,
                lower_bound=lower_bound,
                reason=f"cannot rank first: its relative MACs at a {primary_max_drop}-point drop are at least "
                f"{lower_bound:.4f} (from its {basis}), above {best_name}'s {best_value:.4f}",
            )
            continue
        candidate_records = candidate.records() if callable(candidate.records) else candidate.records
        if candidate_records is None:
            raise ValueError(f"Candidate {candidate.name!r} has neither records nor a rejection reason.")
        if candidate_records.logits.shape[1] != num_labels:
            scores[candidate.name] = CandidateScore(
                candidate.name,
                "rejected",
                macs=candidate.macs,
                reason=f"it predicts {candidate_records.logits.shape[1]} classes but the base {num_labels}",
            )
            continue
        start = time.perf_counter()
        simulation = pair_from_records(
            candidate_records, base_records, candidate.macs / base_macs, confidence_metric=confidence
        )
        score, points = score_simulation(candidate.name, simulation, candidate.macs, max_drops, confidence_level)
        scoring_seconds += time.perf_counter() - start
        score.lower_bound = lower_bound
        scores[candidate.name] = score
        result.simulations[candidate.name] = simulation
        result.operating_points[candidate.name] = points
        if _primary_value(score, primary_key) < best_value:
            best_name, best_value = candidate.name, _primary_value(score, primary_key)
        del candidate_records  # only the simulation is kept: a large pool's logits need not fit in memory together

    start = time.perf_counter()
    rank_scores(list(scores.values()), primary_max_drop)
    scoring_seconds += time.perf_counter() - start
    status_order = {"ranked": 0, "skipped": 1, "rejected": 2}
    result.candidates = sorted(
        (scores[name] for name in names),
        key=lambda c: (status_order[c.status], c.rank or 0, names.index(c.name)),
    )
    result.scoring_seconds = scoring_seconds
    return result


def load_candidate_table(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Reads a table of candidate MACs and accuracies for the pre-screen (and to skip counting MACs).

    Accepted forms: a CSV with a `name` column and `macs` and/or `accuracy` columns, a JSON object
    `{name: {"macs": ..., "accuracy": ...}}`, or a JSON list of such rows with a `name` key. Accuracy is a fraction in
    [0, 1] and, to keep the pre-screen sound, must be at least the model's accuracy on the search split.

    Args:
        path: The file (`.csv` or `.json`).

    Returns:
        Name -> `{"macs": float, "accuracy": float}` (keys present where given).
    """
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        rows = [{"name": name, **values} for name, values in data.items()] if isinstance(data, dict) else data
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    table: dict[str, dict[str, float]] = {}
    for row in rows:
        if "name" not in row:
            raise ValueError(f"Every row of {path} needs a 'name' (and 'macs' and/or 'accuracy'); got {row}.")
        entry = {key: float(row[key]) for key in ("macs", "accuracy") if row.get(key) not in (None, "")}
        if "accuracy" in entry and not 0.0 <= entry["accuracy"] <= 1.0:
            raise ValueError(
                f"{path}: accuracy of {row['name']!r} is {entry['accuracy']}; give it as a fraction, e.g. 0.832."
            )
        if "macs" in entry and not entry["macs"] > 0:
            raise ValueError(f"{path}: MACs of {row['name']!r} must be positive, got {entry['macs']}.")
        table[str(row["name"])] = entry
    return table


def _source_name(source: Any, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    name = getattr(source, "name_or_path", None) or getattr(getattr(source, "config", None), "_name_or_path", None)
    return str(name) if name else f"candidate-{index}"


def _record_model(
    source, role, model, data_source, split, batch_size, cache_dir, progress, name, shuffle_seed, label_map, id2label
) -> Records:
    from ..models.image_processing_tinysaver import TinySaverImageProcessor
    from ..models.modeling_tinysaver import find_preprocessing
    from ..records import record

    preprocessing = find_preprocessing(model, source, role=role)
    return record(
        model,
        TinySaverImageProcessor(preprocessing=preprocessing),
        data_source,
        split=split,
        batch_size=batch_size,
        cache_dir=cache_dir,
        preprocessing=preprocessing,
        model_name=name,
        progress=progress,
        shuffle_seed=shuffle_seed,
        label_map=label_map,
        id2label=id2label,
    )


def search_savers(
    base: Any,
    candidates: Sequence[Any],
    dataset: Any,
    split: str | None,
    max_drops: Sequence[float] = DEFAULT_MAX_DROPS,
    primary_max_drop: float = DEFAULT_PRIMARY_MAX_DROP,
    confidence: str = "max_prob",
    confidence_level: float | None = None,
    prescreen: bool = False,
    candidate_table: Mapping[str, Mapping[str, float]] | str | os.PathLike | None = None,
    batch_size: int = 64,
    assets: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    shuffle_seed: int | None = None,
    label_map: Any = None,
) -> SearchResult:
    r"""
    Finds the saver that makes the cheapest TinySaver cascade for `base` among `candidates`, on a labelled split.

    Records the base and every candidate (each with its own preprocessing; cached, and shared among processes under
    `accelerate launch` / `torchrun`), rejects candidates with another label space or with MACs not below the base's,
    then scores and ranks the rest with [`rank_savers`] (ranking rule and pre-screen: see the module docstring).

    Args:
        base:
            The base model: zoo name, local folder, Hub id or model instance.
        candidates (`Sequence`):
            The candidate savers, in any of the same forms (names must be unique).
        dataset:
            Zoo dataset name, local folder, Hub id or `datasets.Dataset`.
        split (`str`):
            The search split, e.g. `"test[:50%]"`.
        max_drops (`Sequence[float]`, *optional*, defaults to `(0.0, 0.5, 1.0)`):
            Allowed top-1 drops in points at which every candidate is scored.
        primary_max_drop (`float`, *optional*, defaults to 0.5):
            The drop whose relative MACs ranks.
        confidence (`str`, *optional*, defaults to `"max_prob"`):
            The saver's confidence metric.
        confidence_level (`float`, *optional*):
            Guarantee level of the `max-drop` objective.
        prescreen (`bool`, *optional*, defaults to `False`):
            Skip, unrecorded, the candidates that provably cannot rank first.
        candidate_table (`Mapping` or path, *optional*):
            Name -> `{"macs": ..., "accuracy": ...}` (or a file for [`load_candidate_table`]). Tabulated MACs replace
            the configs' or counted ones everywhere; tabulated accuracies only feed the pre-screen.
        batch_size (`int`, *optional*, defaults to 64):
            Images per forward pass when recording.
        assets, cache_dir, progress:
            As for [`record_sub_models`].
        shuffle_seed (`int`, *optional*):
            Permute the whole named split with this seed before the slice is taken (see [`record`]).
        label_map (*optional*):
            Dataset class -> model class for a dataset whose class names differ from the base's (see [`record`]).
            Every candidate's labels are read in the base's label space.

    Returns:
        [`SearchResult`]; its `sources` let [`save_winning_cascade`] rebuild the winner.

    Example:

    ```python
    >>> from hf_tinysaver.workflows.search import search_savers

    >>> result = search_savers(
    ...     "cifar10-resnet56", ["cifar10-resnet20", "cifar10-resnet32"], "cifar10", "test[:2%]", progress=False
    ... )
    >>> [c.name for c in result.candidates if c.status == "ranked"] == [c.name for c in result.ranked]
    True
    >>> sorted(result.operating_points["cifar10-resnet20"])
    ['0.0', '0.5', '1.0']
    ```
    """
    from ..models.modeling_tinysaver import check_label_spaces, find_macs, find_preprocessing
    from ..sources import dataset_name, load_model, load_model_config, resolve_dataset_source

    if isinstance(candidate_table, (str, os.PathLike)):
        candidate_table = load_candidate_table(candidate_table)
    table = {str(name): dict(values) for name, values in (candidate_table or {}).items()}
    data_source = resolve_dataset_source(dataset, assets)
    base_name = _source_name(base, 0)
    base_model = load_model(base, assets)
    base_macs = table.get(base_name, {}).get("macs") or find_macs(
        base_model, find_preprocessing(base_model, base, role="base")
    )
    if not base_macs:
        raise ValueError(f"Cannot tell the MACs of {base_name}; give them in the candidate table.")
    base_records = _record_model(
        base,
        "base",
        base_model,
        data_source,
        split,
        batch_size,
        cache_dir,
        progress,
        base_name,
        shuffle_seed,
        label_map,
        base_model.config.id2label,
    )
    base_config = base_model.config
    del base_model

    saver_candidates, sources = [], {}
    for index, source in enumerate(candidates, start=1):
        name = _source_name(source, index)
        sources[name] = source
        config = load_model_config(source, assets)
        macs = table.get(name, {}).get("macs") or getattr(config, "macs", None)
        try:
            check_label_spaces(config, base_config)
        except ValueError as error:
            saver_candidates.append(SaverCandidate(name, macs, rejection=f"another label space: {error}"))
            continue
        if not macs:  # counted on the loaded model, which is not kept: a large pool need not fit in memory
            model = load_model(source, assets)
            macs = find_macs(model, find_preprocessing(model, source, role="saver"))
            del model

        def record_candidate(source=source, name=name) -> Records:
            model = load_model(source, assets)
            return _record_model(
                source,
                "saver",
                model,
                data_source,
                split,
                batch_size,
                cache_dir,
                progress,
                name,
                shuffle_seed,
                label_map,
                base_config.id2label,
            )

        saver_candidates.append(
            SaverCandidate(name, float(macs), record_candidate, accuracy=table.get(name, {}).get("accuracy"))
        )
    result = rank_savers(
        base_records,
        base_macs,
        saver_candidates,
        max_drops=max_drops,
        primary_max_drop=primary_max_drop,
        confidence=confidence,
        confidence_level=confidence_level,
        prescreen=prescreen,
        base_name=base_name,
    )
    result.dataset = dataset_name(dataset)
    result.shuffle_seed, result.label_map = shuffle_seed, label_map
    result.sources, result.base_source, result.dataset_source = sources, base, dataset
    return result


def save_winning_cascade(
    result: SearchResult,
    out: str | os.PathLike,
    batch_size: int = 64,
    assets: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
):
    r"""
    Builds the winner's cascade, calibrates it with `max-drop` at the primary drop on the search split (through
    [`calibrate_cascade`], so its config carries the calibration record) and saves it with its calibration files
    (see [`save_calibrated_cascade`]), ready to push.

    Args:
        result ([`SearchResult`]):
            A result of [`search_savers`] (which knows where each model came from).
        out (`str` or `os.PathLike`):
            The folder to write.
        batch_size, assets, cache_dir, progress:
            As for [`calibrate_cascade`] (the records are cached from the search, so nothing runs again).
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace `out` even when it holds files hf_tinysaver did not write (see [`save_calibrated_cascade`]).

    Returns:
        The calibrated cascade and its [`CalibrationResult`].

    Raises:
        ValueError: When no candidate makes a cheaper cascade than the base alone.

    Example:

    ```python
    >>> import tempfile
    >>> from hf_tinysaver.workflows.search import save_winning_cascade, search_savers

    >>> result = search_savers("cifar10-resnet56", ["cifar10-resnet20"], "cifar10", "test[:5%]", progress=False)
    >>> cascade, calibration = save_winning_cascade(result, tempfile.mkdtemp(), progress=False)
    >>> cascade.config.calibration["saver"], calibration.relative_macs == result.winner.relative_macs["0.5"]
    ('cifar10-resnet20', True)
    ```
    """
    from ..records import distributed_state
    from ..storage import check_output_folder
    from .cascade import build_cascade, calibrate_cascade, save_calibrated_cascade

    winner = result.winner
    if winner is None:
        raise ValueError(
            f"No candidate makes a cascade cheaper than {result.base} alone at a {result.primary_max_drop}-point "
            "drop, so there is no cascade to save. Allow a larger drop or try smaller or more accurate candidates."
        )
    if winner.name not in result.sources or result.base_source is None:
        raise ValueError("This result does not know where its models came from; use a result of search_savers.")
    check_output_folder(out, overwrite=overwrite, kind="cascade", option="out")
    cascade = build_cascade(
        result.sources[winner.name],
        result.base_source,
        assets=assets,
        confidence=result.confidence,
        saver_macs=int(winner.macs),
        base_macs=int(result.base_macs),
    )
    calibration, simulation = calibrate_cascade(
        cascade,
        result.dataset_source,
        result.split,
        objective="max-drop",
        batch_size=batch_size,
        assets=assets,
        cache_dir=cache_dir,
        progress=progress,
        max_drop=result.primary_max_drop,
        confidence_level=result.confidence_level,
        shuffle_seed=result.shuffle_seed,
        label_map=result.label_map,
    )
    cascade.config.calibration["search"] = {
        "ranking_rule": RANKING_RULE,
        "ranked": [c.name for c in result.ranked],
        "skipped": [c.name for c in result.candidates if c.status == "skipped"],
        "rejected": [c.name for c in result.candidates if c.status == "rejected"],
    }
    if distributed_state().is_main_process:
        save_calibrated_cascade(cascade, calibration, simulation, out, overwrite=overwrite)
    return cascade, calibration


__all__ = [
    "DEFAULT_MAX_DROPS",
    "DEFAULT_PRIMARY_MAX_DROP",
    "PRESCREEN_RULE",
    "RANKING_RULE",
    "CandidateScore",
    "SaverCandidate",
    "SearchResult",
    "drop_key",
    "load_candidate_table",
    "oracle_relative_macs_at_drop",
    "rank_savers",
    "rank_scores",
    "save_winning_cascade",
    "score_simulation",
    "search_savers",
]
