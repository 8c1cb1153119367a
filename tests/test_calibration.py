"""Calibration objectives against brute-force references, guarantee mode, infeasible targets and ties."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import optimize, stats

from hf_tinysaver import calibration
from hf_tinysaver.calibration import (
    GUARANTEE_CREDITS,
    CascadeSimulation,
    InfeasibleTargetError,
    clopper_pearson_lower,
    clopper_pearson_upper,
    fit_temperature,
    largest_count_with_upper_at_most,
    smallest_count_with_lower_at_least,
)
from hf_tinysaver.models.confidence import compute_confidence

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cascades(draw, labelled: bool = True, min_size: int = 1, max_size: int = 60):
    """Random per-sample cascade data with many ties (confidences from a small pool)."""
    n = draw(st.integers(min_size, max_size))
    pool = draw(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8))
    confidence = np.array(draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n)), dtype=np.float64)
    classes = st.integers(0, 3)
    saver = np.array(draw(st.lists(classes, min_size=n, max_size=n)))
    base = np.array(draw(st.lists(classes, min_size=n, max_size=n)))
    labels = np.array(draw(st.lists(classes, min_size=n, max_size=n))) if labelled else None
    relative_saver_macs = draw(st.floats(0.0, 0.6))
    return CascadeSimulation(confidence, saver, base, labels, relative_saver_macs)


def brute_force_points(simulation: CascadeSimulation) -> list[dict]:
    """Every achievable exit set, evaluated directly with masks (no sorting, no cumulative sums)."""
    confidence = simulation.confidence
    candidates = sorted({1.0, *confidence.tolist(), float(confidence.min()) - 1.0}, reverse=True)
    points = {}
    for threshold in candidates:
        exits = confidence > threshold
        predictions = np.where(exits, simulation.saver_predictions, simulation.base_predictions)
        point = {
            "exited": int(exits.sum()),
            "disagreements": int((predictions != simulation.base_predictions).sum()),
        }
        if simulation.labels is not None:
            saver_correct = simulation.saver_predictions == simulation.labels
            base_correct = simulation.base_predictions == simulation.labels
            point["correct"] = int((predictions == simulation.labels).sum())
            point["base_correct"] = int(base_correct.sum())
            point["harms"] = int((exits & base_correct & ~saver_correct).sum())
            point["gains"] = int((exits & saver_correct & ~base_correct).sum())
        points[point["exited"]] = point
    return [points[key] for key in sorted(points)]


def assert_consistent(simulation: CascadeSimulation, result, expected_exited: int) -> None:
    """The result's threshold really gives `expected_exited` exits, and its statistics are those of that set."""
    n = simulation.n
    exits = simulation.confidence > result.threshold
    assert int(exits.sum()) == expected_exited
    assert result.exit_rate == expected_exited / n
    assert result.relative_macs == pytest.approx(simulation.relative_saver_macs + 1 - expected_exited / n)
    predictions = np.where(exits, simulation.saver_predictions, simulation.base_predictions)
    assert result.agreement == pytest.approx(float((predictions == simulation.base_predictions).mean()))
    if simulation.labels is not None:
        assert result.accuracy == pytest.approx(float((predictions == simulation.labels).mean()))
        assert result.base_accuracy == pytest.approx(float((simulation.base_predictions == simulation.labels).mean()))
        assert result.saver_accuracy == pytest.approx(
            float((simulation.saver_predictions == simulation.labels).mean())
        )
    else:
        assert result.accuracy is None and result.base_accuracy is None
    again = simulation.evaluate(result.threshold)
    assert again.exit_rate == result.exit_rate and again.agreement == result.agreement


@SETTINGS
@given(cascades())
def test_curve_matches_brute_force(simulation):
    curve = simulation.curve
    points = brute_force_points(simulation)
    assert curve.exited.tolist() == [p["exited"] for p in points]
    assert curve.disagreements.tolist() == [p["disagreements"] for p in points]
    assert curve.cascade_correct.tolist() == [p["correct"] for p in points]
    for index, threshold in enumerate(curve.thresholds):
        assert int((simulation.confidence > threshold).sum()) == curve.exited[index]


@SETTINGS
@given(cascades(), st.sampled_from([0.0, 0.5, 1.0, 5.0, 20.0]))
def test_max_drop_matches_brute_force(simulation, max_drop):
    result = simulation.calibrate("max-drop", max_drop=max_drop)
    allowed = math.floor(max_drop * simulation.n / 100 + 1e-9)
    admissible = [p for p in brute_force_points(simulation) if p["base_correct"] - p["correct"] <= allowed]
    assert_consistent(simulation, result, max(p["exited"] for p in admissible))
    assert 100 * (result.base_accuracy - result.accuracy) <= max_drop + 1e-9
    assert result.to_dict()["max_drop"] == max_drop


@SETTINGS
@given(cascades(labelled=False), st.sampled_from([0.0, 0.01, 0.1, 0.3, 1.0]))
def test_agreement_matches_brute_force_without_labels(simulation, max_disagreement):
    result = simulation.calibrate("agreement", max_disagreement=max_disagreement)
    allowed = math.floor(max_disagreement * simulation.n + 1e-9)
    admissible = [p for p in brute_force_points(simulation) if p["disagreements"] <= allowed]
    assert_consistent(simulation, result, max(p["exited"] for p in admissible))
    assert result.agreement >= 1 - max_disagreement - 1e-12


@SETTINGS
@given(cascades(labelled=False), st.floats(0.0, 1.0))
def test_exit_rate_matches_brute_force(simulation, exit_rate):
    result = simulation.calibrate("exit-rate", exit_rate=exit_rate)
    reachable = [p["exited"] for p in brute_force_points(simulation) if p["exited"] >= exit_rate * simulation.n - 1e-9]
    assert_consistent(simulation, result, min(reachable))


@SETTINGS
@given(cascades(labelled=False), st.floats(0.0, 2.0))
def test_budget_matches_brute_force(simulation, budget):
    s, n = simulation.relative_saver_macs, simulation.n
    within = [p["exited"] for p in brute_force_points(simulation) if s + 1 - p["exited"] / n <= budget + 1e-9]
    if not within:
        with pytest.raises(InfeasibleTargetError, match="Closest achievable point"):
            simulation.calibrate("budget", relative_macs=budget)
        return
    result = simulation.calibrate("budget", relative_macs=budget)
    assert_consistent(simulation, result, min(within))
    assert result.relative_macs <= budget + 1e-9


@SETTINGS
@given(cascades(), st.sampled_from([1000, 10, 7, None]))
def test_paper_no_loss_matches_brute_force(simulation, grid_size):
    result = simulation.calibrate("paper-no-loss", grid_size=grid_size)
    confidence = simulation.confidence
    saver_correct = simulation.saver_predictions == simulation.labels
    base_correct = simulation.base_predictions == simulation.labels
    if grid_size is None:
        grid = [p for p in sorted({1.0, *confidence.tolist()}, reverse=True)] + [float(confidence.min()) - 1]
    else:
        grid = [k / grid_size for k in range(grid_size, 0, -1)]
    passing, first_failing = grid[0], None
    for threshold in grid:
        exits = confidence > threshold
        if saver_correct[exits].sum() < base_correct[exits].sum():
            first_failing = threshold
            break
        passing = threshold
    assert_consistent(simulation, result, int((confidence > passing).sum()))
    if grid_size is not None:
        assert result.threshold == passing
        assert result.to_dict()["first_failing_threshold"] == first_failing
        assert simulation.delta_c(grid_size) == pytest.approx(
            simulation.relative_saver_macs - (confidence > passing).mean()
        )
    else:
        assert (result.to_dict()["first_failing_threshold"] is None) == (first_failing is None)


def test_paper_no_loss_reports_the_grid_value_and_stops_at_the_first_failure():
    # From the top: 0.95 (saver right, base wrong) x2, 0.85 (saver wrong, base right) x3, 0.5 (saver right, base
    # wrong) x4. Below 0.85 the saver has 2 right vs the base's 3 on the exited samples: the sweep stops there, even
    # though exiting everything (6 vs 3) would beat the base.
    confidence = [0.95] * 2 + [0.85] * 3 + [0.5] * 4
    saver = [1] * 2 + [0] * 3 + [1] * 4
    base = [0] * 2 + [1] * 3 + [0] * 4
    labels = [1] * 9
    simulation = CascadeSimulation(confidence, saver, base, labels, relative_saver_macs=0.1)
    result = simulation.calibrate("paper-no-loss")
    assert result.threshold == 0.85 and result.exit_rate == 2 / 9
    assert result.parameters["first_failing_threshold"] == 0.849
    assert result.delta_c == pytest.approx(0.1 - 2 / 9) == simulation.delta_c()
    assert simulation.calibrate("max-drop", max_drop=0.0).exit_rate == 1.0


def test_paper_no_loss_on_a_hand_example():
    # Top group: saver right on 1 of 2, base right on both -> fails at once; lower group would pass.
    confidence = [0.99, 0.99, 0.6, 0.6]
    saver = [1, 0, 1, 1]
    base = [1, 1, 0, 0]
    labels = [1, 1, 1, 1]
    simulation = CascadeSimulation(confidence, saver, base, labels, relative_saver_macs=0.2)
    result = simulation.calibrate("paper-no-loss")
    assert (result.threshold, result.exit_rate) == (0.99, 0.0)
    assert result.parameters["first_failing_threshold"] == 0.989
    assert simulation.delta_c() == pytest.approx(0.2)
    # The every-distinct-confidence variant also stops at the top group.
    assert simulation.calibrate("paper-no-loss", grid_size=None).exit_rate == 0.0
    # max-drop is not fooled: exiting everything loses 1 and wins 2 samples.
    assert simulation.calibrate("max-drop", max_drop=0.0).exit_rate == 1.0


def test_ties_exit_together_and_thresholds_sit_midway():
    confidence = np.array([0.9, 0.9, 0.9, 0.7, 0.7, 0.3])
    simulation = CascadeSimulation(confidence, np.zeros(6), np.zeros(6), relative_saver_macs=0.0)
    curve = simulation.curve
    assert curve.exited.tolist() == [0, 3, 5, 6]
    assert curve.thresholds.tolist() == pytest.approx([1.0, 0.8, 0.5, 0.15])
    # A target between tie-group sizes rounds up to the next whole group.
    assert simulation.calibrate("exit-rate", exit_rate=0.51).exit_rate == 5 / 6
    # Float noise far smaller than the gaps does not change any decision.
    noisy = confidence + np.random.default_rng(0).normal(0, 1e-9, size=6)
    for threshold, exited in zip(curve.thresholds, curve.exited, strict=True):
        assert int((noisy > threshold).sum()) == exited


def test_threshold_between_adjacent_floats():
    high = 0.5
    low = np.nextafter(high, 0.0)
    simulation = CascadeSimulation([high, low], [0, 0], [0, 0])
    threshold = simulation.curve.thresholds[1]
    assert threshold == low  # no float lies strictly between: exit when conf > low
    assert (simulation.confidence > threshold).tolist() == [True, False]


def test_nothing_and_everything_exit_thresholds():
    simulation = CascadeSimulation([1.0, 1.0, 0.0], [0, 0, 1], [0, 0, 0], [0, 0, 0], relative_saver_macs=0.05)
    curve = simulation.curve
    assert curve.thresholds[0] == 1.0 and curve.exited[0] == 0
    assert curve.thresholds[-1] < 0.0 and curve.exited[-1] == 3
    none = simulation.calibrate("budget", relative_macs=2.0)
    assert none.exit_rate == 0 and none.relative_macs == pytest.approx(1.05)


def test_infeasible_targets_name_the_closest_point():
    simulation = CascadeSimulation([0.9, 0.8, 0.7], [0, 1, 1], [0, 0, 1], [0, 0, 1], relative_saver_macs=0.3)
    with pytest.raises(InfeasibleTargetError, match=r"below the saver's own cost.*relative MACs 0\.3000"):
        simulation.calibrate("budget", relative_macs=0.2)
    # The cascade cannot beat the base here (the saver is never right where the base is wrong).
    with pytest.raises(InfeasibleTargetError, match=r"Closest achievable point: threshold 1, exit rate 0\.0000"):
        simulation.calibrate("max-drop", max_drop=-10.0)
    assert issubclass(InfeasibleTargetError, ValueError)


def test_parameter_errors_say_what_to_do():
    simulation = CascadeSimulation([0.9], [0], [0])
    with pytest.raises(ValueError, match="needs labels"):
        simulation.calibrate("max-drop", max_drop=0.5)
    with pytest.raises(ValueError, match="Unknown objective"):
        simulation.calibrate("no-loss")
    with pytest.raises(TypeError, match="Wrong parameters for objective 'exit-rate'"):
        simulation.calibrate("exit-rate", rate=0.5)
    with pytest.raises(ValueError, match=r"confidence_level must be in \(0, 1\)"):
        simulation.calibrate("agreement", max_disagreement=0.1, confidence_level=95)
    with pytest.raises(ValueError, match="one entry per sample"):
        CascadeSimulation([0.9, 0.8], [0], [0])
    with pytest.raises(ValueError, match="NaN"):
        CascadeSimulation([float("nan")], [0], [0])


def test_to_dict_has_stable_keys():
    simulation = CascadeSimulation([0.9, 0.2], [0, 1], [0, 0], [0, 0], relative_saver_macs=0.1)
    common = ["objective", "threshold", "exit_rate", "accuracy", "base_accuracy", "saver_accuracy", "relative_macs"]
    common += ["agreement", "n", "relative_saver_macs"]
    expected_extra = {
        "paper-no-loss": ({}, ["grid_size", "first_failing_threshold"]),
        "max-drop": ({"max_drop": 0.5}, ["max_drop", "confidence_level"]),
        "exit-rate": ({"exit_rate": 0.5}, ["target_exit_rate"]),
        "budget": ({"relative_macs": 0.9}, ["target_relative_macs"]),
        "agreement": ({"max_disagreement": 0.0}, ["max_disagreement", "confidence_level"]),
    }
    for objective, (params, extra) in expected_extra.items():
        output = simulation.calibrate(objective, **params).to_dict()
        assert list(output) == common + extra
        assert output["objective"] == objective


def _cp_upper_admits(count: int, n: int, bound: float, alpha: float) -> bool:
    """`clopper_pearson_upper(count) <= bound` restated with the binomial CDF (an independent formulation)."""
    return stats.binom.cdf(count, n, bound) <= alpha


def _cp_lower_admits(count: int, n: int, bound: float, alpha: float) -> bool:
    """`clopper_pearson_lower(count) >= bound` restated with the binomial survival function."""
    return bound <= 0 or stats.binom.sf(count - 1, n, bound) <= alpha


@SETTINGS
@given(cascades(min_size=20, max_size=80), st.sampled_from([0.0, 1.0, 5.0, 20.0]), st.sampled_from([0.8, 0.95]))
def test_max_drop_guarantee_matches_brute_force(simulation, max_drop, confidence_level):
    result = simulation.calibrate(
        "max-drop", max_drop=max_drop, confidence_level=confidence_level, certificate="clopper-pearson"
    )
    n, tests = simulation.n, 2 * len(GUARANTEE_CREDITS) - 1
    alpha = (1 - confidence_level) / tests
    admissible = [0]
    for p in brute_force_points(simulation):
        for credit in GUARANTEE_CREDITS:
            if _cp_upper_admits(p["harms"], n, max_drop / 100 + credit, alpha) and _cp_lower_admits(
                p["gains"], n, credit, alpha
            ):
                admissible.append(p["exited"])
    assert_consistent(simulation, result, max(admissible))
    plain = simulation.calibrate("max-drop", max_drop=max_drop)
    assert result.exit_rate <= plain.exit_rate or result.exit_rate == 0


@SETTINGS
@given(cascades(labelled=False, min_size=20, max_size=80), st.sampled_from([0.0, 0.05, 0.2]))
def test_agreement_guarantee_matches_brute_force(simulation, max_disagreement):
    result = simulation.calibrate("agreement", max_disagreement=max_disagreement, confidence_level=0.9)
    admissible = [0] + [
        p["exited"]
        for p in brute_force_points(simulation)
        if _cp_upper_admits(p["disagreements"], simulation.n, max_disagreement, 0.1)
    ]
    assert_consistent(simulation, result, max(admissible))


def test_clopper_pearson_bounds():
    n, level = 50, 0.95
    counts = np.arange(n + 1)
    upper, lower = clopper_pearson_upper(counts, n, level), clopper_pearson_lower(counts, n, level)
    assert upper[-1] == 1.0 and lower[0] == 0.0
    assert np.all(np.diff(upper) > 0) and np.all(np.diff(lower) > 0) and np.all(lower < counts / n + 1e-12)
    # Exact definition: the binomial tail at the bound equals the error level.
    assert stats.binom.cdf(counts[:-1], n, upper[:-1]) == pytest.approx(np.full(n, 0.05))
    assert stats.binom.sf(counts[1:] - 1, n, lower[1:]) == pytest.approx(np.full(n, 0.05))
    # Coverage is at least the level for every rate (checked exactly on a grid of rates).
    for rate in np.linspace(0.01, 0.99, 25):
        probabilities = stats.binom.pmf(counts, n, rate)
        assert probabilities[upper >= rate].sum() >= level - 1e-12
        assert probabilities[lower <= rate].sum() >= level - 1e-12


def _population(seed: int, levels: int = 40):
    """A discrete population: confidence level, then outcome; harms rise as the confidence falls."""
    rng = np.random.default_rng(seed)
    confidence_levels = np.sort(rng.uniform(0.3, 1.0, levels))[::-1]
    level_probabilities = rng.dirichlet(np.ones(levels))
    harm = np.linspace(0.0, 0.35, levels)
    gain = np.linspace(0.0, 0.2, levels)
    disagree = np.minimum(1.0, harm + gain + 0.05)
    return confidence_levels, level_probabilities, harm, gain, disagree


def _sample(population, n: int, rng):
    confidence_levels, level_probabilities, harm, gain, disagree = population
    level = rng.choice(len(confidence_levels), size=n, p=level_probabilities)
    u = rng.uniform(size=n)
    labels = np.zeros(n, dtype=np.int64)
    # Outcome per sample: harm (base right, saver wrong), gain (saver right, base wrong), else both right; the
    # disagreement of harm/gain samples is certain, the rest disagree at the remaining rate with both wrong.
    is_harm = u < harm[level]
    is_gain = (u >= harm[level]) & (u < harm[level] + gain[level])
    is_both_wrong = (u >= harm[level] + gain[level]) & (u < disagree[level])
    saver = np.where(is_harm | is_both_wrong, 1, 0)
    base = np.where(is_gain, 2, np.where(is_both_wrong, 3, 0))
    return confidence_levels[level], saver, base, labels


def _population_rates(population, threshold: float):
    confidence_levels, level_probabilities, harm, gain, disagree = population
    exits = confidence_levels > threshold
    drop = float((level_probabilities * (harm - gain))[exits].sum())
    disagreement = float((level_probabilities * disagree)[exits].sum())
    return drop, disagreement


def test_guarantees_hold_on_fresh_data_by_simulation():
    """Over repeated calibration draws, the population drop exceeds the target in at most ~alpha of draws.

    Without the guarantee, the in-sample rule overshoots on fresh data about half of the time, which shows the
    check can fail.
    """
    population = _population(seed=1)
    rng = np.random.default_rng(2)
    repeats, n, max_drop, max_disagreement = 300, 1500, 1.0, 0.05
    failures = {"max-drop": 0, "agreement": 0, "max-drop-plain": 0}
    exit_rates = []
    for _ in range(repeats):
        simulation = CascadeSimulation(*_sample(population, n, rng), relative_saver_macs=0.1)
        guaranteed = simulation.calibrate("max-drop", max_drop=max_drop, confidence_level=0.9)
        plain = simulation.calibrate("max-drop", max_drop=max_drop)
        agreement = simulation.calibrate("agreement", max_disagreement=max_disagreement, confidence_level=0.9)
        failures["max-drop"] += _population_rates(population, guaranteed.threshold)[0] > max_drop / 100
        failures["max-drop-plain"] += _population_rates(population, plain.threshold)[0] > max_drop / 100
        failures["agreement"] += _population_rates(population, agreement.threshold)[1] > max_disagreement
        exit_rates.append(guaranteed.exit_rate)
    slack = 3 * math.sqrt(0.1 * 0.9 / repeats)
    assert failures["max-drop"] / repeats <= 0.1 + slack
    assert failures["agreement"] / repeats <= 0.1 + slack
    assert failures["max-drop-plain"] / repeats > 0.25
    assert np.mean(exit_rates) > 0.15  # the guarantee still lets a useful share of samples exit


def test_from_logits_uses_compute_confidence_on_float32_logits():
    generator = torch.Generator().manual_seed(0)
    saver_logits = (torch.randn(200, 10, generator=generator) * 8).float()
    saver_logits[:20] = saver_logits[:20] * 10  # saturating confidences
    base_logits = torch.randn(200, 10, generator=generator)
    labels = torch.randint(0, 10, (200,), generator=generator)
    for metric in ("max_prob", "margin", "entropy"):
        simulation = CascadeSimulation.from_logits(saver_logits, base_logits, labels, 0.2, metric, temperature=1.5)
        expected = compute_confidence(saver_logits, metric, 1.5).numpy()
        np.testing.assert_array_equal(simulation.confidence, expected)
        np.testing.assert_array_equal(simulation.saver_predictions, saver_logits.argmax(-1).numpy())
        np.testing.assert_array_equal(simulation.base_predictions, base_logits.argmax(-1).numpy())
    mapped = CascadeSimulation.from_logits(
        saver_logits, base_logits.argmax(-1), labels, label_mapping=list(range(9, -1, -1))
    )
    np.testing.assert_array_equal(mapped.saver_predictions, 9 - saver_logits.argmax(-1).numpy())


def test_oracle_relative_macs():
    saver = np.array([0, 1, 1, 0, 2])
    base = np.array([0, 0, 1, 1, 2])
    labels = np.array([0, 0, 0, 1, 1])
    simulation = CascadeSimulation(np.linspace(0, 1, 5), saver, base, labels, relative_saver_macs=0.25)
    # Saver wrong and base right on samples 1 and 3 only.
    assert simulation.oracle_relative_macs() == pytest.approx(0.25 + 2 / 5)
    assert calibration.oracle_relative_macs(simulation) == simulation.oracle_relative_macs()


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = logits / temperature
    log_probs = scaled - np.logaddexp.reduce(scaled, axis=1, keepdims=True)
    return -float(log_probs[np.arange(len(labels)), labels].mean())


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_fit_temperature_minimises_nll(scale):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 2000)
    logits = (rng.normal(size=(2000, 6)) + 1.5 * np.eye(6)[labels]) * scale
    logits[rng.uniform(size=2000) < 0.2] *= 3  # overconfident part
    logits = logits.astype(np.float32)
    fitted = fit_temperature(logits, labels)
    reference = optimize.minimize_scalar(
        lambda log_t: _nll(logits.astype(np.float64), labels, math.exp(log_t)),
        bounds=(math.log(0.01), math.log(100)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert math.log(fitted) == pytest.approx(reference.x, abs=1e-4)
    assert _nll(logits, labels, fitted) <= reference.fun + 1e-9


def test_fit_temperature_clamps_to_the_range():
    labels = np.array([0, 1, 0, 1])
    separable = np.array([[5.0, -5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, 5.0]])
    assert fit_temperature(separable, labels, min_temperature=0.1) == 0.1
    assert fit_temperature(-separable, labels, max_temperature=50.0) == 50.0
    with pytest.raises(ValueError, match="Expected logits"):
        fit_temperature(separable[:, 0], labels)


def test_docstring_examples_run():
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for name in ("CascadeSimulation", "fit_temperature", "clopper_pearson_upper", "clopper_pearson_lower"):
        text = getattr(calibration, name).__doc__.replace("```python", "").replace("```", "")
        test = parser.get_doctest(text, {}, name, None, 0)
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_count_bisection_matches_direct_bounds():
    n, level = 200, 0.99
    counts = np.arange(n + 1)
    upper, lower = clopper_pearson_upper(counts, n, level), clopper_pearson_lower(counts, n, level)
    bounds = np.array([0.0, 1e-4, 0.01, 0.05, 0.3, 0.999, 1.0, 1.5])
    largest = largest_count_with_upper_at_most(bounds, n, level)
    smallest = smallest_count_with_lower_at_least(bounds, n, level)
    for bound, expected_largest, expected_smallest in zip(bounds, largest, smallest, strict=True):
        admitted_upper = counts[upper <= bound]
        admitted_lower = counts[lower >= bound]
        assert expected_largest == (admitted_upper.max() if len(admitted_upper) else -1)
        assert expected_smallest == (admitted_lower.min() if len(admitted_lower) else n + 1)


def test_calibration_record_round_trips_and_reads_older_records():
    from hf_tinysaver import __version__
    from hf_tinysaver.calibration.record import CalibrationRecord

    simulation = CascadeSimulation([0.9, 0.2, 0.7], [0, 1, 0], [0, 0, 0], [0, 0, 1], relative_saver_macs=0.1)
    result = simulation.calibrate("max-drop", max_drop=50.0)
    record = CalibrationRecord.create({**result.to_dict(), "dataset": "cifar10", "split": "test", "custom": [1]})
    assert (record.threshold, record.exit_rate, record.n) == (result.threshold, result.exit_rate, 3)
    assert record.accuracy_drop == pytest.approx(result.accuracy_drop) and record.max_drop == 50.0
    assert record.hf_tinysaver_version == __version__ and record.date is not None
    assert record.extra == {"custom": [1]} and not record.is_multi_exit and record.thresholds == [result.threshold]
    stored = record.to_dict()
    assert stored["custom"] == [1] and "extra" not in stored and CalibrationRecord.from_dict(stored) == record

    # An ESN record of an earlier version: `drop` / `num_images`, a plot path, no date or version.
    old = {"objective": "max-drop", "threshold": 0.8, "exit_thresholds": [0.6], "exit_rates": [0.5, 0.3, 0.2]}
    old |= {"drop": 0.4, "num_images": 500, "plot": "tradeoff.png", "allowed_drops": [0.2, 0.4]}
    read = CalibrationRecord.from_dict(old)
    assert (read.accuracy_drop, read.n, read.date, read.hf_tinysaver_version) == (0.4, 500, None, None)
    assert read.is_multi_exit and read.thresholds == [0.8, 0.6] and read.extra == {"allowed_drops": [0.2, 0.4]}
    assert "plot" not in read.to_dict() and CalibrationRecord.from_dict({}) == CalibrationRecord.from_dict(None)
