"""The cascade model through its public API: construction, forward semantics, preprocessing, labels."""

from __future__ import annotations

import copy
import platform
import subprocess
import sys
from types import SimpleNamespace

import pytest
import timm.data
import torch

from conftest import SHARED, random_images, requires_shared
from hf_tinysaver import (
    TinySaverConfig,
    TinySaverForImageClassification,
    TinySaverImageProcessor,
    preprocessing_from_timm,
)
from tiny_models import LABELS, timm_classifier, tiny_resnet, tiny_vit, tiny_vit_preprocessing, tiny_vit_processor


@pytest.fixture(scope="module")
def timm_pair():
    saver = timm_classifier("test_efficientnet", seed=0)
    base = timm_classifier("test_resnet", seed=1)
    return saver, base


@pytest.fixture(scope="module")
def mixed_pair():
    return timm_classifier("test_efficientnet", seed=0), tiny_vit(image_size=32)


def build(saver, base, **kwargs):
    base_preprocessing = tiny_vit_preprocessing(32) if base.config.model_type == "vit" else None
    return TinySaverForImageClassification.from_saver_and_base(
        saver, base, base_preprocessing=base_preprocessing, **kwargs
    )


def standalone_timm_logits(model, images):
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model.timm_model))
    with torch.no_grad():
        return model(pixel_values=torch.stack([transform(image) for image in images])).logits


def standalone_vit_logits(model, images, image_size=32):
    inputs = tiny_vit_processor(image_size)(images=images, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def test_timm_pair_matches_standalone_models_on_their_own_preprocessing(timm_pair, images):
    saver, base = timm_pair
    cascade = build(saver, base)
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    assert set(inputs) == {"pixel_values", "base_pixel_values"}  # bicubic/ImageNet stats vs bilinear/0.5

    with torch.no_grad():
        all_base = cascade(**inputs, threshold=1.0)
        all_saver = cascade(**inputs, threshold=-1.0)
    torch.testing.assert_close(all_base.logits, standalone_timm_logits(base, images), atol=1e-4, rtol=0)
    torch.testing.assert_close(all_saver.logits, standalone_timm_logits(saver, images), atol=1e-4, rtol=0)


def test_timm_saver_transformers_base_matches_standalone(mixed_pair, images):
    saver, base = mixed_pair
    cascade = build(saver, base)
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == 160 and inputs["base_pixel_values"].shape[-1] == 32

    with torch.no_grad():
        all_base = cascade(**inputs, threshold=1.0)
        all_saver = cascade(**inputs, threshold=-1.0)
    torch.testing.assert_close(all_base.logits, standalone_vit_logits(base, images), atol=1e-4, rtol=0)
    torch.testing.assert_close(all_saver.logits, standalone_timm_logits(saver, images), atol=1e-4, rtol=0)


def test_no_exit_gives_exactly_base_logits_and_all_exit_exactly_saver_logits(mixed_pair, images):
    saver, base = mixed_pair
    cascade = build(saver, base)
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        base_logits = base(pixel_values=inputs["base_pixel_values"]).logits
        saver_logits = saver(pixel_values=inputs["pixel_values"]).logits
        no_exit = cascade(**inputs, threshold=1.0)
        all_exit = cascade(**inputs, threshold=0.0)
    assert not no_exit.exited.any() and all_exit.exited.all()
    assert torch.equal(no_exit.logits, base_logits)
    assert torch.equal(all_exit.logits, saver_logits)


class CallRecorder:
    """Counts the forward calls of a sub-model and the batch sizes it saw."""

    def __init__(self, module):
        self.batch_sizes = []
        self.handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        self.batch_sizes.append(pixel_values.shape[0])

    def remove(self):
        self.handle.remove()


def test_mixed_batch_sends_only_remaining_rows_to_base_in_one_call(mixed_pair, images):
    saver, base = mixed_pair
    cascade = build(saver, base)
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        confidence = cascade(**inputs, threshold=0.0).saver_confidence
    threshold = float(confidence.median())
    recorder = CallRecorder(cascade.base)
    try:
        with torch.no_grad():
            outputs = cascade(**inputs, threshold=threshold)
    finally:
        recorder.remove()
    exited = confidence > threshold
    assert torch.equal(outputs.exited, exited)
    assert 0 < int(exited.sum()) < len(images)
    assert recorder.batch_sizes == [int((~exited).sum())]

    with torch.no_grad():
        base_logits = base(pixel_values=inputs["base_pixel_values"]).logits
        saver_logits = saver(pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(outputs.logits[exited], saver_logits[exited], atol=0, rtol=0)
    torch.testing.assert_close(outputs.logits[~exited], base_logits[~exited], atol=1e-5, rtol=0)


def test_base_never_runs_when_every_row_exits(mixed_pair, images):
    cascade = build(*mixed_pair)
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    recorder = CallRecorder(cascade.base)
    try:
        with torch.no_grad():
            outputs = cascade(**inputs, threshold=0.0)
    finally:
        recorder.remove()
    assert outputs.exited.all()
    assert recorder.batch_sizes == []


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_batch_size_one(mixed_pair, threshold):
    cascade = build(*mixed_pair)
    inputs = cascade.get_image_processor()(images=random_images(1), return_tensors="pt")
    with torch.no_grad():
        outputs = cascade(**inputs, threshold=threshold)
    assert outputs.logits.shape == (1, 10)
    assert outputs.exited.tolist() == [threshold == 0.0]


def test_config_threshold_is_used_and_call_threshold_overrides_it(mixed_pair, images):
    cascade = build(*mixed_pair, threshold=0.0)
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        assert cascade(**inputs).exited.all()
        assert not cascade(**inputs, threshold=1.0).exited.any()
    assert cascade.config.threshold == 0.0


def test_loss_is_cross_entropy_of_cascade_logits(mixed_pair, images):
    cascade = build(*mixed_pair)
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    labels = torch.arange(len(images)) % 10
    with torch.no_grad():
        outputs = cascade(**inputs, labels=labels, threshold=0.5)
    torch.testing.assert_close(outputs.loss, torch.nn.functional.cross_entropy(outputs.logits, labels))


def test_return_dict_false_gives_tuple(mixed_pair, images):
    cascade = build(*mixed_pair)
    inputs = cascade.get_image_processor()(images=images[:2], return_tensors="pt")
    with torch.no_grad():
        logits, exited, confidence, saver_logits = cascade(**inputs, return_dict=False)
    assert logits.shape == saver_logits.shape == (2, 10) and exited.shape == confidence.shape == (2,)


def test_missing_base_pixel_values_is_a_clear_error(mixed_pair, images):
    cascade = build(*mixed_pair)
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    with pytest.raises(ValueError, match="base_pixel_values"):
        cascade(pixel_values=inputs["pixel_values"])


def test_shared_preprocessing_needs_one_tensor(images):
    saver = timm_classifier("test_vit", seed=3)
    base = timm_classifier("test_convnext", seed=4)  # same data config as test_vit
    cascade = TinySaverForImageClassification.from_saver_and_base(saver, base)
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    assert set(inputs) == {"pixel_values"}
    with torch.no_grad():
        outputs = cascade(**inputs, threshold=1.0)
    torch.testing.assert_close(outputs.logits, standalone_timm_logits(base, images), atol=1e-4, rtol=0)


def test_transformers_resnet_base(images):
    from transformers import ConvNextImageProcessor

    from hf_tinysaver import preprocessing_from_image_processor

    base = tiny_resnet()
    processor = ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)
    cascade = TinySaverForImageClassification.from_saver_and_base(
        timm_classifier(), base, base_preprocessing=preprocessing_from_image_processor(processor)
    )
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        outputs = cascade(**inputs, threshold=1.0)
        expected = base(**processor(images=images, return_tensors="pt")).logits
    torch.testing.assert_close(outputs.logits, expected, atol=1e-4, rtol=0)


def test_mismatched_label_count_is_rejected_at_construction():
    saver = timm_classifier(labels={i: f"class_{i}" for i in range(5)})
    with pytest.raises(ValueError, match="saver predicts 5 labels but the base predicts 10"):
        TinySaverForImageClassification.from_saver_and_base(saver, timm_classifier("test_resnet"))


def test_mismatched_label_names_are_named_in_the_error():
    other = dict(LABELS)
    other[3] = "cat"
    with pytest.raises(ValueError, match=r"differ at 1 of 10 indices \(3: saver 'cat' vs base 'class_3'\)"):
        TinySaverForImageClassification.from_saver_and_base(
            timm_classifier(labels=other), timm_classifier("test_resnet")
        )


def test_label_mapping_reorders_saver_logits_into_base_space(images):
    reversed_labels = {i: LABELS[9 - i] for i in range(10)}
    saver = timm_classifier(labels=reversed_labels)
    mapping = list(range(9, -1, -1))
    cascade = TinySaverForImageClassification.from_saver_and_base(
        saver, timm_classifier("test_resnet"), label_mapping=mapping
    )
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        outputs = cascade(**inputs, threshold=0.0)
        raw = saver(pixel_values=inputs["pixel_values"]).logits
    assert torch.equal(outputs.logits, raw.flip(-1))
    with pytest.raises(ValueError, match="one-to-one"):
        TinySaverForImageClassification.from_saver_and_base(
            saver, timm_classifier("test_resnet"), label_mapping=[0] * 10
        )


def test_transformers_model_without_known_preprocessing_asks_for_it():
    with pytest.raises(ValueError, match="base_preprocessing="):
        TinySaverForImageClassification.from_saver_and_base(timm_classifier(), tiny_vit())


@pytest.mark.parametrize("metric", ["max_prob", "margin", "entropy"])
def test_confidence_metrics_and_temperature(mixed_pair, images, metric):
    saver, base = mixed_pair
    cascade = build(saver, base, confidence=metric, temperature=2.0)
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        outputs = cascade(**inputs)
        probs = torch.softmax(saver(pixel_values=inputs["pixel_values"]).logits.double() / 2.0, -1)
    top2 = probs.topk(2, -1).values
    expected = {
        "max_prob": top2[:, 0],
        "margin": top2[:, 0] - top2[:, 1],
        "entropy": 1 + (probs * probs.log()).sum(-1) / torch.log(torch.tensor(10.0, dtype=torch.float64)),
    }[metric]
    torch.testing.assert_close(outputs.saver_confidence, expected)


def test_config_records_preprocessing_labels_and_version(mixed_pair):
    cascade = build(*mixed_pair, threshold=0.7)
    config = cascade.config
    assert config.id2label == mixed_pair[1].config.id2label
    assert config.saver_preprocessing == preprocessing_from_timm(mixed_pair[0])
    assert config.base_preprocessing["input_size"] == [3, 32, 32]
    saved = config.to_dict()
    assert saved["tinysaver_version"] == __import__("hf_tinysaver").__version__
    assert saved["saver_config"]["model_type"] == "timm_wrapper" and saved["base_config"]["model_type"] == "vit"


def test_config_from_newer_version_warns_on_unknown_keys_and_loads(mixed_pair):
    saved = build(*mixed_pair).config.to_dict()
    saved.update(tinysaver_version="9.0.0", exit_policy="future-feature")
    with pytest.warns(UserWarning, match=r"written by hf_tinysaver 9.0.0 .*\['exit_policy'\]"):
        config = TinySaverConfig.from_dict(saved)
    assert config.saver_config.num_labels == 10 and config.threshold == saved["threshold"]


def test_invalid_confidence_metric():
    with pytest.raises(ValueError, match="confidence must be one of"):
        TinySaverConfig(confidence="softmax")


def test_processor_handles_grayscale_rgba_and_arrays():
    import numpy as np
    from PIL import Image

    processor = TinySaverImageProcessor(preprocessing={"input_size": [3, 24, 24], "resize": "fixed"})
    gray = Image.new("L", (30, 20), 128)
    rgba = Image.new("RGBA", (30, 20), (255, 0, 0, 0))
    array = np.full((20, 30, 3), 128, dtype=np.uint8)
    values = processor(images=[gray, rgba, array], return_tensors="pt")["pixel_values"]
    assert values.shape == (3, 3, 24, 24)
    torch.testing.assert_close(values[0], values[2])
    # Float pixels in 0..1 are scaled like transformers' rescaled images; values no image format holds are refused.
    scaled = processor(images=[np.full((20, 30, 3), 128 / 255, dtype=np.float32)], return_tensors="pt")
    torch.testing.assert_close(scaled["pixel_values"][0], values[2])
    with pytest.raises(ValueError, match="must hold values in 0..1"):
        processor(images=np.full((4, 4, 3), -1.0, dtype=np.float32))


def test_optimize_for_inference_keeps_outputs_and_saves_plain_weights(mixed_pair, images, tmp_path):
    from transformers import AutoModelForImageClassification

    cascade = build(*copy.deepcopy(mixed_pair))
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        expected = cascade(**inputs, threshold=0.5)
    state_dict_keys = set(cascade.state_dict())
    cascade.train().optimize_for_inference()
    assert not cascade.training
    conv_weight = next(
        m.weight for m in cascade.saver.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1
    )
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)
    folded = [m for m in cascade.saver.modules() if type(m).__name__ == "BatchNormFoldedConv2d"]
    assert len(folded) > 0  # timm's BatchNormAct2d layers, their activation kept
    assert set(cascade.state_dict()) == state_dict_keys
    with torch.no_grad():
        actual = cascade(**inputs, threshold=0.5)
    assert torch.equal(actual.exited, expected.exited)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=0)
    cascade.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)(**inputs, threshold=0.5)
    torch.testing.assert_close(reloaded.logits, expected.logits, atol=1e-4, rtol=0)


def batch_norm_count(model, kind):
    return sum(type(module).__name__ == kind for module in model.modules())


@pytest.mark.parametrize("architecture", ["test_resnet", "test_efficientnet"])
def test_folded_batch_norms_follow_training_and_loaded_weights(architecture):
    model = timm_classifier(architecture, seed=2)
    cascade = TinySaverForImageClassification.from_saver_and_base(model, copy.deepcopy(model))
    plain = copy.deepcopy(cascade.base)
    cascade.optimize_for_inference(channels_last=False)
    base = cascade.base
    assert batch_norm_count(base, "BatchNormFoldedConv2d") > 0
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    # A training step (batch-norm statistics and weights change in place), then eval again: still the plain model.
    for model_ in (base, plain):
        model_.train()
        optimizer = torch.optim.SGD(model_.parameters(), lr=0.1)
        torch.manual_seed(5)
        model_(pixel_values=pixel_values, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        optimizer.step()
        model_.eval()
    with torch.no_grad():
        actual, expected = base(pixel_values=pixel_values).logits, plain(pixel_values=pixel_values).logits
    # After the step the logits reach a few hundred, so float32 rounding alone differs by ~1e-6 of the largest one
    # (more or less by thread count); a fold that missed the step would be off by the step's whole effect.
    torch.testing.assert_close(actual, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)

    # Loading other weights refolds too.
    other = timm_classifier(architecture, seed=7)
    base.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            base(pixel_values=pixel_values).logits, other(pixel_values=pixel_values).logits, atol=1e-4, rtol=1e-5
        )
        base.double()
        torch.testing.assert_close(
            base(pixel_values=pixel_values.double()).logits,
            other.double()(pixel_values=pixel_values.double()).logits,
            atol=1e-9,
            rtol=0,
        )


class ConvOutputUsedTwice(torch.nn.Module):
    """A classifier whose first convolution's output feeds its batch norm and, unnormalised, a skip connection."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 10)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)

    def forward(self, pixel_values):
        hidden = self.conv(pixel_values)
        hidden = self.norm(hidden) + hidden
        return SimpleNamespace(logits=self.head(hidden.mean(dim=(2, 3))))


def test_batch_norm_folding_is_undone_when_it_changes_the_outputs():
    from hf_tinysaver.models.modeling_tinysaver import fold_batch_norms

    model = ConvOutputUsedTwice().eval()
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(pixel_values).logits
        assert fold_batch_norms(model, pixel_values) == 0
        assert type(model.conv) is torch.nn.Conv2d and type(model.norm) is torch.nn.BatchNorm2d
        torch.testing.assert_close(model(pixel_values).logits, expected, atol=0, rtol=0)


def split_inputs(inputs, sizes):
    """Splits a processor output into consecutive batches of the given sizes."""
    batches, start = [], 0
    for size in sizes:
        batches.append({key: value[start : start + size] for key, value in inputs.items()})
        start += size
    return batches


def tracked(batches, consumed):
    """Yields the batches, noting in `consumed` the index of each one read, to see how far a stream has read."""
    for index, batch in enumerate(batches):
        consumed.append(index)
        yield batch


@pytest.mark.parametrize("base_batch_size", [None, 1, 3, 100])
def test_forward_stream_matches_forward_and_runs_base_on_full_batches(mixed_pair, base_batch_size):
    cascade = build(*mixed_pair)
    inputs = cascade.get_image_processor()(images=random_images(24, seed=3), return_tensors="pt")
    with torch.no_grad():
        threshold = float(cascade(**inputs, threshold=0.0).saver_confidence.median())
    sizes = [5, 8, 1, 7, 3]
    batches = split_inputs(inputs, sizes)
    recorder = CallRecorder(cascade.base)
    try:
        streamed = list(cascade.forward_stream(batches, base_batch_size=base_batch_size, threshold=threshold))
    finally:
        recorder.remove()

    assert len(streamed) == len(batches)
    remaining = 0
    for batch, output in zip(batches, streamed, strict=True):
        with torch.no_grad():
            expected = cascade(**batch, threshold=threshold)
        assert torch.equal(output.exited, expected.exited)
        torch.testing.assert_close(output.saver_confidence, expected.saver_confidence, atol=0, rtol=0)
        torch.testing.assert_close(output.saver_logits, expected.saver_logits, atol=0, rtol=0)
        torch.testing.assert_close(output.logits, expected.logits, atol=1e-5, rtol=0)
        assert output.loss is None
        remaining += int((~expected.exited).sum())
    assert 0 < remaining < 24
    size = base_batch_size or sizes[0]
    full, rest = divmod(remaining, size)
    assert recorder.batch_sizes == [size] * full + ([rest] if rest else [])


def test_forward_stream_yields_each_batch_as_soon_as_it_is_complete(mixed_pair):
    cascade = build(*mixed_pair)
    inputs = cascade.get_image_processor()(images=random_images(12, seed=4), return_tensors="pt")
    batches = split_inputs(inputs, [4, 4, 4])
    consumed = []

    # Nothing exits and the base takes 4 images at a time: each batch is answered before the next is read.
    stream = cascade.forward_stream(tracked(batches, consumed), threshold=1.0)
    for index in range(3):
        output = next(stream)
        assert consumed == list(range(index + 1))
        assert not output.exited.any()
    # Everything exits: batches are answered by the saver alone, the base never runs.
    recorder = CallRecorder(cascade.base)
    try:
        outputs = list(cascade.forward_stream(batches, threshold=0.0))
    finally:
        recorder.remove()
    assert all(output.exited.all() for output in outputs) and recorder.batch_sizes == []


@pytest.mark.parametrize("max_waiting_batches", [0, 1])
def test_forward_stream_bounds_how_many_batches_wait_for_the_base(mixed_pair, max_waiting_batches):
    cascade = build(*mixed_pair)
    inputs = cascade.get_image_processor()(images=random_images(12, seed=5), return_tensors="pt")
    batches = split_inputs(inputs, [4, 4, 4])
    consumed = []

    recorder = CallRecorder(cascade.base)
    try:
        # Nothing exits and base batches of 100 never fill: only the bound makes the base run before the end.
        stream = cascade.forward_stream(
            tracked(batches, consumed), base_batch_size=100, threshold=1.0, max_waiting_batches=max_waiting_batches
        )
        first = next(stream)
        assert consumed == list(range(max_waiting_batches + 1))
        outputs = [first, *stream]
    finally:
        recorder.remove()
    assert recorder.batch_sizes == ([4, 4, 4] if max_waiting_batches == 0 else [8, 4])
    with torch.no_grad():
        expected = cascade(**inputs, threshold=1.0)
    torch.testing.assert_close(torch.cat([o.logits for o in outputs]), expected.logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_waiting_batches"):
        list(cascade.forward_stream(batches, max_waiting_batches=-1))


def test_forward_stream_copes_with_a_reused_input_buffer(timm_pair):
    cascade = build(*timm_pair)
    cascade.config.saver_preprocessing = cascade.config.base_preprocessing  # one tensor feeds both
    images = torch.randn(3, 4, 3, 32, 32)
    with torch.no_grad():
        expected = [cascade(pixel_values=batch, threshold=1.0).logits for batch in images]

    def refilled_buffer():
        buffer = torch.empty(4, 3, 32, 32)
        for batch in images:
            buffer.copy_(batch)  # a camera or loader writing each batch into the same memory
            yield buffer

    # Nothing exits and the base waits for 12 images: every batch is queued while the buffer is overwritten.
    outputs = list(cascade.forward_stream(refilled_buffer(), base_batch_size=12, threshold=1.0))
    for output, logits in zip(outputs, expected, strict=True):
        torch.testing.assert_close(output.logits, logits, atol=1e-5, rtol=0)


def test_forward_stream_accepts_tensors_for_shared_preprocessing_and_rejects_bad_input(mixed_pair, timm_pair):
    cascade = build(*timm_pair)
    pixel_values = torch.randn(6, 3, 32, 32)
    cascade.config.saver_preprocessing = cascade.config.base_preprocessing  # one tensor feeds both
    outputs = list(cascade.forward_stream([pixel_values[:4], pixel_values[4:]], base_batch_size=2, threshold=0.5))
    with torch.no_grad():
        expected = cascade(pixel_values=pixel_values, threshold=0.5)
    torch.testing.assert_close(torch.cat([o.logits for o in outputs]), expected.logits, atol=1e-5, rtol=0)

    mixed = build(*mixed_pair)
    inputs = mixed.get_image_processor()(images=random_images(2), return_tensors="pt")
    with pytest.raises(ValueError, match="base_pixel_values"):
        list(mixed.forward_stream([inputs["pixel_values"]]))
    with pytest.raises(TypeError, match="mapping with 'pixel_values'"):
        list(mixed.forward_stream([{"images": inputs["pixel_values"]}]))
    with pytest.raises(ValueError, match="base_batch_size"):
        list(mixed.forward_stream([inputs], base_batch_size=0))


def test_public_docstring_examples_run():
    import doctest

    from hf_tinysaver import CifarResNetForImageClassification
    from hf_tinysaver.models.mac_counting import count_macs_of

    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for name, obj in {
        "TinySaverForImageClassification": TinySaverForImageClassification,
        "forward_stream": TinySaverForImageClassification.forward_stream,
        "optimize_for_inference": TinySaverForImageClassification.optimize_for_inference,
        "from_sub_models": TinySaverForImageClassification.from_sub_models,
        "CifarResNetForImageClassification": CifarResNetForImageClassification,
        "count_macs_of": count_macs_of,
    }.items():
        text = obj.__doc__.replace("```python", "").replace("```", "")
        runner.run(parser.get_doctest(text, {}, name, None, 0))
    assert runner.summarize(verbose=False).failed == 0


RETAIN_MEMORY_SCRIPT = """
import resource, sys
import torch
from hf_tinysaver import CifarResNetConfig, CifarResNetForImageClassification, retain_freed_memory

torch.set_num_threads(1)
model = CifarResNetForImageClassification(CifarResNetConfig(depth=20)).eval()
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
pixel_values = torch.randn(64, 3, 32, 32)
with torch.inference_mode():
    for _ in range(2):
        model(pixel_values=pixel_values)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        model(pixel_values=pixel_values)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc setting")
def test_retain_freed_memory_stops_page_faults_on_every_forward_pass(tmp_path):
    script = tmp_path / "faults.py"
    script.write_text(RETAIN_MEMORY_SCRIPT)
    faults = {}
    for mode in ("default", "retain"):
        output = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, check=True)
        applied, faults[mode] = output.stdout.split()
    assert applied == "True"
    # Batch 64 of 32x32 images: each pass frees and re-faults megabytes of activations under glibc's defaults.
    assert int(faults["default"]) > 2000
    assert int(faults["retain"]) < int(faults["default"]) / 10


@pytest.mark.slow
@requires_shared("models/cifar10-resnet", "datasets/cifar10-jpeg")
def test_real_cifar_cascade_keeps_its_decisions_when_optimized_and_streamed():
    from hf_tinysaver.zoo import load_zoo_dataset

    cascade = TinySaverForImageClassification.from_saver_and_base(
        "cifar10-resnet20", "cifar10-resnet56", threshold=0.6541
    ).eval()  # zoo names resolve in TINYSAVER_ASSETS, else ../shared, as SHARED does
    images = load_zoo_dataset("cifar10", "test[5000:5512]", assets=str(SHARED))["image"]
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    with torch.inference_mode():
        plain = cascade(**inputs)
    cascade.optimize_for_inference()
    assert batch_norm_count(cascade, "BatchNormFoldedConv2d") == 19 + 55  # every conv of both ResNets
    with torch.inference_mode():
        optimized = cascade(**inputs)
        streamed = list(cascade.forward_stream(inputs["pixel_values"].split(64)))
    assert 0.8 < float(plain.exited.float().mean()) < 1.0
    assert torch.equal(optimized.exited, plain.exited)
    torch.testing.assert_close(optimized.logits, plain.logits, atol=1e-4, rtol=1e-5)
    assert torch.equal(torch.cat([output.exited for output in streamed]), plain.exited)
    torch.testing.assert_close(torch.cat([output.logits for output in streamed]), optimized.logits, atol=1e-4, rtol=0)
