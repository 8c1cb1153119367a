"""Chain search: the cheapest chain of savers (an ordered subset of a pool, smallest MACs first) at an allowed drop.

Every candidate comes as its two-model [`CascadeSimulation`] against the base on one labelled split (e.g.
`records.pair_from_records` of the records the saver search already keeps); nothing is run again. Each chain is
calibrated jointly by [`ChainSimulation`] (`max-drop`) and ranked by its relative MACs at the drop.

**Pruning, before any chain is scored** (`prune=True`):

- *Too expensive*: a candidate whose MACs are not below the base's can never save (every image that reaches it
  pays at least a base).
- *Dominated*: candidate `A` is dominated by `B` when `B` costs at most as many MACs and is at least as accurate on
  the split, and is strictly cheaper or strictly more accurate (equal MACs and equal accuracy: neither is pruned).
  This is the issue's rule and a heuristic, not a proof: a dominated saver may still order its images better by
  confidence and help a chain. `prune=False` scores every chain; the result lists each pruned candidate and why.

Chains are the non-empty subsets of the remaining candidates with at most `max_stages - 1` savers (the base is the
last stage), each ordered by MACs (ties by name). The single-saver chains are today's two-model cascades.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .chain import DEFAULT_GRID_SIZE, ChainCalibrationResult, ChainSimulation
from .simulation import CascadeSimulation


@dataclass
class ChainScore:
    """One chain's calibrated point at the allowed drop.

    Attributes:
        names: The savers in order (the base follows).
        relative_macs: Mean MACs per image relative to the base.
        accuracy: Top-1 accuracy of the chain on the split.
        accuracy_drop: Points below the base.
        thresholds: One per saver.
        exit_rates: Per stage, the base's last.
        rank: 1 = cheapest.
    """

    names: list[str]
    relative_macs: float
    accuracy: float
    accuracy_drop: float
    thresholds: list[float]
    exit_rates: list[float]
    rank: int | None = None

    @classmethod
    def from_result(cls, names: list[str], result: ChainCalibrationResult) -> ChainScore:
        return cls(
            names=list(names),
            relative_macs=result.relative_macs,
            accuracy=result.accuracy,
            accuracy_drop=result.accuracy_drop,
            thresholds=result.thresholds,
            exit_rates=result.exit_rates,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "rank": self.rank,
            "relative_macs": self.relative_macs,
            "accuracy": self.accuracy,
            "accuracy_drop": self.accuracy_drop,
            "thresholds": list(self.thresholds),
            "exit_rates": list(self.exit_rates),
        }


@dataclass
class ChainSearchResult:
    """Every scored chain, cheapest first, and the candidates pruned before the search.

    Attributes:
        max_drop: The allowed drop in points.
        max_stages: Most stages per chain, the base included.
        ranking: The scored chains, cheapest first (ties: more accurate, fewer stages, then names).
        pruned: Candidate name -> why it was left out.
    """

    max_drop: float
    max_stages: int
    ranking: list[ChainScore] = field(default_factory=list)
    pruned: dict[str, str] = field(default_factory=dict)

    @property
    def best(self) -> ChainScore | None:
        return self.ranking[0] if self.ranking else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_drop": self.max_drop,
            "max_stages": self.max_stages,
            "best": None if self.best is None else self.best.to_dict(),
            "ranking": [score.to_dict() for score in self.ranking],
            "pruned": dict(self.pruned),
        }


def prune_candidates(simulations: Mapping[str, CascadeSimulation]) -> tuple[list[str], dict[str, str]]:
    """The candidates kept for the chain search (by MACs, then name) and, for the others, why they were pruned.

    See the module docstring for the rules (too expensive; dominated in MACs and accuracy).

    Args:
        simulations: Candidate name -> its labelled two-model simulation against the base.

    Returns:
        `(kept, pruned)`.
    """
    pruned: dict[str, str] = {}
    facts = {}
    for name, simulation in simulations.items():
        if not simulation.has_labels:
            raise ValueError(f"Candidate {name!r} has no labels; the chain search needs a labelled split.")
        macs = simulation.relative_saver_macs
        if macs >= 1.0:
            pruned[name] = f"its MACs are not below the base's ({macs:.3g} x the base)"
        else:
            facts[name] = (macs, int(np.count_nonzero(simulation.saver_predictions == simulation.labels)))
    for name, (macs, right) in facts.items():
        for other, (other_macs, other_right) in facts.items():
            if (
                other != name
                and other_macs <= macs
                and other_right >= right
                and (other_macs, other_right)
                != (
                    macs,
                    right,
                )
            ):
                pruned[name] = f"dominated by {other!r} (at most its MACs, at least its accuracy)"
                break
    kept = sorted((name for name in facts if name not in pruned), key=lambda name: (facts[name][0], name))
    return kept, pruned


def search_chains(
    simulations: Mapping[str, CascadeSimulation],
    max_drop: float = 0.5,
    max_stages: int = 3,
    prune: bool = True,
    grid_size: int | None = DEFAULT_GRID_SIZE,
) -> ChainSearchResult:
    """Scores every chain of up to `max_stages` stages (the base included) from a pool, cheapest first.

    Args:
        simulations: Candidate name -> its labelled [`CascadeSimulation`] against the base (same base predictions
            and labels for all; `relative_saver_macs` set), e.g. from `records.pair_from_records`.
        max_drop: Allowed top-1 drop against the base, in points.
        max_stages: Most stages per chain, the base included (2 = two-model cascades only).
        prune: Leave out too expensive and dominated candidates first (module docstring).
        grid_size: Passed to [`ChainSimulation.calibrate`].

    Returns:
        A [`ChainSearchResult`].

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_tinysaver.calibration import CascadeSimulation
    >>> from hf_tinysaver.calibration.chain_search import search_chains

    >>> rng = np.random.default_rng(0)
    >>> labels = rng.integers(0, 10, 4000)
    >>> base = np.where(rng.random(4000) < 0.9, labels, (labels + 1) % 10)
    >>> def candidate(accuracy, macs):
    ...     confidence = rng.random(4000)
    ...     right = rng.random(4000) < accuracy + (1 - accuracy) * confidence**2
    ...     return CascadeSimulation(confidence, np.where(right, labels, (labels + 2) % 10), base, labels, macs)
    >>> pool = {"small": candidate(0.6, 0.05), "medium": candidate(0.75, 0.2), "worse": candidate(0.5, 0.3)}
    >>> result = search_chains(pool, max_drop=0.5, max_stages=3)
    >>> result.pruned
    {'worse': "dominated by 'small' (at most its MACs, at least its accuracy)"}
    >>> [score.names for score in result.ranking]  # doctest: +SKIP
    [['small', 'medium'], ['medium'], ['small']]
    >>> len(result.ranking), result.best.accuracy_drop <= 0.5 + 1e-9
    (3, True)
    ```
    """
    if int(max_stages) != max_stages or max_stages < 2:
        raise ValueError(f"max_stages must be an integer >= 2 (the base and at least one saver), got {max_stages}.")
    if not simulations:
        raise ValueError("The chain search needs at least one candidate.")
    if prune:
        kept, pruned = prune_candidates(simulations)
    else:
        kept, pruned = sorted(simulations, key=lambda name: (simulations[name].relative_saver_macs, name)), {}
    result = ChainSearchResult(max_drop=float(max_drop), max_stages=int(max_stages), pruned=pruned)
    for size in range(1, int(max_stages)):
        for names in itertools.combinations(kept, size):  # `kept` is sorted by MACs: each subset is in chain order
            chain = ChainSimulation.from_stages([simulations[name] for name in names])
            point = chain.calibrate("max-drop", max_drop=max_drop, grid_size=grid_size)
            result.ranking.append(ChainScore.from_result(list(names), point))
    result.ranking.sort(key=lambda score: (score.relative_macs, -score.accuracy, len(score.names), score.names))
    for rank, score in enumerate(result.ranking, start=1):
        score.rank = rank
    return result


__all__ = ["ChainScore", "ChainSearchResult", "prune_candidates", "search_chains"]
