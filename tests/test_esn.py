"""Exit Sequence Network: causal exits along a frozen base, stage-by-stage early exit, training, thresholds, saving."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from conftest import SHARED, random_images, requires_shared
from hf_tinysaver import (
    CIFAR10_LABELS,
    CifarResNetConfig,
    CifarResNetForImageClassification,
    TinySaverESNConfig,
    TinySaverESNForImageClassification,
)
from hf_tinysaver.calibration.multi_exit import (
    ExitRecords,
    evaluate_exits,
    search_exit_thresholds,
    sequential_thresholds,
)
from hf_tinysaver.models.confidence import first_exit
from hf_tinysaver.models.modeling_tinysaver_esn import (
    ExitSequenceNetwork,
    count_macs_of,
    esn_loss,
    staged_classifier,
)
from hf_tinysaver.workflows.esn import (
    ExitFeatures,
    cached_exit_features,
    exit_records,
    extract_exit_features,
    train_exit_sequence,
)
from tiny_models import randomize, timm_classifier, tiny_resnet, tiny_vit, tiny_vit_preprocessing

CIFAR_SPEC = {
    "input_size": [3, 32, 32],
    "resize": "fixed",
    "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
CIFAR_LABELS = dict(enumerate(CIFAR10_LABELS))
ESN_REMOTE_CODE_FILES = {
    "configuration_tinysaver_esn.py",
    "modeling_tinysaver_esn.py",
    "configuration_tinysaver.py",
    "modeling_tinysaver.py",
    "image_processing_tinysaver.py",
    "confidence.py",
    "configuration_cifar_resnet.py",
    "modeling_cifar_resnet.py",
    "staged_base.py",
    "mac_counting.py",
    "inference_optimization.py",
}


@pytest.fixture(autouse=True)
def _single_thread():
    # These models are tiny: extra threads only add OpenMP spin-wait, which on a busy machine costs 10-100x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cifar(depth: int, seed: int, widths=(8, 16, 16)) -> CifarResNetForImageClassification:
    torch.manual_seed(seed)
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=depth, widths=list(widths)))
    randomize(model, seed)
    model.config.preprocessing = dict(CIFAR_SPEC)
    return model.eval()


def randomize_esn(esn: ExitSequenceNetwork, seed: int, head_scale: float = 1.0) -> None:
    """Non-zero heads and weights, so exits differ from the saver and from each other."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in esn.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * (0.3 if parameter.ndim > 1 else 0.1))
        for head in esn.exit_heads:
            head.weight.mul_(head_scale)


def cifar_esn(width: int = 16, layers: int = 1, heads: int = 2, seed: int = 0, **kwargs):
    model = TinySaverESNForImageClassification.from_saver_and_base(
        tiny_cifar(8, seed),
        tiny_cifar(14, seed + 1),
        esn_width=width,
        esn_layers=layers,
        esn_num_heads=heads,
        **kwargs,
    )
    randomize_esn(model.esn, seed)
    return model


def gap_thresholds(confidences: torch.Tensor) -> list[float]:
    """Thresholds that let about half of the images still there leave at each exit, each halfway between two
    neighbouring confidences so that float rounding cannot flip a decision."""
    remaining = torch.ones(confidences.shape[0], dtype=torch.bool)
    thresholds = []
    for column in confidences.T:
        values = column[remaining].sort().values
        middle = len(values) // 2
        threshold = float((values[middle - 1] + values[middle]) / 2)
        thresholds.append(threshold)
        remaining &= ~(column > threshold)
    return thresholds


def gap_thresholds_of(model, **inputs) -> list[float]:
    """[`gap_thresholds`] of the saver's and every exit's confidences (max prob) on `inputs`, for the whole base."""
    with torch.no_grad():
        everything = model(**inputs, output_all_exits=True)
    confidences = torch.stack(
        [everything.saver_confidence]
        + [torch.softmax(everything.exit_logits[:, p].double(), -1).amax(-1) for p in range(model.esn.num_exits)],
        dim=1,
    )
    return gap_thresholds(confidences)


@pytest.fixture(scope="module")
def cifar_model():
    return cifar_esn()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# --- causal masking ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [0, 1, 2, 3])
def test_changing_a_later_stage_never_changes_an_earlier_exit(layers):
    dims = [6, 5, 7, 9]
    esn = ExitSequenceNetwork(dims, num_labels=4, width=8, num_layers=layers, num_heads=2, mlp_ratio=2.0).eval()
    randomize_esn(esn, seed=layers)
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(5, dim, generator=generator) for dim in dims]
    saver_logits = torch.randn(5, 4, generator=generator)
    with torch.no_grad():
        reference = esn(features, saver_logits)
        for changed in range(1, len(dims)):
            modified = list(features)
            modified[changed] = torch.randn(
                modified[changed].shape, generator=generator
            )  # LayerNorm ignores affine changes
            outputs = esn(modified, saver_logits)
            # exits 1..changed-1 (columns 0..changed-2) are bit-identical, exit `changed` reacts.
            assert torch.equal(outputs[:, : changed - 1], reference[:, : changed - 1])
            assert not torch.allclose(outputs[:, changed - 1], reference[:, changed - 1])
            if layers > 0 and changed < len(dims) - 1:
                assert not torch.allclose(outputs[:, changed], reference[:, changed]), "later exits must see it"


def test_stage_by_stage_exit_equals_whole_sequence_exit():
    dims = [6, 5, 7]
    esn = ExitSequenceNetwork(dims, num_labels=4, width=8, num_layers=2, num_heads=2, mlp_ratio=2.0).eval()
    randomize_esn(esn, seed=4)
    features = [torch.randn(5, dim) for dim in dims]
    saver_logits = torch.randn(5, 4)
    with torch.no_grad():
        whole = esn(features, saver_logits)
        tokens = esn.embed(0, features[0]).unsqueeze(1)
        for exit_number in (1, 2):
            tokens = torch.cat([tokens, esn.embed(exit_number, features[exit_number]).unsqueeze(1)], dim=1)
            torch.testing.assert_close(esn.exit_logits(tokens, saver_logits), whole[:, exit_number - 1])


def test_untrained_exits_answer_exactly_what_the_saver_answers():
    esn = ExitSequenceNetwork([6, 5, 7], num_labels=4, width=8, num_layers=1, num_heads=2, mlp_ratio=2.0)
    saver_logits = torch.randn(3, 4)
    with torch.no_grad():
        outputs = esn([torch.randn(3, 6), torch.randn(3, 5), torch.randn(3, 7)], saver_logits)
    assert torch.equal(outputs, saver_logits.unsqueeze(1).expand(-1, 2, -1))


def test_last_block_has_attention_but_no_feed_forward():
    esn = ExitSequenceNetwork([4, 4], num_labels=3, width=8, num_layers=3, num_heads=2, mlp_ratio=2.0)
    assert [block.feed_forward is not None for block in esn.blocks] == [True, True, False]
    assert all(head.bias is None for head in esn.exit_heads)
    assert not any("position" in name for name, _ in esn.named_parameters())


# --- early exit: later stages are really skipped ----------------------------------------------------------------


def count_stage_rows(model):
    counts = {name: [] for name in model.staged_base.stage_names}
    handles = [
        model.staged_base.stage(index).register_forward_hook(
            lambda module, args, output, name=name: counts[name].append(args[0].shape[0])
        )
        for index, name in enumerate(model.staged_base.stage_names)
    ]
    return counts, handles


def test_early_exited_rows_skip_later_base_stages(cifar_model, pixels):
    model = cifar_model
    thresholds = gap_thresholds_of(model, pixel_values=pixels)
    counts, handles = count_stage_rows(model)
    try:
        with torch.no_grad():
            outputs = model(pixel_values=pixels, threshold=thresholds[0], exit_thresholds=thresholds[1:])
    finally:
        for handle in handles:
            handle.remove()
    exit_index = outputs.exit_index
    assert sorted(set(exit_index.tolist())) == [0, 1, 2, 3], "the test needs images at every answer point"
    # layer1 runs for images past the saver, layer2 for those past exit 1, layer3 for those past exit 2; once each.
    assert counts == {
        "layer1": [int((exit_index >= 1).sum())],
        "layer2": [int((exit_index >= 2).sum())],
        "layer3": [int((exit_index >= 3).sum())],
    }
    assert torch.equal(outputs.exited, exit_index == 0)
    # The stage-by-stage answers equal those of the whole-base computation with the same thresholds.
    with torch.no_grad():
        simulated = model(
            pixel_values=pixels, threshold=thresholds[0], exit_thresholds=thresholds[1:], output_all_exits=True
        )
    assert torch.equal(exit_index, simulated.exit_index)
    torch.testing.assert_close(outputs.logits, simulated.logits, atol=1e-5, rtol=1e-5)


def test_base_never_runs_when_all_leave_at_the_saver_and_stops_after_the_first_exit(cifar_model, pixels):
    counts, handles = count_stage_rows(cifar_model)
    try:
        with torch.no_grad():
            at_saver = cifar_model(pixel_values=pixels, threshold=-1.0)
            after_layer1 = cifar_model(pixel_values=pixels, threshold=1.0, exit_thresholds=[-1.0, -1.0])
    finally:
        for handle in handles:
            handle.remove()
    assert at_saver.exited.all() and (after_layer1.exit_index == 1).all()
    assert counts == {"layer1": [len(pixels)], "layer2": [], "layer3": []}


def test_closed_exits_give_exactly_the_base_answer(cifar_model, pixels):
    with torch.no_grad():
        outputs = cifar_model(pixel_values=pixels, threshold=1.0, exit_thresholds=[1.0, 1.0])
        base_logits = cifar_model.base(pixel_values=pixels).logits
    assert (outputs.exit_index == 3).all()
    torch.testing.assert_close(outputs.logits, base_logits, atol=1e-6, rtol=0)


def test_records_simulation_matches_the_real_forward(cifar_model, pixels):
    features = ExitFeatures(labels=torch.zeros(len(pixels), dtype=torch.long), **_features_of(cifar_model, pixels))
    records = exit_records(cifar_model, features)
    thresholds = gap_thresholds(torch.from_numpy(records.confidences))
    with torch.no_grad():
        outputs = cifar_model(pixel_values=pixels, threshold=thresholds[0], exit_thresholds=thresholds[1:])
    exit_index = first_exit(torch.from_numpy(records.confidences), thresholds).numpy()
    assert exit_index.tolist() == outputs.exit_index.tolist()
    assert records.predictions[np.arange(len(exit_index)), exit_index].tolist() == outputs.logits.argmax(-1).tolist()


@pytest.mark.slow
@requires_shared("models/cifar10-resnet", "datasets/cifar10-jpeg")
def test_forward_stream_answers_like_forward_on_real_cifar():
    from hf_tinysaver.zoo import load_zoo_dataset, load_zoo_model

    model = TinySaverESNForImageClassification.from_saver_and_base(
        load_zoo_model("cifar10-resnet20", assets=str(SHARED)), load_zoo_model("cifar10-resnet56", assets=str(SHARED))
    ).eval()
    randomize_esn(model.esn, seed=5)
    images = load_zoo_dataset("cifar10", "test[5000:5192]", assets=str(SHARED))["image"]
    pixel_values = model.get_image_processor()(images=images, return_tensors="pt")["pixel_values"]
    thresholds = gap_thresholds_of(model, pixel_values=pixel_values)
    model.config.threshold, model.config.exit_thresholds = thresholds[0], thresholds[1:]
    with torch.no_grad():
        expected = model(pixel_values=pixel_values)
    assert sorted(set(expected.exit_index.tolist())) == list(range(model.esn.num_exits + 2)), "images at every exit"

    streamed = list(model.forward_stream(pixel_values.split([64, 1, 63, 64])))
    assert [len(output.logits) for output in streamed] == [64, 1, 63, 64]
    assert torch.equal(torch.cat([output.exit_index for output in streamed]), expected.exit_index)
    assert torch.equal(torch.cat([output.exited for output in streamed]), expected.exited)
    torch.testing.assert_close(torch.cat([output.logits for output in streamed]), expected.logits, atol=1e-5, rtol=0)
    assert torch.is_grad_enabled(), "the stream must not leave gradients switched off for its caller"

    overridden = list(
        model.forward_stream([pixel_values], threshold=1.0, exit_thresholds=[1.0] * model.esn.num_exits)
    )[0]
    assert bool((overridden.exit_index == model.esn.num_exits + 1).all()), "closed exits send every image to the base"
    with pytest.raises(ValueError, match="cannot pool images across batches"):
        next(model.forward_stream([pixel_values], base_batch_size=32))


def test_decision_hooks_see_every_batch_of_forward_and_forward_stream(cifar_model, pixels):
    seen = []
    handle = cifar_model.register_decision_hook(lambda model, inputs, base_inputs, output: seen.append(output))
    try:
        with torch.no_grad():
            direct = cifar_model(pixel_values=pixels)
        streamed = list(cifar_model.forward_stream(pixels.split(10)))
    finally:
        handle.remove()
    assert [len(output.exited) for output in seen] == [24, 10, 10, 4]
    assert torch.equal(seen[0].exit_index, direct.exit_index)
    assert all(hooked is output for hooked, output in zip(seen[1:], streamed, strict=True))


def _features_of(model, pixels):
    with torch.no_grad():
        return model.compute_exit_features(pixels)


# --- training: only the ESN moves ------------------------------------------------------------------------------


def test_training_changes_only_the_esn(pixels):
    model = cifar_esn(seed=5)
    frozen_before = {
        name: tensor.clone() for name, tensor in model.state_dict().items() if not name.startswith("esn.")
    }
    esn_before = {name: tensor.clone() for name, tensor in model.esn.state_dict().items()}
    labels = torch.arange(len(pixels)) % 10

    # Through the model's own forward on pixels (train mode: the base's BatchNorm must not update its statistics)...
    model.train()
    assert not model.saver.training and not model.base.training and model.esn.training
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        loss = model(pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # ...and on cached features.
    model.eval()
    features = ExitFeatures(labels=labels, **_features_of(model, pixels))
    losses = train_exit_sequence(model, features, epochs=3, batch_size=8, learning_rate=1e-2)

    assert len(losses) == 3 and all(np.isfinite(losses))
    assert not model.training and not model.esn.training
    for name, tensor in model.state_dict().items():
        if not name.startswith("esn."):
            assert torch.equal(tensor, frozen_before[name]), f"frozen tensor {name} changed"
    assert any(not torch.equal(model.esn.state_dict()[name], esn_before[name]) for name in esn_before)
    assert all(not p.requires_grad for p in model.saver.parameters())
    assert all(not p.requires_grad for p in model.base.parameters())


def test_training_on_learnable_data_reduces_the_loss(pixels):
    model = cifar_esn(seed=6)
    model.esn.reset_parameters()
    features = ExitFeatures(labels=torch.arange(len(pixels)) % 3, **_features_of(model, pixels))
    losses = train_exit_sequence(model, features, epochs=30, batch_size=8, learning_rate=3e-3)
    assert losses[-1] < 0.5 * losses[0]


def test_esn_loss_weights_images_by_saver_doubt():
    exit_logits = torch.randn(3, 2, 5)
    labels = torch.tensor([0, 1, 2])
    saver_logits = torch.tensor([[1e4, 0, 0, 0, 0], [0.0] * 5, [2.0, 1, 0, 0, 0]])
    weights = 2 * (1 - torch.softmax(saver_logits, -1).amax(-1))
    per_exit = torch.stack(
        [torch.nn.functional.cross_entropy(exit_logits[:, p], labels, reduction="none") for p in range(2)], 1
    )
    expected = (weights * per_exit.sum(1)).mean()
    torch.testing.assert_close(esn_loss(exit_logits, labels, saver_logits), expected)
    assert weights[0] == 0 and weights[1] == pytest.approx(1.6)


def test_forward_with_labels_returns_the_training_objective(cifar_model, pixels):
    labels = torch.arange(len(pixels)) % 10
    with torch.no_grad():
        outputs = cifar_model(pixel_values=pixels, labels=labels)
    assert outputs.exit_logits.shape == (len(pixels), 2, 10)
    torch.testing.assert_close(outputs.loss, esn_loss(outputs.exit_logits, labels, outputs.saver_logits))


# --- thresholds -------------------------------------------------------------------------------------------------


def brute_force_exits(confidence, correct_if_exit, correct_otherwise, min_correct):
    best = 0
    for threshold in np.concatenate([[2.0], confidence, [-1.0]]):
        leaving = confidence > threshold
        right = correct_if_exit[leaving].sum() + correct_otherwise[~leaving].sum()
        if right >= min_correct - 1e-9:
            best = max(best, int(leaving.sum()))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_each_sequential_step_lets_the_most_images_exit(seed):
    rng = np.random.default_rng(seed)
    count = 40
    labels = rng.integers(0, 3, count)
    confidences = np.round(rng.random((count, 2)), 1)  # many ties
    right = rng.random((count, 3)) < np.array([[0.6, 0.7, 0.8]])
    records = ExitRecords(confidences, np.where(right, labels[:, None], (labels[:, None] + 1) % 3), labels)
    max_drop = (0.0, 5.0, 10.0)[seed % 3]
    thresholds = sequential_thresholds(records, [max_drop, max_drop])

    correct = records.correct
    min_correct = correct[:, -1].sum() - max_drop / 100 * count
    first = confidences[:, 0] > thresholds[0]
    assert first.sum() == brute_force_exits(confidences[:, 0], correct[:, 0], correct[:, -1], min_correct)
    rest = ~first
    second = rest & (confidences[:, 1] > thresholds[1])
    assert second.sum() == brute_force_exits(
        confidences[rest, 1], correct[rest, 1], correct[rest, -1], min_correct - correct[first, 0].sum()
    )
    answers = np.where(first, correct[:, 0], np.where(second, correct[:, 1], correct[:, -1]))
    assert answers.sum() >= min_correct - 1e-9


def synthetic_records(count=2000, exits=3, seed=0) -> ExitRecords:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    difficulty = rng.random(count)
    confidences = np.clip(1 - difficulty[:, None] + rng.normal(0, 0.1, (count, exits)), 0, 1)
    skill = np.linspace(0.6, 0.85, exits + 1)
    right = rng.random((count, exits + 1)) < np.clip(skill[None, :] + 0.4 * (0.5 - difficulty[:, None]), 0, 1)
    predictions = np.where(right, labels[:, None], (labels[:, None] + 1) % 10)
    return ExitRecords(confidences=confidences, predictions=predictions, labels=labels)


@pytest.mark.parametrize("max_drop", [0.0, 0.5, 2.0])
def test_sequential_search_meets_the_drop_and_beats_greedy_or_ties(max_drop):
    records = synthetic_records()
    exit_macs, base_macs = [30, 60, 90, 130], 100
    result = search_exit_thresholds(records, exit_macs, base_macs, max_drop)
    assert result.calibration["accuracy_drop"] <= max_drop + 1e-9
    assert result.calibration == evaluate_exits(records, result.thresholds, exit_macs, base_macs)
    greedy = evaluate_exits(records, sequential_thresholds(records, [max_drop] * 3), exit_macs, base_macs)
    assert greedy["accuracy_drop"] <= max_drop + 1e-9
    assert result.calibration["relative_macs"] <= greedy["relative_macs"]
    assert result.candidates == 66 and result.allowed_drops[-1] == max_drop
    assert sum(result.calibration["exit_rates"]) == pytest.approx(1.0)


def test_first_exit_is_searched_first_and_later_exits_only_take_the_rest():
    records = synthetic_records(seed=1)
    thresholds = sequential_thresholds(records, [1.0, 1.0, 1.0])
    saver_alone = sequential_thresholds(records.saver_only(), [1.0])
    assert thresholds[0] == saver_alone[0]


def test_first_exit_takes_the_first_passing_exit():
    confidences = torch.tensor([[0.9, 0.9], [0.1, 0.9], [0.1, 0.1], [0.5, 0.2]], dtype=torch.float64)
    assert first_exit(confidences, [0.5, 0.5]).tolist() == [0, 1, 2, 2]


# --- MACs -------------------------------------------------------------------------------------------------------


def test_exit_macs_add_up_stage_by_stage(cifar_model):
    config, staged = cifar_model.config, cifar_model.staged_base
    probe = torch.randn(1, 3, 32, 32)
    base_full = count_macs_of(lambda x: cifar_model.base(pixel_values=x), probe)
    saver_full = count_macs_of(lambda x: cifar_model.saver(pixel_values=x), probe)
    assert config.base_macs == base_full and config.saver_macs == saver_full
    with torch.no_grad():
        _, stage_outputs = staged.forward(probe)
    stem = count_macs_of(staged.run_stem, probe)
    stages = [count_macs_of(staged.run_stage, 0, staged.run_stem(probe))] + [
        count_macs_of(staged.run_stage, index, stage_outputs[index - 1]) for index in (1, 2)
    ]
    head = count_macs_of(staged.run_head, stage_outputs[-1])
    assert stem + sum(stages) + head == base_full
    macs = config.exit_macs
    assert len(macs) == 4 and macs[0] == saver_full
    without_esn = [saver_full + stem + stages[0], saver_full + stem + stages[0] + stages[1], saver_full + base_full]
    esn_overheads = [total - plain for total, plain in zip(macs[1:], without_esn, strict=True)]
    # Each exit adds a token and a pass over the tokens so far; the final answer carries every exit's ESN work.
    assert 0 < esn_overheads[0] < esn_overheads[1] == esn_overheads[2] < 0.05 * base_full
    assert config.relative_exit_macs == [m / base_full for m in macs]


# --- supported bases --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_base",
    [
        lambda: tiny_cifar(14, 0),
        lambda: timm_classifier("test_resnet", seed=1),
        lambda: timm_classifier("test_efficientnet", seed=1),
        lambda: timm_classifier("test_convnext", seed=1),
        lambda: timm_classifier("mobilenetv3_small_050", seed=1),
        lambda: tiny_resnet(),
    ],
    ids=["cifar_resnet", "timm_resnet", "timm_efficientnet", "timm_convnext", "timm_mobilenetv3", "hf_resnet"],
)
def test_staged_forward_reproduces_the_base(make_base):
    base = make_base()
    size = 64 if hasattr(base, "timm_model") else 32
    pixels = torch.randn(2, 3, size, size)
    staged = staged_classifier(base)
    with torch.no_grad():
        logits, stage_outputs = staged.forward(pixels)
        expected = base(pixel_values=pixels).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert len(stage_outputs) == len(staged) >= 2


def test_timm_base_with_its_own_preprocessing(images):
    model = TinySaverESNForImageClassification.from_saver_and_base(
        tiny_cifar(8, 0), timm_classifier("test_resnet", seed=1, labels=CIFAR_LABELS), esn_width=16, esn_num_heads=2
    )
    assert model.config.exit_stages == ["timm_model.layer1", "timm_model.layer2", "timm_model.layer3"]
    randomize_esn(model.esn, 0, head_scale=0.1)
    inputs = model.get_image_processor()(images=images, return_tensors="pt")
    assert set(inputs) == {"pixel_values", "base_pixel_values"}
    with torch.no_grad():
        closed = model(**inputs, threshold=1.0, exit_thresholds=[1.0] * 3)
        base_logits = model.base(pixel_values=inputs["base_pixel_values"]).logits
    torch.testing.assert_close(closed.logits, base_logits, atol=1e-5, rtol=0)


def test_unsupported_base_is_a_clear_error():
    with pytest.raises(ValueError, match="Supported bases"):
        TinySaverESNForImageClassification.from_saver_and_base(
            timm_classifier("test_efficientnet"), tiny_vit(32), base_preprocessing=tiny_vit_preprocessing(32)
        )


def test_last_stage_cannot_carry_an_exit():
    with pytest.raises(ValueError, match="base's own classifier answers"):
        TinySaverESNForImageClassification.from_saver_and_base(
            tiny_cifar(8, 0), tiny_cifar(14, 1), exit_stages=["layer1", "layer3"]
        )


def test_config_validates_thresholds_and_always_writes_the_esn_keys():
    with pytest.raises(ValueError, match="one threshold per ESN exit"):
        TinySaverESNConfig(exit_stages=["layer1", "layer2"], exit_thresholds=[0.5])
    with pytest.raises(ValueError, match="must divide"):
        TinySaverESNConfig(esn_width=10, esn_num_heads=4)
    config = TinySaverESNConfig(exit_stages=["layer1"])
    assert config.exit_thresholds == [1.0]
    assert {"esn_width", "esn_layers", "exit_stages", "exit_thresholds", "exit_macs"} <= set(config.to_diff_dict())


# --- save / load ------------------------------------------------------------------------------------------------


FRESH_PROCESS_SCRIPT = """
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

directory, images_path = sys.argv[1:3]
model = AutoModelForImageClassification.from_pretrained(directory, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained(directory, trust_remote_code=True)
images = [Image.fromarray(a.numpy()) for a in torch.load(images_path)]
with torch.no_grad():
    outputs = model(**processor(images=images, return_tensors="pt"))
predictions = pipeline("image-classification", model=directory, trust_remote_code=True)(images[0], top_k=2)
result = {"logits": outputs.logits, "exit_index": outputs.exit_index, "module": type(model).__module__,
          "training": model.training, "predictions": predictions}
"""


@pytest.fixture(scope="module")
def saved_esn(tmp_path_factory):
    directory = tmp_path_factory.mktemp("esn")
    model = TinySaverESNForImageClassification.from_saver_and_base(
        tiny_cifar(8, 0),
        timm_classifier("test_resnet", seed=1, labels=CIFAR_LABELS),
        esn_width=16,
        esn_layers=2,
        esn_num_heads=2,
    )
    randomize_esn(model.esn, 1, head_scale=0.2)
    arrays = torch.stack([torch.from_numpy(np.array(image.resize((40, 40)))) for image in random_images(12, seed=5)])
    inputs = model.get_image_processor()(images=[_pil(a) for a in arrays], return_tensors="pt")
    thresholds = gap_thresholds_of(model, **inputs)
    model.config.threshold, model.config.exit_thresholds = thresholds[0], thresholds[1:]
    model.save_pretrained(directory)
    return directory, model, arrays, inputs


def _pil(array):
    from PIL import Image

    return Image.fromarray(array.numpy())


def test_saved_folder_carries_config_weights_processor_and_remote_code(saved_esn):
    directory, model, _, _ = saved_esn
    files = {path.name for path in directory.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} | ESN_REMOTE_CODE_FILES <= files
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_tinysaver_esn.TinySaverESNConfig",
        "AutoModelForImageClassification": "modeling_tinysaver_esn.TinySaverESNForImageClassification",
    }
    assert config["exit_thresholds"] == model.config.exit_thresholds and config["esn_layers"] == 2
    assert config["exit_macs"] == model.config.exit_macs


def test_reload_gives_identical_answers_and_stays_frozen(saved_esn):
    directory, model, _, inputs = saved_esn
    reloaded = AutoModelForImageClassification.from_pretrained(directory)
    assert type(reloaded) is TinySaverESNForImageClassification and not reloaded.training
    assert not any(p.requires_grad for p in reloaded.base.parameters())
    with torch.no_grad():
        expected, actual = model(**inputs), reloaded(**inputs)
    assert torch.equal(actual.logits, expected.logits) and torch.equal(actual.exit_index, expected.exit_index)
    assert len(set(expected.exit_index.tolist())) >= 3, "the round trip should cover several answer points"
    processor = AutoImageProcessor.from_pretrained(directory)
    assert processor.base_preprocessing == model.config.base_preprocessing


def test_fresh_process_without_hf_tinysaver_loads_with_remote_code(saved_esn, tmp_path, run_without_hf_tinysaver):
    directory, model, arrays, inputs = saved_esn
    torch.save(arrays, tmp_path / "images.pt")
    out = run_without_hf_tinysaver(FRESH_PROCESS_SCRIPT, directory, tmp_path / "images.pt", cwd=tmp_path)
    assert not out["training"]
    with torch.no_grad():
        expected = model(**inputs)
    assert torch.equal(out["exit_index"], expected.exit_index)
    assert torch.equal(out["logits"], expected.logits)
    assert len(out["predictions"]) == 2 and out["predictions"][0]["label"] in model.config.id2label.values()


def test_pipeline_serves_the_esn(saved_esn):
    directory, model, arrays, _ = saved_esn
    classifier = pipeline("image-classification", model=str(directory))
    result = classifier(_pil(arrays[0]), top_k=1)[0]
    with torch.no_grad():
        logits = model(**model.get_image_processor()(images=_pil(arrays[0]), return_tensors="pt")).logits[0]
    assert result["label"] == model.config.id2label[int(logits.argmax())]


def test_push_to_hub_and_load_by_id(saved_esn, tmp_path):
    from hub_server import DEFAULT_TOKEN, FakeHub

    _, model, _, inputs = saved_esn
    repo_id = "tester/tiny-esn"
    with FakeHub(tmp_path / "hub") as hub, hub.client_environment(tmp_path / "hf_home", token=DEFAULT_TOKEN):
        model.push_to_hub(repo_id)
        assert ESN_REMOTE_CODE_FILES | {"config.json", "model.safetensors", "README.md"} <= set(
            hub.commits(repo_id)[0].files
        )
        reloaded = AutoModelForImageClassification.from_pretrained(repo_id, trust_remote_code=True)
    with torch.no_grad():
        expected, actual = model(**inputs), reloaded(**inputs)
    assert torch.equal(actual.logits, expected.logits) and torch.equal(actual.exit_index, expected.exit_index)


def test_push_a_saved_folder(saved_esn, tmp_path):
    from hf_tinysaver.hub.push import push_cascade
    from hub_server import DEFAULT_TOKEN, FakeHub

    directory, model, _, _ = saved_esn
    with FakeHub(tmp_path / "hub") as hub, hub.client_environment(tmp_path / "hf_home", token=DEFAULT_TOKEN):
        push_cascade(directory, "tester/esn-folder")
        uploaded = json.loads(hub.file_bytes("tester/esn-folder", "config.json"))
    assert uploaded["model_type"] == "tinysaver_esn" and uploaded["exit_thresholds"] == model.config.exit_thresholds


# --- features cache and CLI end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cifar")
    (root / "data").mkdir()
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CifarResNetConfig().id2label.values()))}
    )
    for split, count, seed in (("train", 48, 0), ("test", 32, 1)):
        images = random_images(count, sizes=((32, 32),), seed=seed)
        labels = [int(np.asarray(image).mean() * 7) % 10 for image in images]
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    return root


def test_feature_cache_is_keyed_on_content_and_reused(cifar_model, tiny_dataset_dir, tmp_path):
    dataset = datasets.load_dataset(str(tiny_dataset_dir), split="test")
    first = cached_exit_features(cifar_model, dataset, cache_dir=tmp_path, batch_size=8)
    files = list(tmp_path.glob("features-*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob(".*tmp"))
    again = cached_exit_features(cifar_model, dataset, cache_dir=tmp_path)
    assert torch.equal(again.base_logits, first.base_logits) and len(list(tmp_path.glob("features-*.pt"))) == 1
    fresh = extract_exit_features(cifar_model, dataset, batch_size=32)
    torch.testing.assert_close(fresh.stage_features[1], first.stage_features[1])
    cached_exit_features(cifar_model, dataset.select(range(10)), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("features-*.pt"))) == 2


def test_esn_train_cli_end_to_end(tiny_dataset_dir, tmp_path):
    from hf_tinysaver.commands import main

    saver_dir, base_dir = tmp_path / "saver", tmp_path / "base"
    tiny_cifar(8, 0).save_pretrained(saver_dir)
    tiny_cifar(14, 1).save_pretrained(base_dir)
    out_dir, results_file = tmp_path / "esn", tmp_path / "results" / "esn.json"
    exit_code = main(
        ["esn-train", "--saver", str(saver_dir), "--base", str(base_dir), "--dataset", str(tiny_dataset_dir)]
        + ["--width", "16", "--layers", "1", "--heads", "2", "--epochs", "2", "--train-batch-size", "16"]
        + ["--max-drop", "10"]
        + ["--out", str(out_dir), "--results-file", str(results_file), "--cache-dir", str(tmp_path / "cache")]
        + ["--no-progress"]
    )
    assert exit_code == 0
    results = json.loads(results_file.read_text())
    assert results["splits"] == {"train": "train", "calib": "test[:50%]", "eval": "test[50%:]"}
    from test_provenance import assert_provenance

    assert_provenance(results, "esn-train", "--results-file", str(results_file))
    for cascade in ("esn", "tinysaver"):
        assert results[cascade]["calibration"]["accuracy_drop"] <= 10 + 1e-9
        assert results[cascade]["eval"]["n"] == 16

    reloaded = AutoModelForImageClassification.from_pretrained(out_dir)
    thresholds = results["esn"]["thresholds"]
    assert [reloaded.config.threshold, *reloaded.config.exit_thresholds] == thresholds
    assert reloaded.config.calibration["max_drop"] == 10
    # The ESN stores the record the plain cascade stores: one schema, dated and versioned.
    from hf_tinysaver import __version__
    from hf_tinysaver.calibration.record import CalibrationRecord

    record = CalibrationRecord.from_dict(reloaded.config.calibration)
    assert record.provenance == results["provenance"]
    assert record.thresholds == thresholds and record.is_multi_exit
    assert record.n == results["esn"]["calibration"]["n"] == 16
    assert record.accuracy_drop == pytest.approx(results["esn"]["calibration"]["accuracy_drop"])
    assert (
        record.exit_rates == results["esn"]["calibration"]["exit_rates"] and record.exit_rate == record.exit_rates[0]
    )
    assert (record.dataset, record.split, record.saver) == (str(tiny_dataset_dir), "test[:50%]", str(saver_dir))
    assert record.hf_tinysaver_version == __version__ and record.date is not None
    assert record.to_dict() == reloaded.config.calibration
    # The deployed model's real early-exit forward reproduces the held-out numbers computed from records.
    eval_split = datasets.load_dataset(str(tiny_dataset_dir), split="test[50%:]")
    inputs = reloaded.get_image_processor()(images=list(eval_split["image"]), return_tensors="pt")
    with torch.no_grad():
        outputs = reloaded(**inputs)
    labels = torch.tensor(list(eval_split["label"]))
    assert float((outputs.logits.argmax(-1) == labels).float().mean()) == pytest.approx(
        results["esn"]["eval"]["accuracy"]
    )
    rates = np.bincount(outputs.exit_index.numpy(), minlength=4) / len(labels)
    assert rates.tolist() == pytest.approx(results["esn"]["eval"]["exit_rates"])


def test_docstring_examples_run():
    import doctest

    from hf_tinysaver.calibration import multi_exit
    from hf_tinysaver.models import modeling_tinysaver_esn
    from hf_tinysaver.workflows import esn

    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for name, obj in (
        ("TinySaverESNConfig", TinySaverESNConfig),
        ("TinySaverESNForImageClassification", modeling_tinysaver_esn.TinySaverESNForImageClassification),
        ("search_exit_thresholds", multi_exit.search_exit_thresholds),
        ("esn", esn),
    ):
        text = obj.__doc__.replace("```python", "").replace("```", "")
        runner.run(doctest.DocTestParser().get_doctest(text, {}, name, None, 0))
    assert runner.summarize(verbose=False).failed == 0
