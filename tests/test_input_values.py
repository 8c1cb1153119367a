"""Nothing lost, nothing leaked, no silent wrong answer: pixels of any mode, unreadable images, non-finite logits,
invalid thresholds and objective parameters, and saver and base in different dtypes."""

from __future__ import annotations

import io
import math

import datasets
import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch

from conftest import SHARED, requires_shared
from hf_tinysaver import TinySaverConfig, TinySaverForImageClassification, TinySaverImageProcessor
from hf_tinysaver.calibration.simulation import CascadeSimulation, calibrate
from hf_tinysaver.commands import main
from hf_tinysaver.models.configuration_cifar_resnet import CifarResNetConfig
from hf_tinysaver.models.configuration_tinysaver_esn import TinySaverESNConfig
from hf_tinysaver.models.modeling_cifar_resnet import CifarResNetForImageClassification
from hf_tinysaver.records import UnreadableImageError, record
from hf_tinysaver.workflows.cascade import calibrate_cascade
from tiny_models import LABELS, timm_classifier

CIFAR = SHARED / "datasets" / "cifar10-jpeg"
CIFAR_32 = {"input_size": [3, 32, 32], "resize": "fixed", "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}
needs_cifar = requires_shared("datasets/cifar10-jpeg")


@pytest.fixture(scope="module")
def cifar_images() -> list[PIL.Image.Image]:
    return list(datasets.load_dataset(str(CIFAR), split="test[:6]")["image"])


@pytest.fixture(scope="module")
def cifar_jpeg_bytes() -> list[bytes]:
    data = datasets.load_dataset(str(CIFAR), split="test[:10]").cast_column("image", datasets.Image(decode=False))
    return [row["bytes"] for row in data["image"]]


def pixel_values(images, spec=CIFAR_32) -> torch.Tensor:
    return TinySaverImageProcessor(preprocessing=spec)(images=images)["pixel_values"]


# 4. Images in any mode give the right pixels.


@needs_cifar
def test_16bit_32bit_and_float_copies_of_real_images_give_the_8bit_pixels(cifar_images):
    expected = pixel_values(cifar_images)
    arrays = [np.asarray(image) for image in cifar_images]
    copies = {
        "uint16 arrays (v * 257)": [a.astype(np.uint16) * 257 for a in arrays],
        "int64 arrays": [a.astype(np.int64) for a in arrays],
        "float32 arrays in 0..1": [a.astype(np.float32) / 255 for a in arrays],
        "float64 arrays in 0..255": [a.astype(np.float64) for a in arrays],
        "uint16 tensors": [torch.from_numpy(a.astype(np.int32) * 257).permute(2, 0, 1) for a in arrays],
        "float tensors in 0..1": [torch.from_numpy(a.astype(np.float32) / 255).permute(2, 0, 1) for a in arrays],
    }
    for name, images in copies.items():
        assert torch.equal(pixel_values(images), expected), name

    # PIL's 16-bit, 32-bit integer and float modes are single-channel: compare with the 8-bit grayscale image.
    gray = [image.convert("L") for image in cifar_images]
    expected_gray = pixel_values(gray)
    gray_arrays = [np.asarray(image).astype(np.uint16) * 257 for image in gray]
    png_16bit = []
    for array in gray_arrays:
        buffer = io.BytesIO()
        PIL.Image.fromarray(array).save(buffer, format="PNG")
        png_16bit.append(PIL.Image.open(io.BytesIO(buffer.getvalue())))
    modes = {
        "I;16": [PIL.Image.fromarray(array) for array in gray_arrays],
        "I;16B": [
            PIL.Image.frombytes("I;16B", g.size, a.astype(">u2").tobytes())
            for g, a in zip(gray, gray_arrays, strict=True)
        ],
        "I": [PIL.Image.fromarray(array.astype(np.int32)) for array in gray_arrays],
        "F": [PIL.Image.fromarray(np.asarray(image).astype(np.float32) / 255) for image in gray],
        "16-bit PNG": png_16bit,
    }
    for name, images in modes.items():
        assert torch.equal(pixel_values(images), expected_gray), name
    # What PIL's own conversion gives them: clipped to white, not the image.
    assert not torch.equal(pixel_values([image.convert("RGB") for image in modes["I;16"]]), expected_gray)


def test_pixels_outside_every_range_are_an_error():
    with pytest.raises(ValueError, match=r"float image must hold values in 0..1 \(or 0..255\), got -0.5..1"):
        pixel_values([np.linspace(-0.5, 1, 300, dtype=np.float32).reshape(10, 10, 3)])
    with pytest.raises(ValueError, match=r"8-bit \(0..255\) or 16-bit \(0..65535\) values, got 0..70000"):
        pixel_values([PIL.Image.fromarray(np.linspace(0, 70000, 100).astype(np.int32).reshape(10, 10))])
    with pytest.raises(ValueError, match="NaN or infinite pixel values"):
        pixel_values([np.full((8, 8, 3), np.nan, dtype=np.float32)])


@needs_cifar
def test_exif_orientation_is_applied_as_transformers_load_image_does(cifar_images):
    from transformers.image_utils import load_image

    image = cifar_images[0].resize((64, 40))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    tagged, plain = io.BytesIO(), io.BytesIO()
    image.save(tagged, format="JPEG", quality=95, exif=exif)
    image.save(plain, format="JPEG", quality=95)
    tagged = PIL.Image.open(io.BytesIO(tagged.getvalue()))
    rotated = PIL.Image.open(io.BytesIO(plain.getvalue())).transpose(PIL.Image.Transpose.ROTATE_270)
    assert tagged.size == (64, 40) and rotated.size == (40, 64)
    spec = {"input_size": [3, 32, 32], "resize": "squash", "crop_pct": 1.0}
    assert torch.equal(pixel_values([tagged], spec), pixel_values([rotated], spec))
    assert torch.equal(pixel_values([tagged], spec), pixel_values([load_image(tagged)], spec))


@pytest.fixture(scope="module")
def corrupted_cifar(tmp_path_factory, cifar_jpeg_bytes):
    """Ten real CIFAR-10 JPEGs as a local parquet folder; row 3 truncated, row 7 garbage bytes."""
    rows = list(cifar_jpeg_bytes)
    rows[3] = rows[3][: len(rows[3]) // 2]
    rows[7] = b"this is not an image" * 10
    folder = tmp_path_factory.mktemp("corrupted_cifar")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    data = datasets.Dataset.from_dict(
        {"image": [{"bytes": raw, "path": None} for raw in rows], "label": list(range(10))}, features=features
    )
    (folder / "data").mkdir()
    data.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


@needs_cifar
def test_unreadable_images_name_the_split_row_and_column(corrupted_cifar, tmp_path):
    assert PIL.ImageFile.LOAD_TRUNCATED_IMAGES is False  # truncated files must fail, not be padded with grey
    model, processor = timm_classifier("test_efficientnet"), TinySaverImageProcessor(preprocessing=CIFAR_32)
    with pytest.raises(UnreadableImageError) as truncated:
        record(model, processor, str(corrupted_cifar), split="train", batch_size=4, cache_dir=tmp_path, progress=False)
    assert str(truncated.value).startswith(
        "Cannot read the image in row 3 of split 'train' (column 'image'): OSError: "
    )
    assert "runcated" in str(truncated.value)  # PIL's "Truncated File Read" or "image file is truncated"
    assert "Fix or drop that row" in str(truncated.value) and "\n" not in str(truncated.value)
    with pytest.raises(
        ValueError,
        match=r"row 2 of split 'train\[5:\]' \(column 'image'\): UnidentifiedImageError: cannot identify image",
    ):
        record(
            model, processor, str(corrupted_cifar), split="train[5:]", batch_size=4, use_cache=False, progress=False
        )
    clean = record(model, processor, str(corrupted_cifar), split="train[:3]", use_cache=False, progress=False)
    assert clean.n == 3


@needs_cifar
def test_evaluate_names_the_unreadable_row(corrupted_cifar, tiny_cascade_dir, tmp_path, capsys):
    code = main(
        ["evaluate", "-m", str(tiny_cascade_dir), "-d", str(corrupted_cifar), "--split", "train[4:]", "-b", "8"]
        + ["--cache-dir", str(tmp_path), "--no-progress"]
    )
    assert code == 2
    assert (
        "Cannot read the image in row 3 of split 'train[4:]' (column 'image'): UnidentifiedImageError: cannot identify"
        in (capsys.readouterr().err)
    )


# 5. Non-finite numbers never pass as predictions.


def nan_logits_model(bad_class: int = 2):
    model = timm_classifier("test_efficientnet", seed=0)
    with torch.no_grad():
        model.timm_model.get_classifier().bias[bad_class] = float("nan")
    return model


def test_record_refuses_nan_logits_and_cached_non_finite_records(tiny_dataset, tmp_path, caplog):
    processor = TinySaverImageProcessor(preprocessing={"input_size": [3, 32, 32], "resize": "fixed"})
    with pytest.raises(ValueError) as error:
        record(nan_logits_model(), processor, str(tiny_dataset), split="train", model_name="nan-model",
               cache_dir=tmp_path, progress=False)  # fmt: skip
    assert str(error.value).startswith(
        "nan-model returned NaN or infinite logits on 40 of 40 rows of split 'train' (first: row 0)"
    )

    # A cached file with non-finite logits (valid checksum) is not used: the model is recorded again.
    from hf_tinysaver.records import _save_arrays

    good = timm_classifier("test_efficientnet", seed=0)
    recorded = record(good, processor, str(tiny_dataset), split="train", cache_dir=tmp_path, progress=False)
    cached = tmp_path / f"{recorded.cache_key}.npz"
    poisoned = recorded.logits.copy()
    poisoned[5] = np.inf
    arrays = dict(np.load(cached))
    arrays.pop("checksum")
    _save_arrays(cached, {**arrays, "logits": poisoned})
    again = record(good, processor, str(tiny_dataset), split="train", cache_dir=tmp_path, progress=False)
    assert np.isfinite(again.logits).all() and np.array_equal(again.logits, recorded.logits)
    assert "NaN or infinite logits on 1 of 40 rows" in caplog.text


def test_calibrate_cascade_refuses_a_base_with_nan_logits(tiny_dataset, tmp_path):
    cascade = TinySaverForImageClassification.from_saver_and_base(
        timm_classifier("test_efficientnet", seed=0),
        nan_logits_model(),
        saver_preprocessing={"input_size": [3, 32, 32], "resize": "fixed"},
        base_preprocessing={"input_size": [3, 32, 32], "resize": "fixed"},
    )
    with pytest.raises(ValueError, match=r"returned NaN or infinite logits on 40 of 40 rows of split 'train'"):
        calibrate_cascade(cascade, str(tiny_dataset), "train", max_drop=1.0, cache_dir=tmp_path, progress=False)


def test_simulation_refuses_non_finite_logits_and_predictions():
    generator = np.random.default_rng(0)
    logits = generator.normal(size=(200, 10)).astype(np.float32)
    labels = generator.integers(0, 10, 200)
    bad = logits.copy()
    bad[[3, 50, 51]] = np.nan
    bad[60, 2] = -np.inf
    with pytest.raises(
        ValueError, match=r"^The saver returned NaN or infinite logits on 4 of 200 rows \(first: row 3\)"
    ):
        CascadeSimulation.from_logits(bad, logits, labels)
    with pytest.raises(
        ValueError, match=r"^The base returned NaN or infinite logits on 4 of 200 rows \(first: row 3\)"
    ):
        CascadeSimulation.from_logits(logits, bad, labels)
    predictions = logits.argmax(-1).astype(np.float64)
    predictions[7] = np.nan
    with pytest.raises(ValueError, match=r"base_predictions must be integer class indices, but 1 of 200 .*row 7"):
        CascadeSimulation.from_logits(logits, predictions, labels)


# Thresholds, label mappings and objective parameters.


BAD_THRESHOLDS = [float("nan"), float("inf"), -float("inf"), True, 1.5, -2.0, "0.5", None]


@pytest.fixture(scope="module")
def tiny_cascade():
    return TinySaverForImageClassification.from_saver_and_base(
        timm_classifier("test_efficientnet", seed=0),
        timm_classifier("test_resnet", seed=1),
        saver_preprocessing={"input_size": [3, 32, 32], "resize": "fixed"},
        base_preprocessing={"input_size": [3, 32, 32], "resize": "fixed"},
        saver_macs=1,
        base_macs=10,
    ).eval()


@pytest.mark.parametrize("threshold", BAD_THRESHOLDS, ids=repr)
def test_invalid_thresholds_are_refused_everywhere(tiny_cascade, threshold):
    message = r"threshold must be (a finite number|a number) in \[-1, 1\]"
    config = tiny_cascade.config
    if threshold is not None:  # None means "the config's own" per call
        with pytest.raises(ValueError, match=message):
            TinySaverConfig(saver_config=config.saver_config, base_config=config.base_config, threshold=threshold)
        pixels = torch.zeros(2, 3, 32, 32)
        with pytest.raises(ValueError, match=message):
            tiny_cascade(pixel_values=pixels, threshold=threshold)
        with pytest.raises(ValueError, match=message):
            next(tiny_cascade.forward_stream([pixels], threshold=threshold))
    with pytest.raises(ValueError, match=message):
        config.threshold = threshold
    assert config.threshold == 1.0  # unchanged
    with pytest.raises(ValueError, match=r"exit_thresholds\[1\] must be"):
        TinySaverESNConfig(exit_stages=["a", "b"], exit_thresholds=[0.5, threshold])


def test_valid_thresholds_keep_their_meaning(tiny_cascade):
    pixels = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        assert not tiny_cascade(pixel_values=pixels, threshold=1.0).exited.any()
        assert tiny_cascade(pixel_values=pixels, threshold=np.float32(-0.5)).exited.all()
        assert tiny_cascade(pixel_values=pixels, threshold=torch.tensor(0.0)).exited.all()


@pytest.mark.parametrize("entry", [1.5, True, "1", None])
def test_label_mapping_entries_must_be_integers(tiny_cascade, entry):
    config = tiny_cascade.config
    mapping = [0, 1, 2, 3, 4, 5, 6, 7, 8, entry]
    with pytest.raises(ValueError, match=rf"label_mapping entries must be integer base class indices, got {entry!r}"):
        TinySaverConfig(saver_config=config.saver_config, base_config=config.base_config, label_mapping=mapping)
    logits = torch.randn(20, 10)
    with pytest.raises(ValueError, match="label_mapping entries must be integer"):
        CascadeSimulation.from_logits(logits, logits, label_mapping=mapping)
    assert TinySaverConfig(label_mapping=np.arange(10)[::-1]).label_mapping == list(range(9, -1, -1))


@pytest.mark.parametrize(
    ("objective", "parameters", "message"),
    [
        ("max-drop", {"max_drop": float("nan")}, r"max_drop must be a finite number \(the allowed top-1 drop"),
        ("max-drop", {"max_drop": float("inf")}, r"max_drop must be a finite number"),
        ("max-drop", {"max_drop": True}, r"max_drop must be a finite number .*got True of type bool"),
        ("max-drop", {"max_drop": 0.5, "confidence_level": float("nan")}, r"confidence_level must be in \(0, 1\)"),
        ("budget", {"relative_macs": float("nan")}, r"relative_macs must be >= 0 \(the budget"),
        ("budget", {"relative_macs": float("inf")}, r"relative_macs must be >= 0"),
        ("exit-rate", {"exit_rate": float("nan")}, r"exit_rate must be in \[0, 1\] \(a fraction of samples\)"),
        ("agreement", {"max_disagreement": 1.5}, r"max_disagreement must be in \[0, 1\]"),
        ("agreement", {"max_disagreement": 0.1, "confidence_level": 1.0}, r"confidence_level must be in \(0, 1\)"),
    ],
)
def test_objective_parameters_must_be_finite_and_in_range(objective, parameters, message):
    generator = np.random.default_rng(0)
    labels = generator.integers(0, 10, 300)
    saver = generator.normal(size=(300, 10)) + 3 * np.eye(10)[labels]
    simulation = CascadeSimulation.from_logits(saver, labels, labels, relative_saver_macs=0.1)
    with pytest.raises(ValueError, match=message):
        calibrate(simulation, objective, **parameters)
    with pytest.raises(ValueError, match=r"threshold must be a finite number"):
        simulation.evaluate(float("nan"))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--max-drop", "inf"], "argument --max-drop: must be a finite number in [0, 100]"),
        (["--max-drop", "nan"], "argument --max-drop: must be a finite number in [0, 100]"),
        (["--objective", "budget", "--budget", "nan"], "argument --budget: must be a finite number >= 0"),
        (
            ["--objective", "exit-rate", "--exit-rate", "1.5"],
            "argument --exit-rate: must be a finite number in [0, 1]",
        ),
        (["--objective", "agreement", "--max-disagreement", "-0.1"], "argument --max-disagreement: must be"),
        (["--confidence-level", "1"], "argument --confidence-level: must be a finite number in (0, 1)"),
    ],
)
def test_cli_refuses_non_finite_and_out_of_range_objective_parameters(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "-s", "cifar10-resnet20", "--base", "cifar10-resnet56", "-d", "cifar10", "--split", "test"]
             + ["--out", "unused"] + arguments)  # fmt: skip
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["inf", "nan", "2", "-1.5", "high"])
def test_cli_evaluate_refuses_invalid_thresholds(value, tiny_cascade_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "-m", str(tiny_cascade_dir), "-d", "cifar10", "--split", "test", "--threshold", value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "argument --threshold: the threshold must be" in error and f"got {value!r}" in error


def test_search_and_esn_cli_refuse_non_finite_drops(capsys):
    for arguments in (
        ["search", "--base", "cifar10-resnet56", "-c", "cifar10-resnet20", "-d", "cifar10", "--split", "test"]
        + ["--max-drops", "0.5", "nan"],
        ["esn-train", "--saver", "cifar10-resnet20", "--base", "cifar10-resnet56", "--max-drop", "inf"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(arguments)
        assert exit_info.value.code == 2
        assert "must be a finite number in [0, 100]" in capsys.readouterr().err


# 7. Saver and base in different dtypes.


def cifar_resnet(seed: int) -> CifarResNetForImageClassification:
    torch.manual_seed(seed)
    config = CifarResNetConfig(depth=8, widths=[4, 8, 8], id2label=dict(LABELS))
    return CifarResNetForImageClassification(config).eval()


@pytest.mark.parametrize("base_dtype", [torch.float64, torch.bfloat16])
def test_each_sub_model_gets_its_inputs_in_its_own_dtype(base_dtype):
    saver, base = cifar_resnet(0), cifar_resnet(1)
    cascade = TinySaverForImageClassification.from_saver_and_base(
        saver, base, saver_preprocessing=CIFAR_32, base_preprocessing=CIFAR_32, saver_macs=1, base_macs=10
    ).eval()
    pixels = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        threshold = float(cascade(pixel_values=pixels).saver_confidence.median())
        base.to(base_dtype)  # CifarResNet does not cast its inputs itself: without the cascade's cast, a crash
        output = cascade(pixel_values=pixels, threshold=threshold)
        streamed = list(cascade.forward_stream([pixels[:3], pixels[3:]], base_batch_size=8, threshold=threshold))
        expected_base = base(pixel_values=pixels.to(base_dtype)).logits
        expected_saver = saver(pixel_values=pixels).logits
    exited = output.exited
    assert 0 < int(exited.sum()) < len(exited)
    assert output.logits.dtype == torch.promote_types(torch.float32, base_dtype)
    # bfloat16 convolutions may round differently on a sub-batch than on the whole batch.
    tolerance = {"atol": 0.05, "rtol": 0.02} if base_dtype == torch.bfloat16 else {}
    torch.testing.assert_close(output.logits[exited], expected_saver[exited].to(output.logits.dtype))
    torch.testing.assert_close(output.logits[~exited], expected_base[~exited].to(output.logits.dtype), **tolerance)
    assert all(part.logits.dtype == output.logits.dtype for part in streamed)
    torch.testing.assert_close(torch.cat([part.logits for part in streamed]), output.logits, **tolerance)


def test_record_feeds_a_model_in_its_own_dtype(tiny_dataset):
    processor = TinySaverImageProcessor(preprocessing={"input_size": [3, 32, 32], "resize": "fixed"})
    model = cifar_resnet(0)
    reference = record(model, processor, str(tiny_dataset), split="train", use_cache=False, progress=False)
    doubled = record(model.double(), processor, str(tiny_dataset), split="train", use_cache=False, progress=False)
    np.testing.assert_allclose(doubled.logits, reference.logits, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(doubled.logits.sum()))


def test_an_esn_cascade_with_parts_in_different_dtypes_is_refused_before_any_image_runs():
    from hf_tinysaver import TinySaverESNForImageClassification

    saver, base = (
        cifar_resnet(0),
        CifarResNetForImageClassification(CifarResNetConfig(depth=14, widths=[4, 8, 8], id2label=dict(LABELS))).eval(),
    )
    model = TinySaverESNForImageClassification.from_saver_and_base(
        saver, base, esn_width=8, esn_num_heads=2, saver_preprocessing=CIFAR_32, base_preprocessing=CIFAR_32
    ).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(pixel_values=pixels).logits.shape == (2, 10)
        model.base.to(torch.float64)
        message = r"one dtype on one device, but found saver torch.float32 on cpu, base torch.float64 on cpu"
        with pytest.raises(ValueError, match=message):
            model(pixel_values=pixels)
        with pytest.raises(ValueError, match=message):
            model.compute_exit_features(pixel_values=pixels)
        model.to(torch.float64)
        assert model(pixel_values=pixels.double()).logits.dtype == torch.float64


def test_docstring_examples_run():
    import doctest

    from hf_tinysaver.models import configuration_tinysaver, image_processing_tinysaver

    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    for function in (configuration_tinysaver.validate_threshold, image_processing_tinysaver.pixels_to_uint8):
        text = function.__doc__.replace("```python", "").replace("```", "")
        runner.run(parser.get_doctest(text, {}, function.__name__, None, 0))
    assert runner.summarize(verbose=False).failed == 0
