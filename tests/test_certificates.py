"""Certified max-drop thresholds: exact coverage of the bounds, validity by simulation, fixed-sequence, the table of
certified operating points and `set_operating_point`, the sample-size planner, and the calibrate/plan CLIs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from hf_tinysaver.calibration.certification import (
    CERTIFICATE_METHODS,
    certificate_grid,
    certify_fixed_sequence,
    drop_upper_bounds,
    plan_calibration_size,
)
from hf_tinysaver.calibration.simulation import CascadeSimulation
from hf_tinysaver.commands import main as tinysaver
from hf_tinysaver.hub.model_card import generate_model_card

# The design notes' reference pair, calibrated on the first half of the CIFAR-10 test set.
CIFAR_PAIR_ON_HALF_TEST = ["--saver", "cifar10-resnet20", "--base", "cifar10-resnet56", "--dataset", "cifar10"]
CIFAR_PAIR_ON_HALF_TEST += ["--split", "test[:50%]"]
FIXED_SEQUENCE_METHODS = [method for method in CERTIFICATE_METHODS if method != "clopper-pearson"]


def _population(bump: bool = False):
    """A discrete population: 40 confidence levels, and per level the harm and gain rates of an exiting image.

    Harms rise as the confidence falls; with `bump`, the lowest levels have more gains than harms, so the drop
    rises above the target and falls back below it (not monotone in the threshold).
    """
    levels = np.linspace(0.99, 0.3, 40)
    probabilities = np.full(40, 1 / 40)
    harm = np.linspace(0.0, 0.25, 40)
    gain = np.linspace(0.0, 0.12, 40)
    if bump:
        gain[-12:] = harm[-12:] + 0.3
    return levels, probabilities, harm, gain


def _draw(population, n: int, rng) -> CascadeSimulation:
    levels, probabilities, harm, gain = population
    level = rng.choice(len(levels), size=n, p=probabilities)
    u = rng.uniform(size=n)
    is_harm, is_gain = u < harm[level], (u >= harm[level]) & (u < harm[level] + gain[level])
    labels = np.zeros(n, dtype=np.int64)
    saver = np.where(is_harm, 1, 0)
    base = np.where(is_gain, 2, 0)
    return CascadeSimulation(levels[level], saver, base, labels, relative_saver_macs=0.1)


def _true_drop(population, threshold: float) -> float:
    levels, probabilities, harm, gain = population
    exits = levels > threshold
    return float((probabilities * (harm - gain))[exits].sum())


@pytest.mark.parametrize("method", FIXED_SEQUENCE_METHODS)
@pytest.mark.parametrize("harm_rate,gain_rate", [(0.1, 0.0), (0.15, 0.1), (0.05, 0.05), (0.3, 0.25), (0.02, 0.1)])
def test_drop_bounds_cover_the_true_drop_exactly(method, harm_rate, gain_rate):
    """Coverage of the bound at one threshold, computed exactly over every trinomial outcome of n = 40 samples."""
    n, level = 40, 0.9
    harms, gains = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    possible = harms + gains <= n
    harms, gains = harms[possible], gains[possible]
    probability = stats.multinomial.pmf(
        np.stack([harms, gains, n - harms - gains], axis=1), n, [harm_rate, gain_rate, 1 - harm_rate - gain_rate]
    )
    bounds = drop_upper_bounds(harms, gains, n, level, method)
    assert probability.sum() == pytest.approx(1.0)
    assert probability[bounds >= harm_rate - gain_rate].sum() >= level - 1e-12


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="Unknown certificate 'bentkus'"):
        CascadeSimulation([0.5], [0], [0], [0]).calibrate(
            "max-drop", max_drop=1.0, confidence_level=0.9, certificate="bentkus"
        )
    with pytest.raises(ValueError, match="needs a confidence_level"):
        CascadeSimulation([0.5], [0], [0], [0]).calibrate("max-drop", max_drop=1.0, certificate="cp-difference")


@pytest.mark.parametrize("bump,repeats", [(False, 200), (True, 100)])
def test_certificates_hold_by_simulation(bump, repeats):
    """Over seeded calibration draws, no certified point (the chosen one or any in the table) exceeds the target
    in more than ~alpha of the draws. Where the drop only grows, the in-sample rule does, which shows the check
    can fail; where it falls back below the target (`bump`), the fixed sequence must not jump over the bump."""
    population = _population(bump)
    rng = np.random.default_rng(3)
    n, max_drop, level = 1000, 2.0, 0.9
    failures = {method: 0 for method in CERTIFICATE_METHODS} | {"in-sample": 0}
    exit_rates = {method: [] for method in CERTIFICATE_METHODS}
    for _ in range(repeats):
        simulation = _draw(population, n, rng)
        plain = simulation.calibrate("max-drop", max_drop=max_drop)
        failures["in-sample"] += _true_drop(population, plain.threshold) > max_drop / 100
        for method in CERTIFICATE_METHODS:
            result = simulation.calibrate("max-drop", max_drop=max_drop, confidence_level=level, certificate=method)
            table = result.parameters["certified_points"]
            assert result.threshold in [point["threshold"] for point in table]
            worst = max(_true_drop(population, point["threshold"]) for point in table)
            failures[method] += worst > max_drop / 100
            exit_rates[method].append(result.exit_rate)
    slack = 3 * math.sqrt(0.1 * 0.9 / repeats)
    for method in CERTIFICATE_METHODS:
        assert failures[method] / repeats <= 0.1 + slack, method
        assert np.mean(exit_rates[method]) > 0.1, method  # still useful
    if not bump:
        assert failures["in-sample"] / repeats > 0.25
    if not bump:
        # Where the drop only grows, the default certificate lets more images exit than the original one. Over a
        # bump the original can do better: its simultaneous bounds may certify points past the bump, which a
        # fixed sequence, stopping at the bump, never reaches.
        assert np.mean(exit_rates["discordant-binomial"]) > np.mean(exit_rates["clopper-pearson"])


def test_fixed_sequence_stops_at_the_first_failure():
    assert certify_fixed_sequence(np.array([0.0, 0.001, 0.004, 0.02, 0.001, 0.0]), 0.005) == 3
    assert certify_fixed_sequence(np.array([0.0, 0.01, 0.0]), 0.005) == 1  # only "nothing exits"
    assert certify_fixed_sequence(np.array([0.0, 0.001]), 0.005) == 2

    simulation = _draw(_population(bump=True), 1500, np.random.default_rng(0))
    result = simulation.calibrate("max-drop", max_drop=2.0, confidence_level=0.9)
    certificate, table = result.parameters["certificate"], result.parameters["certified_points"]
    grid = certificate_grid()
    assert grid[0] == 1.0 and np.all(np.diff(grid) < 0)
    thresholds = [point["threshold"] for point in table]
    # The table is a prefix of the grid (deduplicated by exit set), fewest exits first; the chosen point is last.
    assert thresholds == sorted(thresholds, reverse=True) and thresholds[-1] == result.threshold
    assert set(thresholds) <= set(grid[grid >= result.threshold].tolist())
    assert all(point["bound"] is None or point["bound"] <= 2.0 for point in table)
    exit_rates = [point["exit_rate"] for point in table]
    assert exit_rates == sorted(exit_rates) and exit_rates[-1] == result.exit_rate
    # The first failing grid threshold's bound is above the target, and nothing below it is certified.
    failing = certificate["first_failing_threshold"]
    assert failing is not None and failing < result.threshold
    exited = np.count_nonzero(simulation.confidence > failing)
    curve_point = int(np.searchsorted(simulation.curve.exited, exited))
    harms, gains = simulation.curve.harms[curve_point], simulation.curve.gains[curve_point]
    assert drop_upper_bounds(harms, gains, simulation.n, 0.9)[()] > 0.02
    assert certificate["bound"] <= certificate["target"] == 2.0
    assert certificate | {"bound": 0} == certificate | {
        "method": "discordant-binomial",
        "level": 0.9,
        "n": 1500,
        "threshold": result.threshold,
        "procedure": "fixed-sequence",
        "bound": 0,
    }


def test_nothing_certified_on_too_few_samples_falls_back_to_the_base():
    simulation = _draw(_population(), 40, np.random.default_rng(0))
    result = simulation.calibrate("max-drop", max_drop=0.5, confidence_level=0.95)
    assert result.threshold == 1.0 and result.exit_rate == 0.0
    assert result.parameters["certified_points"] == [
        {"threshold": 1.0, "exit_rate": 0.0, "relative_macs": 1.1, "bound": None}
    ]


def test_planner_agrees_with_simulation():
    """Calibration sets of the planned size mostly certify the planned exit rate; a quarter of it mostly not."""
    population = _population()
    pilot = _draw(population, 3000, np.random.default_rng(1))
    target_exit_rate = pilot.calibrate("max-drop", max_drop=1.0).exit_rate
    size = plan_calibration_size(pilot, max_drop=2.0, confidence_level=0.9, target_exit_rate=target_exit_rate)
    assert 300 < size < 30_000

    def share_reaching(calibration_size: int, repeats: int = 60) -> float:
        rng = np.random.default_rng(2)
        reached = 0
        for _ in range(repeats):
            simulation = _draw(population, calibration_size, rng)
            result = simulation.calibrate("max-drop", max_drop=2.0, confidence_level=0.9)
            reached += result.exit_rate >= target_exit_rate - 0.03
        return reached / repeats

    assert share_reaching(size) >= 0.6
    assert share_reaching(size // 4) <= 0.3
    with pytest.raises(ValueError, match="no calibration size certifies it"):
        plan_calibration_size(pilot, max_drop=2.0, confidence_level=0.9, target_exit_rate=1.0)


@pytest.fixture(scope="module")
def certified_cascade_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("certified") / "cascade"
    code = tinysaver(
        [
            "calibrate",
            *CIFAR_PAIR_ON_HALF_TEST,
            "--max-drop",
            "1.0",
            "--confidence-level",
            "0.9",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


@pytest.mark.slow
def test_calibrate_cli_writes_the_certificate(certified_cascade_dir):
    calibration = json.loads((certified_cascade_dir / "calibration.json").read_text())
    config = json.loads((certified_cascade_dir / "config.json").read_text())
    assert config["calibration"]["certificate"] == calibration["certificate"]
    certificate = calibration["certificate"]
    assert certificate["method"] == "discordant-binomial" and certificate["n"] == 5000
    assert certificate["target"] == 1.0 and certificate["level"] == 0.9
    assert certificate["bound"] <= 1.0 and certificate["threshold"] == config["threshold"]
    points = calibration["certified_points"]
    assert len(points) > 2 and points[-1]["threshold"] == config["threshold"]
    assert calibration["relative_macs"] == pytest.approx(points[-1]["relative_macs"])

    from transformers import AutoConfig

    from hf_tinysaver.models.configuration_tinysaver import TinySaverConfig

    card = str(
        generate_model_card(TinySaverConfig.from_dict(AutoConfig.from_pretrained(certified_cascade_dir).to_dict()))
    )
    assert f"drop at most {certificate['bound']:.3f} points (target 1) with probability 0.9" in card
    assert f"| Certified operating points (`set_operating_point`) | {len(points)} |" in card


@pytest.mark.slow
def test_set_operating_point_through_remote_code(certified_cascade_dir):
    """The saved cascade, loaded through its remote code (the shipped files only), moves between certified points."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    points = json.loads((certified_cascade_dir / "calibration.json").read_text())["certified_points"]
    middle = points[len(points) // 2]
    config = json.loads((certified_cascade_dir / "config.json").read_text())
    shipped = get_class_from_dynamic_module(
        config["auto_map"]["AutoModelForImageClassification"], certified_cascade_dir
    )
    model = shipped.from_pretrained(certified_cascade_dir)
    assert type(model).__module__.startswith("transformers_modules")
    assert model.set_operating_point(relative_macs=middle["relative_macs"] + 1e-9) == middle
    assert model.config.threshold == middle["threshold"]
    assert model.set_operating_point(exit_rate=middle["exit_rate"] - 1e-9) == middle
    assert model.set_operating_point(threshold=points[0]["threshold"]) == points[0]
    assert model.config.threshold == points[0]["threshold"]
    with pytest.raises(ValueError, match="No certified operating point meets relative_macs=0.01.*in that range"):
        model.set_operating_point(relative_macs=0.01)


def test_set_operating_point_in_memory_and_its_errors():
    from hf_tinysaver import TinySaverForImageClassification
    from tiny_models import timm_classifier

    cascade = TinySaverForImageClassification.from_saver_and_base(
        timm_classifier("test_efficientnet", seed=0), timm_classifier("test_resnet", seed=1)
    )
    with pytest.raises(ValueError, match="no certified operating points; calibrate it with a certificate"):
        cascade.set_operating_point(relative_macs=0.8)
    simulation = _draw(_population(), 2000, np.random.default_rng(4))
    result = simulation.calibrate("max-drop", max_drop=2.0, confidence_level=0.9)
    cascade.config.calibration = result.to_dict()
    points = result.parameters["certified_points"]
    assert len(points) >= 3
    # A budget between two points gets the more expensive (more accurate) one that fits.
    first, second = points[1], points[2]
    budget = (first["relative_macs"] + second["relative_macs"]) / 2
    assert cascade.set_operating_point(relative_macs=budget) == second
    assert cascade.config.threshold == second["threshold"]
    assert cascade.set_operating_point(relative_macs=10.0) == points[0]
    assert cascade.set_operating_point(exit_rate=0.0) == points[0]
    assert cascade.set_operating_point(exit_rate=points[-1]["exit_rate"]) == points[-1]
    assert cascade.set_operating_point(threshold=points[-1]["threshold"]) == points[-1]
    with pytest.raises(ValueError, match=r"exit_rate=0.99: the certified points have exit_rate from 0 to"):
        cascade.set_operating_point(exit_rate=0.99)
    with pytest.raises(ValueError, match="No certified operating point meets threshold=0.123"):
        cascade.set_operating_point(threshold=0.123)
    with pytest.raises(ValueError, match="exactly one of relative_macs=, exit_rate= or threshold="):
        cascade.set_operating_point()


@pytest.mark.slow
def test_plan_cli(capsys, tmp_path):
    results = tmp_path / "plan.json"
    code = tinysaver(
        [
            "plan",
            *CIFAR_PAIR_ON_HALF_TEST,
            "--no-progress",
            "--results-file",
            str(results),
        ]
    )
    assert code == 0
    plan = json.loads(results.read_text())
    assert plan["pilot_n"] == 5000 and plan["max_drop"] == 0.5 and plan["confidence_level"] == 0.95
    assert plan["target_exit_rate"] < plan["pilot_in_sample_exit_rate"]
    assert f"needs about {plan['calibration_size']:,} calibration images" in capsys.readouterr().out


def test_calibrate_cli_refuses_a_certificate_without_a_confidence_level(tmp_path, capsys):
    arguments = [
        "calibrate",
        *CIFAR_PAIR_ON_HALF_TEST,
        "--certificate",
        "cp-difference",
        "--out",
        str(tmp_path / "out"),
    ]
    assert tinysaver(arguments) == 2
    assert "--certificate applies to --objective max-drop with --confidence-level" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _run_docstring_examples(*objects) -> None:
    import doctest

    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for obj in objects:
        text = obj.__doc__.replace("```python", "").replace("```", "")
        runner.run(parser.get_doctest(text, {}, obj.__name__, None, 0))
    assert runner.summarize(verbose=False).failed == 0


def test_planner_docstring_example_runs():
    _run_docstring_examples(plan_calibration_size)


@pytest.mark.slow
def test_set_operating_point_docstring_example_runs():
    from hf_tinysaver import TinySaverForImageClassification

    _run_docstring_examples(TinySaverForImageClassification.set_operating_point)
