"""Chain search scoring: pruning, the two-model case, the ranking, errors."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from hf_tinysaver.calibration import CascadeSimulation
from hf_tinysaver.calibration.chain import ChainSimulation
from hf_tinysaver.calibration.chain_search import prune_candidates, search_chains


def pool(seed: int = 0, n: int = 3000, specs=((0.55, 0.05), (0.65, 0.12), (0.75, 0.3), (0.5, 0.2), (0.9, 1.2))):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    base = np.where(rng.random(n) < 0.9, labels, (labels + 1) % 10)
    candidates = {}
    for index, (accuracy, macs) in enumerate(specs):
        confidence = rng.random(n).round(3)
        right = rng.random(n) < accuracy + (1 - accuracy) * confidence**2
        predictions = np.where(right, labels, (labels + 2) % 10)
        candidates[f"m{index}"] = CascadeSimulation(confidence, predictions, base, labels, macs)
    return candidates


def test_pruning_rules():
    candidates = pool()
    kept, pruned = prune_candidates(candidates)
    assert kept == ["m0", "m1", "m2"]  # by MACs
    assert pruned["m4"].startswith("its MACs are not below the base's")
    assert "dominated by 'm0'" in pruned["m3"]  # m0 (and m1): fewer MACs and more accurate than m3
    # Equal MACs and equal accuracy: neither dominates the other.
    twin = candidates["m0"]
    same = CascadeSimulation(
        twin.confidence[::-1].copy(), twin.saver_predictions, twin.base_predictions, twin.labels, 0.05
    )
    kept, pruned = prune_candidates({"a": twin, "b": same})
    assert kept == ["a", "b"] and pruned == {}


def test_search_ranks_every_chain_of_the_kept_candidates_and_finds_the_cheapest():
    candidates = pool()
    result = search_chains(candidates, max_drop=0.5, max_stages=3)
    names = [tuple(score.names) for score in result.ranking]
    assert sorted(names) == sorted([("m0",), ("m1",), ("m2",), ("m0", "m1"), ("m0", "m2"), ("m1", "m2")])
    costs = [score.relative_macs for score in result.ranking]
    assert costs == sorted(costs) and [score.rank for score in result.ranking] == list(range(1, 7))
    for score in result.ranking:
        chain = ChainSimulation.from_stages([candidates[name] for name in score.names])
        point = chain.calibrate("max-drop", max_drop=0.5)
        assert (score.relative_macs, score.thresholds) == (point.relative_macs, point.thresholds)
        assert score.accuracy_drop <= 0.5 + 1e-9
    best_single = min(
        candidates[name].calibrate("max-drop", max_drop=0.5).relative_macs for name in ("m0", "m1", "m2")
    )
    assert result.best.relative_macs <= best_single
    assert result.to_dict()["best"]["names"] == result.best.names


def test_two_stage_search_is_the_two_model_cascades():
    candidates = pool(1)
    result = search_chains(candidates, max_drop=1.0, max_stages=2, prune=False)
    assert len(result.ranking) == len(candidates) and result.pruned == {}
    for score in result.ranking:
        (name,) = score.names
        assert score.relative_macs == candidates[name].calibrate("max-drop", max_drop=1.0).relative_macs


def test_search_errors():
    candidates = pool()
    with pytest.raises(ValueError, match="max_stages must be an integer >= 2"):
        search_chains(candidates, max_stages=1)
    with pytest.raises(ValueError, match="at least one candidate"):
        search_chains({})
    unlabelled = CascadeSimulation(np.ones(3) / 2, [0, 1, 2], [0, 1, 1], None, 0.1)
    with pytest.raises(ValueError, match="no labels"):
        search_chains({"u": unlabelled})
    other = pool(2)
    with pytest.raises(ValueError, match="other base predictions or labels"):
        ChainSimulation.from_stages([candidates["m0"], other["m1"]])


def test_docstring_example_runs():
    text = search_chains.__doc__.replace("```python", "").replace("```", "")
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(doctest.DocTestParser().get_doctest(text, {}, "search_chains", None, 0))
    summary = runner.summarize(verbose=False)
    assert summary.attempted > 0 and summary.failed == 0
