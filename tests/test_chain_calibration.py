"""Joint calibration of chains of savers: brute force, the two-model case, greedy baselines, edges, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, requires_shared
from hf_tinysaver.calibration import CascadeSimulation, ExitRecords, InfeasibleTargetError, search_exit_thresholds
from hf_tinysaver.calibration.chain import ChainSimulation
from hf_tinysaver.models.confidence import first_exit

# Binary fractions: every sum of stage MACs is exact in float64, so ties in cost are exact ties.
MACS = [0.125, 0.25]


def synthetic_chain(seed: int, n: int = 50, num_savers: int = 2, decimals: int | None = 1, macs=MACS):
    """Random chain records; confidences rounded to `decimals` so that tie groups occur."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    confidences, predictions = [], []
    for accuracy in np.linspace(0.5, 0.8, num_savers):
        confidence = rng.random(n)
        if decimals is not None:
            confidence = confidence.round(decimals)
        right = rng.random(n) < accuracy + (1 - accuracy) * confidence**2
        confidences.append(confidence)
        predictions.append(np.where(right, labels, (labels + 1 + rng.integers(0, 3, n)) % 4))
    base = np.where(rng.random(n) < 0.9, labels, (labels + 1) % 4)
    return ChainSimulation(confidences, predictions, base, labels, stage_macs=macs[:num_savers])


def key(objective: str, result, n: int, **parameters):
    """The objective's order on results (smaller is better), None when infeasible; the docstring's definitions."""
    lost = round((result.base_accuracy - result.accuracy) * n) if result.accuracy is not None else None
    disagreements = round((1 - result.agreement) * n)
    exits = round(result.exit_rate * n)
    if objective == "max-drop":
        if lost > math.floor(round(parameters["max_drop"] / 100 * n, 9)):
            return None
        return (result.relative_macs, lost)
    if objective == "agreement":
        if disagreements > math.floor(round(parameters["max_disagreement"] * n, 9)):
            return None
        return (result.relative_macs, disagreements)
    if objective == "budget":
        if result.relative_macs > parameters["relative_macs"] + 1e-12:
            return None
        return (disagreements, -result.relative_macs)
    if objective == "exit-rate":
        if exits < math.ceil(round(parameters["exit_rate"] * n, 9)):
            return None
        return (exits, disagreements, result.relative_macs)
    raise AssertionError(objective)


def brute_force(chain: ChainSimulation, objective: str, **parameters):
    """Best key over every combination of every stage's cut points, each evaluated with `first_exit`."""
    grids = [stage.curve.thresholds for stage in chain.stages]
    keys = []
    for thresholds in itertools.product(*grids):
        value = key(objective, chain.evaluate(thresholds), chain.n, **parameters)
        if value is not None:
            keys.append(value)
    return min(keys)


OBJECTIVES = [
    ("max-drop", {"max_drop": 0.0}),
    ("max-drop", {"max_drop": 2.0}),
    ("max-drop", {"max_drop": 6.0}),
    ("agreement", {"max_disagreement": 0.08}),
    ("budget", {"relative_macs": 0.7}),
    ("exit-rate", {"exit_rate": 0.45}),
]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("objective", "parameters"), OBJECTIVES)
def test_joint_calibration_equals_brute_force_over_all_cut_points(seed, objective, parameters):
    chain = synthetic_chain(seed, decimals={0: 1, 1: 1, 2: 2, 3: None}[seed])  # ties, and none (seed 3)
    result = chain.calibrate(objective, **parameters)
    assert key(objective, result, chain.n, **parameters) == brute_force(chain, objective, **parameters)
    # What the search reports is what the exit rule gives with its thresholds.
    assert result.to_dict() | {"objective": "thresholds", "candidates": 0} == chain.evaluate(
        result.thresholds
    ).to_dict() | {"candidates": 0, **result.parameters}


@pytest.mark.parametrize(("objective", "parameters"), OBJECTIVES[1:3] + OBJECTIVES[4:5])
def test_four_stage_chain_equals_brute_force(objective, parameters):
    chain = synthetic_chain(3, n=30, num_savers=3, macs=[0.0625, 0.125, 0.25])
    result = chain.calibrate(objective, **parameters)
    assert key(objective, result, chain.n, **parameters) == brute_force(chain, objective, **parameters)


def test_coarse_grid_with_refinement_is_never_worse_than_its_special_candidates():
    chain = synthetic_chain(4, n=3000, decimals=None)
    coarse = chain.calibrate("max-drop", max_drop=1.0, grid_size=16)
    exact = chain.calibrate("max-drop", max_drop=1.0, grid_size=None)
    assert exact.relative_macs <= coarse.relative_macs
    assert coarse.accuracy_drop <= 1.0 + 1e-9
    for stage_index, stage in enumerate(chain.stages):  # every single-saver cascade of the chain
        alone = stage.calibrate("max-drop", max_drop=1.0)
        thresholds = [1.0] * chain.num_savers
        thresholds[stage_index] = alone.threshold
        assert coarse.relative_macs <= chain.evaluate(thresholds).relative_macs + 1e-12


def test_vectorized_rule_equals_first_exit():
    chain = synthetic_chain(5, n=400, num_savers=3, decimals=2, macs=[0.1, 0.2, 0.3])
    rng = np.random.default_rng(0)
    leading = np.stack([rng.integers(0, len(stage.curve), 40) for stage in chain.stages[:-1]], axis=1)  # cut indices
    reach = chain.reaching_last(np.stack([chain.stages[k].curve.exited[leading[:, k]] for k in range(2)], axis=1))
    order = chain._last_order["order"]
    for row in range(len(leading)):
        thresholds = [chain.stages[k].curve.thresholds[leading[row, k]] for k in range(2)] + [0.5]
        stage = first_exit(torch.from_numpy(chain.confidences), thresholds).numpy()
        np.testing.assert_array_equal(reach[row], (stage >= 2)[order])


@pytest.mark.parametrize(
    ("objective", "parameters"),
    OBJECTIVES
    + [
        ("max-drop", {"max_drop": 1.0, "confidence_level": 0.9}),
        ("max-drop", {"max_drop": 1.0, "confidence_level": 0.9, "certificate": "cp-difference"}),
        ("max-drop", {"max_drop": 1.0, "confidence_level": 0.9, "certificate": "clopper-pearson"}),
        ("agreement", {"max_disagreement": 0.05, "confidence_level": 0.9}),
    ],
)
def test_two_stage_chain_gives_cascade_simulation_results(objective, parameters):
    rng = np.random.default_rng(7)
    n = 5000
    labels = rng.integers(0, 10, n)
    confidence = rng.random(n).round(3)
    saver = np.where(rng.random(n) < 0.5 + 0.5 * confidence, labels, (labels + 1) % 10)
    base = np.where(rng.random(n) < 0.9, labels, (labels + 2) % 10)
    chain = ChainSimulation([confidence], [saver], base, labels, stage_macs=[0.1])
    cascade = CascadeSimulation(confidence, saver, base, labels, relative_saver_macs=0.1)
    ours, theirs = chain.calibrate(objective, **parameters), cascade.calibrate(objective, **parameters)
    assert ours.thresholds == [theirs.threshold]
    assert ours.exit_rate == theirs.exit_rate and ours.exit_rates[0] == theirs.exit_rate
    assert ours.accuracy == theirs.accuracy and ours.base_accuracy == theirs.base_accuracy
    assert ours.relative_macs == theirs.relative_macs
    assert ours.agreement == theirs.agreement
    for name in ("certificate", "certified_points"):
        assert ours.parameters.get(name) == theirs.parameters.get(name)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_drop", [0.5, 1.0, 2.0])
def test_joint_is_at_least_as_good_as_the_sequential_greedy_search(seed, max_drop):
    chain = synthetic_chain(seed, n=4000, decimals=3, macs=[0.05, 0.3])
    joint = chain.calibrate("max-drop", max_drop=max_drop)
    records = ExitRecords(chain.confidences, chain.predictions, chain.labels)
    greedy = search_exit_thresholds(records, exit_macs=[0.05, 0.35, 1.35], base_macs=1, max_drop=max_drop)
    assert joint.accuracy_drop <= max_drop + 1e-9
    assert joint.relative_macs <= greedy.calibration["relative_macs"] + 1e-12
    # The same operating point through the multi-exit evaluation (one exit rule, two accountings).
    from hf_tinysaver.calibration import evaluate_exits

    evaluated = evaluate_exits(records, joint.thresholds, [0.05, 0.35, 1.35], 1)
    assert evaluated["exit_rates"] == joint.exit_rates and evaluated["accuracy"] == joint.accuracy
    assert evaluated["relative_macs"] == pytest.approx(joint.relative_macs, rel=1e-12)


def test_everything_exits_at_the_first_stage():
    n = 200
    labels = np.arange(n) % 5
    chain = ChainSimulation(
        [np.full(n, 0.99), np.full(n, 0.5)], [labels, labels], labels, labels, stage_macs=[0.125, 0.25]
    )
    result = chain.calibrate("max-drop", max_drop=0.0)
    assert result.exit_rates == [1.0, 0.0, 0.0] and result.relative_macs == 0.125 and result.accuracy_drop == 0
    assert chain.calibrate("budget", relative_macs=0.125).exit_rates == [1.0, 0.0, 0.0]
    with pytest.raises(InfeasibleTargetError, match="below the first saver's own cost"):
        chain.calibrate("budget", relative_macs=0.1)


def test_nothing_exits_when_every_saver_is_wrong():
    n = 200
    labels = np.arange(n) % 5
    wrong = (labels + 1) % 5
    rng = np.random.default_rng(0)
    chain = ChainSimulation([rng.random(n), rng.random(n)], [wrong, wrong], labels, labels, stage_macs=MACS)
    result = chain.calibrate("max-drop", max_drop=0.0)
    assert result.exit_rates == [0.0, 0.0, 1.0] and result.thresholds == [1.0, 1.0]
    assert result.relative_macs == 1.375 and result.accuracy == 1.0
    certified = chain.calibrate("max-drop", max_drop=0.5, confidence_level=0.9)
    assert certified.exit_rates == [0.0, 0.0, 1.0] and certified.accuracy_drop == 0


def test_certified_three_stage_chain_is_a_certified_grid_point():
    chain = synthetic_chain(0, n=20000, decimals=None, macs=[0.05, 0.3])
    certified = chain.calibrate("max-drop", max_drop=1.0, confidence_level=0.9)
    plain = chain.calibrate("max-drop", max_drop=1.0)
    record = certified.parameters["certificate"]
    assert record["paths"] == 9 and record["threshold"] == certified.thresholds
    assert record["bound"] <= 1.0 and certified.accuracy_drop <= record["bound"] + 1e-9
    assert plain.relative_macs <= certified.relative_macs < 1.35  # saves, and costs more than the in-sample point
    agreement = chain.calibrate("agreement", max_disagreement=0.1, confidence_level=0.9)
    assert 1 - agreement.agreement <= agreement.parameters["certificate"]["bound"] <= 0.1
    with pytest.raises(ValueError, match="clopper-pearson"):
        chain.calibrate("max-drop", max_drop=1.0, confidence_level=0.9, certificate="clopper-pearson")


def test_from_logits_uses_each_stages_confidence_like_the_two_model_simulation():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (500,), generator=generator)
    logits = [torch.randn(500, 10, generator=generator) + k * torch.nn.functional.one_hot(labels, 10) for k in (2, 4)]
    base = torch.randn(500, 10, generator=generator) + 6 * torch.nn.functional.one_hot(labels, 10)
    chain = ChainSimulation.from_logits(logits, base, labels, [0.1, 0.3], confidence_metrics=["margin", "max_prob"])
    for stage, stage_logits, metric in zip(chain.stages, logits, ["margin", "max_prob"], strict=True):
        alone = CascadeSimulation.from_logits(stage_logits, base, labels, confidence_metric=metric)
        np.testing.assert_array_equal(stage.confidence, alone.confidence)
        np.testing.assert_array_equal(stage.saver_predictions, alone.saver_predictions)


def test_stage_macs_need_not_increase_and_are_simulated_as_given():
    chain = synthetic_chain(1, macs=[0.25, 0.125])
    result = chain.evaluate([0.5, 0.5])
    rates = result.exit_rates
    assert result.relative_macs == pytest.approx(rates[0] * 0.25 + rates[1] * 0.375 + rates[2] * 1.375)


def test_bad_inputs_give_clear_errors():
    rng = np.random.default_rng(0)
    c, p = rng.random(10), rng.integers(0, 3, 10)
    with pytest.raises(ValueError, match="at least one saver"):
        ChainSimulation([], [], p, p)
    with pytest.raises(ValueError, match="Stage 2 of 2.*confidence has 9 samples"):
        ChainSimulation([c, c[:9]], [p, p[:9]], p, p)
    with pytest.raises(ValueError, match="Stage 1 of 2.*NaN"):
        ChainSimulation([np.where(np.arange(10) == 3, np.nan, c), c], [p, p], p, p)
    with pytest.raises(ValueError, match="2 savers but 1 stage_macs"):
        ChainSimulation([c, c], [p, p], p, p, stage_macs=[0.1])
    with pytest.raises(ValueError, match="2 savers' confidences but 1"):
        ChainSimulation([c, c], [p], p, p)
    with pytest.raises(ValueError, match="relative_saver_macs must be a finite number >= 0"):
        ChainSimulation([c, c], [p, p], p, p, stage_macs=[0.1, -1.0])
    chain = ChainSimulation([c, c], [p, p], p, p, stage_macs=[0.1, 0.2])
    with pytest.raises(ValueError, match="paper-no-loss"):
        chain.calibrate("paper-no-loss")
    with pytest.raises(ValueError, match="give 2 thresholds"):
        chain.evaluate([0.5])
    with pytest.raises(ValueError, match="max_drop"):
        chain.calibrate("max-drop", max_drop=float("nan"))
    with pytest.raises(TypeError, match="Wrong parameters for objective 'budget'"):
        chain.calibrate("budget", max_drop=1.0)
    with pytest.raises(ValueError, match="needs labels"):
        ChainSimulation([c, c], [p, p], p, None).calibrate("max-drop", max_drop=1.0)
    assert ChainSimulation([c, c], [p, p], p, None).calibrate("budget", relative_macs=0.8).accuracy is None


def test_docstring_examples_run():
    import doctest

    from hf_tinysaver.calibration.chain import ChainSimulation

    text = ChainSimulation.__doc__.replace("```python", "").replace("```", "")
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(doctest.DocTestParser().get_doctest(text, {}, "ChainSimulation", None, 0))
    summary = runner.summarize(verbose=False)
    assert summary.attempted > 0 and summary.failed == 0


@pytest.mark.slow
@requires_shared("datasets/cifar10-jpeg", "models/cifar10-resnet/resnet20-12fca82f.th")
def test_real_cifar_three_stage_chain_equals_a_sequential_forward(shared_dir):
    """ResNet-20 -> ResNet-32 -> ResNet-56 on CIFAR-10 `test[:1000]`: calibrated from cached records, then run stage
    by stage with torch on exactly the images that reach each stage, with `first_exit`."""
    from hf_tinysaver.models.confidence import compute_confidence
    from hf_tinysaver.models.image_processing_tinysaver import TinySaverImageProcessor
    from hf_tinysaver.records import record
    from hf_tinysaver.sources import load_dataset_split
    from hf_tinysaver.zoo import load_zoo_model

    torch.set_num_threads(1)
    names = ["cifar10-resnet20", "cifar10-resnet32", "cifar10-resnet56"]
    models = [load_zoo_model(name, shared_dir) for name in names]
    processors = [TinySaverImageProcessor(preprocessing=model.config.preprocessing) for model in models]
    dataset = load_dataset_split("cifar10", "test[:1000]", assets=shared_dir)
    cache_dir = REPO_ROOT / ".cache" / "records"  # git-ignored; a second run only calibrates
    records = [
        record(model, processor, dataset, split="test[:1000]", batch_size=250, cache_dir=cache_dir, progress=False)
        for model, processor in zip(models, processors, strict=True)
    ]
    base_macs = models[-1].config.macs
    stage_macs = [model.config.macs / base_macs for model in models[:-1]]
    labels = records[-1].labels
    chain = ChainSimulation.from_logits([r.logits for r in records[:-1]], records[-1].logits, labels, stage_macs)

    def forward(thresholds):
        """The chain run for real: each stage on the images no earlier stage answered."""
        answers = np.full(len(dataset), -1)
        stage_of = np.full(len(dataset), len(models) - 1)
        spent = 0.0
        remaining = np.arange(len(dataset))
        for stage, (model, processor) in enumerate(zip(models, processors, strict=True)):
            if len(remaining) == 0:
                break
            logits = []
            for start in range(0, len(remaining), 100):
                images = dataset.select(remaining[start : start + 100].tolist())["image"]
                with torch.no_grad():
                    logits.append(model(**processor(images=images, return_tensors="pt")).logits)
            logits = torch.cat(logits)
            spent += len(remaining) * model.config.macs
            if stage == len(models) - 1:
                answers[remaining] = logits.argmax(-1).numpy()
                break
            confidence = compute_confidence(logits)[:, None]
            leaves = first_exit(confidence, [thresholds[stage]]).numpy() == 0
            answers[remaining[leaves]] = logits.argmax(-1).numpy()[leaves]
            stage_of[remaining[leaves]] = stage
            remaining = remaining[~leaves]
        exit_rates = (np.bincount(stage_of, minlength=len(models)) / len(dataset)).tolist()
        return float(np.mean(answers == labels)), exit_rates, spent / len(dataset) / base_macs

    results = [
        chain.calibrate("max-drop", max_drop=0.0),
        chain.calibrate("max-drop", max_drop=1.0),
        chain.calibrate("budget", relative_macs=0.5),
        chain.calibrate("max-drop", max_drop=1.0, confidence_level=0.9),
    ]
    for result in results:
        accuracy, exit_rates, relative_macs = forward(result.thresholds)
        assert accuracy == result.accuracy and exit_rates == result.exit_rates
        assert relative_macs == pytest.approx(result.relative_macs, rel=1e-12)
    # Both savers answer some images at a 1-point drop, and the chain saves against the base.
    assert min(results[1].exit_rates[:2]) > 0 and results[1].relative_macs < 0.6
