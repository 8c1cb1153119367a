"""Saving and sharing: one folder that loads with the Auto classes, with and without hf_tinysaver, and in pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from conftest import random_images
from hf_tinysaver import CifarResNetConfig, CifarResNetForImageClassification, TinySaverForImageClassification
from tiny_models import timm_classifier, tiny_vit, tiny_vit_preprocessing

REMOTE_CODE_FILES = {
    "configuration_tinysaver.py",
    "modeling_tinysaver.py",
    "image_processing_tinysaver.py",
    "confidence.py",
    "mac_counting.py",
    "inference_optimization.py",
}


def make_cascade(threshold: float = 0.6) -> TinySaverForImageClassification:
    return TinySaverForImageClassification.from_saver_and_base(
        timm_classifier("test_efficientnet"),
        tiny_vit(32),
        threshold=threshold,
        base_preprocessing=tiny_vit_preprocessing(32),
        calibration={"objective": "max-drop", "max_drop": 0.5},
    )


@pytest.fixture(scope="module")
def saved_cascade(tmp_path_factory) -> tuple[Path, TinySaverForImageClassification]:
    directory = tmp_path_factory.mktemp("cascade")
    cascade = make_cascade()
    cascade.save_pretrained(directory)
    return directory, cascade


def test_folder_layout(saved_cascade):
    directory, _ = saved_cascade
    files = {path.name for path in directory.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert REMOTE_CODE_FILES <= files
    assert not [name for name in files if "cifar" in name], "only cascades holding a CIFAR ResNet carry its code"
    assert not any(name.endswith(".bin") for name in files)
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_tinysaver.TinySaverConfig",
        "AutoModelForImageClassification": "modeling_tinysaver.TinySaverForImageClassification",
    }
    assert config["tinysaver_version"] and config["threshold"] == 0.6
    assert config["calibration"] == {"objective": "max-drop", "max_drop": 0.5}
    processor = json.loads((directory / "preprocessor_config.json").read_text())
    assert processor["auto_map"] == {"AutoImageProcessor": "image_processing_tinysaver.TinySaverImageProcessor"}


def test_safetensors_holds_both_sub_models(saved_cascade):
    from safetensors import safe_open

    directory, cascade = saved_cascade
    with safe_open(directory / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    # transformers may write legacy key names for some architectures (ViT here) and converts them back on load.
    assert len(keys) == len(cascade.state_dict())
    assert {key for key in keys if key.startswith("saver.")} == {
        k for k in cascade.state_dict() if k.startswith("saver.")
    }
    assert any(key.startswith("saver.") for key in keys) and any(key.startswith("base.") for key in keys)


def test_reload_with_library_imported_gives_identical_logits(saved_cascade, images):
    directory, cascade = saved_cascade
    reloaded = AutoModelForImageClassification.from_pretrained(directory)
    assert type(reloaded) is TinySaverForImageClassification and not reloaded.training
    processor = AutoImageProcessor.from_pretrained(directory)
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        expected = cascade(**inputs)
        actual = reloaded(**inputs)
    assert torch.equal(actual.logits, expected.logits) and torch.equal(actual.exited, expected.exited)


FRESH_PROCESS_SCRIPT = """
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

directory, images_path = sys.argv[1:3]
model = AutoModelForImageClassification.from_pretrained(directory, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained(directory, trust_remote_code=True)
images = torch.load(images_path)
inputs = processor(images=[Image.fromarray(a.numpy()) for a in images], return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)
    model.optimize_for_inference()
    folded = sum(type(module).__name__ == "BatchNormFoldedConv2d" for module in model.modules())
    half = len(images) // 2
    batches = [{key: value[:half] for key, value in inputs.items()}, {key: value[half:] for key, value in inputs.items()}]
    streamed = torch.cat([output.logits for output in model.forward_stream(batches, base_batch_size=2)])
classifier = pipeline("image-classification", model=directory, trust_remote_code=True)
predictions = classifier(Image.fromarray(images[0].numpy()), top_k=3)
result = {"logits": outputs.logits, "exited": outputs.exited, "module": type(model).__module__,
          "predictions": predictions, "folded": folded, "optimized_streamed_logits": streamed}
"""


def test_fresh_process_without_hf_tinysaver_loads_with_remote_code(
    saved_cascade, images, tmp_path, run_without_hf_tinysaver
):
    directory, cascade = saved_cascade
    arrays = torch.stack([torch.from_numpy(__import__("numpy").array(image.resize((40, 40)))) for image in images])
    torch.save(arrays, tmp_path / "images.pt")
    out = run_without_hf_tinysaver(FRESH_PROCESS_SCRIPT, directory, tmp_path / "images.pt", cwd=tmp_path)

    processor = cascade.get_image_processor()
    inputs = processor(images=[Image.fromarray(a.numpy()) for a in arrays], return_tensors="pt")
    with torch.no_grad():
        expected = cascade(**inputs)
    assert torch.equal(out["logits"], expected.logits)
    assert torch.equal(out["exited"], expected.exited)
    assert out["folded"] > 0
    torch.testing.assert_close(out["optimized_streamed_logits"], expected.logits, atol=1e-4, rtol=1e-5)
    labels = set(cascade.config.id2label.values())
    assert len(out["predictions"]) == 3 and all(p["label"] in labels for p in out["predictions"])


def test_pipeline_on_pil_modes_paths_and_lists(saved_cascade, tmp_path):
    directory, cascade = saved_cascade
    classifier = pipeline("image-classification", model=str(directory), trust_remote_code=True)
    rgb, gray, rgba = (
        random_images(1)[0],
        random_images(1, seed=1)[0].convert("L"),
        random_images(1, seed=2)[0].convert("RGBA"),
    )
    path = tmp_path / "image.png"
    rgb.save(path)

    single = classifier(rgb)
    assert len(single) == 5 and abs(sum(p["score"] for p in classifier(rgb, top_k=10)) - 1) < 1e-5
    assert classifier(str(path), top_k=2) == classifier(rgb, top_k=2)
    batch = classifier([rgb, gray, rgba, str(path)], top_k=1)
    assert len(batch) == 4 and all(len(result) == 1 for result in batch)
    base_labels = set(cascade.config.base_config.id2label.values())
    assert all(result[0]["label"] in base_labels for result in batch)

    processor = cascade.get_image_processor()
    with torch.no_grad():
        logits = cascade(**processor(images=rgb, return_tensors="pt")).logits[0]
    best = int(logits.argmax())
    assert single[0]["label"] == cascade.config.id2label[best]
    assert single[0]["score"] == pytest.approx(float(torch.softmax(logits, -1)[best]), abs=1e-6)


def test_pipeline_batches_agree_with_single_calls(saved_cascade):
    directory, _ = saved_cascade
    classifier = pipeline("image-classification", model=str(directory), trust_remote_code=True)
    images = random_images(5, seed=7)
    batched = classifier(images, top_k=2, batch_size=4)
    singles = [classifier(image, top_k=2) for image in images]
    for batch_result, single_result in zip(batched, singles, strict=True):
        assert [p["label"] for p in batch_result] == [p["label"] for p in single_result]


def test_cifar_resnet_cascade_round_trips_through_remote_code(tmp_path, images):
    saver = CifarResNetForImageClassification(CifarResNetConfig(depth=20)).eval()
    base = CifarResNetForImageClassification(CifarResNetConfig(depth=32)).eval()
    spec = {"input_size": [3, 32, 32], "resize": "fixed", "interpolation": "bilinear"}
    cascade = TinySaverForImageClassification.from_saver_and_base(
        saver, base, threshold=0.5, saver_preprocessing=spec, base_preprocessing=spec
    )
    cascade.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path, trust_remote_code=True)
    inputs = cascade.get_image_processor()(images=images, return_tensors="pt")
    assert set(inputs) == {"pixel_values"}
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, cascade(**inputs).logits)


def test_save_is_atomic_per_file_and_overwrites_cleanly(tmp_path, images):
    first = make_cascade(threshold=0.2)
    first.save_pretrained(tmp_path)
    second = make_cascade(threshold=0.9)
    second.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.threshold == 0.9
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]


def test_cascade_of_bare_timm_modules_answers_with_timm_class_names_in_memory_and_saved(tmp_path):
    import timm

    saver = timm.create_model("test_resnet", pretrained=False, num_classes=1000).eval()
    base = timm.create_model("test_efficientnet", pretrained=False, num_classes=1000).eval()
    cascade = TinySaverForImageClassification.from_saver_and_base(saver, base, threshold=0.5).eval()
    expected_names = list(timm.data.ImageNetInfo("imagenet-1k").label_descriptions(as_dict=True).values())
    assert [cascade.config.id2label[i] for i in range(1000)] == expected_names
    assert cascade.config.id2label[0] == "tench, Tinca tinca"

    # In memory, transformers' pipeline() only infers a processor from a model id or path: pass the cascade's own.
    classifier = pipeline("image-classification", model=cascade, image_processor=cascade.get_image_processor())
    answer = classifier(random_images(1)[0], top_k=3)
    assert [entry["label"] for entry in answer] != [] and all(entry["label"] in expected_names for entry in answer)

    cascade.save_pretrained(tmp_path)
    saved = pipeline("image-classification", model=str(tmp_path), trust_remote_code=True)
    assert saved(random_images(1)[0], top_k=3) == answer
