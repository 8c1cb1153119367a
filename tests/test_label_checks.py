"""The data's labels mean what the model's labels mean, and calibration data that cannot stand for deployment is
called out: class names aligned or refused, labels range-checked, `--shuffle-seed`, and calibrate's warnings.

Real CIFAR-10 JPEG images (`test[:200]`) in copies whose `ClassLabel` is reversed, renamed or sorted; tiny random
cascades carrying the CIFAR-10 class names where real weights are not the point.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import warnings

import datasets
import numpy as np
import pytest

from conftest import SHARED, requires_shared
from hf_tinysaver.commands import main as tinysaver
from hf_tinysaver.labels import align_dataset_labels, label_order_warnings
from hf_tinysaver.records import record
from hf_tinysaver.sources import load_dataset_split, load_model
from hf_tinysaver.workflows.cascade import build_cascade, calibrate_cascade
from tiny_models import timm_classifier

CIFAR = SHARED / "datasets" / "cifar10-jpeg"
IMAGENET = SHARED / "datasets" / "imagenet-val-1300"
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PREPROCESSING = {"input_size": [3, 32, 32], "resize": "fixed"}

pytestmark = requires_shared("datasets/cifar10-jpeg")


def _save_split(dataset: datasets.Dataset, folder) -> str:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    return str(folder)


@pytest.fixture(scope="module")
def cifar_slice() -> datasets.Dataset:
    return datasets.load_dataset(str(CIFAR), split="test[:200]")


@pytest.fixture(scope="module")
def folders(cifar_slice, tmp_path_factory) -> dict[str, str]:
    """The slice as it is, with its ClassLabel reversed, with two classes renamed, sorted by label, as plain ints."""
    root = tmp_path_factory.mktemp("label_data")
    out = {"original": _save_split(cifar_slice, root / "original")}
    reversed_features = cifar_slice.features.copy()
    reversed_features["label"] = datasets.ClassLabel(names=CIFAR_NAMES[::-1])
    reversed_split = cifar_slice.map(lambda row: {"label": 9 - row["label"]}, features=reversed_features)
    out["reversed"] = _save_split(reversed_split, root / "reversed")
    renamed = cifar_slice.cast_column("label", datasets.ClassLabel(names=["plane", "car", *CIFAR_NAMES[2:]]))
    out["renamed"] = _save_split(renamed, root / "renamed")
    order = np.argsort(np.asarray(cifar_slice["label"]), kind="stable")
    with_index = cifar_slice.add_column("row", list(range(len(cifar_slice))))
    out["sorted"] = _save_split(with_index.select(order), root / "sorted")
    out["indexed"] = _save_split(with_index, root / "indexed")
    return out


@pytest.fixture(scope="module")
def tiny_models_dir(tmp_path_factory) -> dict[str, str]:
    """A tiny saver and base with the CIFAR-10 class names, saved like any Hub classifier."""
    root = tmp_path_factory.mktemp("label_models")
    paths = {}
    for role, architecture, seed in (("saver", "test_efficientnet", 0), ("base", "test_resnet", 1)):
        model = timm_classifier(architecture, seed=seed, labels=dict(enumerate(CIFAR_NAMES)))
        model.config.preprocessing = PREPROCESSING
        model.save_pretrained(root / role)
        paths[role] = str(root / role)
    return paths


def _plain_int_folder(cifar_slice, folder, labels) -> str:
    plain = cifar_slice.remove_columns("label").add_column("label", [int(v) for v in labels])
    return _save_split(plain, folder)


def _run_cli_subprocess(args: list[str]) -> subprocess.CompletedProcess:
    """The real `tinysaver` console script in a fresh process: its stderr shows every warning once."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hf_tinysaver.commands", *args], env=env, capture_output=True, text=True, timeout=600
    )


def _calibrate_args(models, dataset, out, cache, *extra) -> list[str]:
    return ["calibrate", "--saver", models["saver"], "--base", models["base"], "--dataset", dataset,
            "--split", "test[:50%]", "--objective", "exit-rate", "--exit-rate", "0.9", "--batch-size", "50",
            "--cache-dir", str(cache), "--out", str(out), "--no-progress", *extra]  # fmt: skip


def test_align_dataset_labels_normalises_names_and_ignores_generic_ones():
    model = dict(enumerate(CIFAR_NAMES))
    assert align_dataset_labels([f"  {n.title()} " for n in CIFAR_NAMES], model) is None
    assert align_dataset_labels(["tench,  Tinca_tinca"], {0: "Tench, Tinca tinca"}) is None
    # Generic names carry no meaning: ClassLabel(num_classes=10) is "0".."9", a bare config is LABEL_0...
    assert align_dataset_labels([str(i) for i in range(10)], model) is None
    assert align_dataset_labels(CIFAR_NAMES[::-1], {i: f"LABEL_{i}" for i in range(10)}) is None
    assert align_dataset_labels(None, model) is None  # plain integer labels: only the range is checked
    with pytest.raises(ValueError, match=r"dataset class 0 'tench' vs model class 0 'airplane'"):
        align_dataset_labels(["tench", *CIFAR_NAMES[1:]], model)
    with pytest.raises(ValueError, match="the model has no class of that name"):
        align_dataset_labels(CIFAR_NAMES, model, label_map={"truck": "lorry"})
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    text = align_dataset_labels.__doc__.replace("```python", "").replace("```", "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner.run(parser.get_doctest(text, {}, "align_dataset_labels", None, 0))
    assert runner.summarize(verbose=False).failed == 0


@pytest.mark.slow
@requires_shared("datasets/imagenet-val-1300", "models/cifar10-resnet")
def test_the_real_assets_align_as_they_are_without_a_warning():
    pairs = [
        ("cifar10", "test[:10]", "cifar10-resnet20"),
        ("imagenet-val-1300", "validation[:10]", "efficientnet-lite2"),
    ]
    pairs.append(("imagenet-val-1300", "validation[:10]", "mobilenet-v2-1.0-224"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dataset, split, model_name in pairs:
            names = load_dataset_split(dataset, split).features["label"].names
            assert align_dataset_labels(names, load_model(model_name).config.id2label) is None, model_name


def test_reversed_class_order_is_aligned_by_name_once_and_calibrates_like_the_original(
    folders, tiny_models_dir, tmp_path
):
    assert tinysaver(_calibrate_args(tiny_models_dir, folders["original"], tmp_path / "original", tmp_path / "c")) == 0
    result = _run_cli_subprocess(
        _calibrate_args(tiny_models_dir, folders["reversed"], tmp_path / "reversed", tmp_path / "c")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Saver and base are both recorded, but the alignment is announced once.
    assert result.stderr.count("in another order") == 1, result.stderr[-3000:]
    calibrations = {
        name: json.loads((tmp_path / name / "calibration.json").read_text()) for name in ("original", "reversed")
    }
    assert "10 of 10 classes were aligned by name" in result.stderr
    assert "dataset class 0 'truck' is model class 9 'truck'" in result.stderr
    for key in ("base_accuracy", "accuracy", "threshold", "exit_rate", "relative_macs"):
        assert calibrations["reversed"][key] == calibrations["original"][key], key

    results = {}
    for name in ("original", "reversed"):
        results_file = tmp_path / f"{name}.json"
        code = tinysaver(
            ["evaluate", "--model", str(tmp_path / "original"), "--dataset", folders[name], "--split", "test[50%:]",
             "--batch-size", "50", "--cache-dir", str(tmp_path / "c"), "--results-file", str(results_file),
             "--no-progress"]
        )  # fmt: skip
        assert code == 0
        results[name] = json.loads(results_file.read_text())
    for key in ("accuracy", "base_accuracy", "saver_accuracy", "exit_rate"):
        assert results["reversed"][key] == results["original"][key], key
    assert results["reversed"]["simulation_matches_forward"] is True


def test_other_class_names_are_an_error_naming_them_and_a_label_map_fixes_it(
    folders, tiny_models_dir, tmp_path, capsys
):
    code = tinysaver(_calibrate_args(tiny_models_dir, folders["renamed"], tmp_path / "refused", tmp_path / "cache"))
    error = capsys.readouterr().err
    assert code == 2
    assert "2 of its 10 classes have no model class of that name" in error
    assert "dataset class 0 'plane' vs model class 0 'airplane'; dataset class 1 'car' vs model class 1" in error
    assert "--label-map" in error and "label_map=" in error
    assert not (tmp_path / "refused").exists()

    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"plane": "airplane", "car": 1}))
    for label_map, out in ((str(mapping), "mapped-file"), ('{"0": "airplane", "car": "automobile"}', "mapped-text")):
        extra = ("--label-map", label_map)
        assert (
            tinysaver(_calibrate_args(tiny_models_dir, folders["renamed"], tmp_path / out, tmp_path / "cache", *extra))
            == 0
        )
    assert (
        tinysaver(_calibrate_args(tiny_models_dir, folders["original"], tmp_path / "original", tmp_path / "cache"))
        == 0
    )
    original = json.loads((tmp_path / "original" / "calibration.json").read_text())
    for out in ("mapped-file", "mapped-text"):
        mapped = json.loads((tmp_path / out / "calibration.json").read_text())
        assert (mapped["base_accuracy"], mapped["threshold"]) == (original["base_accuracy"], original["threshold"])

    # The same through the Python API, on a loaded dataset, with a mapping that reorders: labels land in model ids.
    renamed = load_dataset_split(folders["renamed"], "test[:40]")
    model = timm_classifier("test_efficientnet", seed=0, labels=dict(enumerate(CIFAR_NAMES)))
    swapped = {"plane": "automobile", "car": "airplane"}
    with pytest.warns(UserWarning, match="aligned by the label map and by name"):
        records = record(model, _processor(), renamed, split="x", label_map=swapped, use_cache=False, progress=False)
    raw = np.asarray(renamed["label"])
    assert records.labels.tolist() == np.where(raw == 0, 1, np.where(raw == 1, 0, raw)).tolist()


def _processor():
    from hf_tinysaver import TinySaverImageProcessor

    return TinySaverImageProcessor(preprocessing=PREPROCESSING)


def test_labels_outside_the_model_classes_are_an_error_naming_the_row(cifar_slice, tmp_path, capsys):
    model = timm_classifier("test_efficientnet", seed=0, labels=dict(enumerate(CIFAR_NAMES)))
    labels = np.asarray(cifar_slice["label"]).copy()
    labels[37] = 10
    folder = _plain_int_folder(cifar_slice, tmp_path / "ten", labels)
    with pytest.raises(ValueError, match=r"Row 37 of the split 'test' has label 10, outside the model's 10 classes"):
        record(model, _processor(), folder, split="test", use_cache=False, progress=False)

    labels[37], labels[5] = 3, -1
    folder = _plain_int_folder(cifar_slice, tmp_path / "minus", labels)
    model_dir = tmp_path / "model"
    model.config.preprocessing = PREPROCESSING
    model.save_pretrained(model_dir)
    code = tinysaver(["record", "--model", str(model_dir), "--dataset", folder, "--split", "test", "--no-progress",
                      "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and "Row 5 of the split 'test' has label -1" in error and "unlabelled row" in error

    # A split whose labels are all -1 (the `datasets` "no label") is recorded as unlabelled.
    folder = _plain_int_folder(cifar_slice.select(range(8)), tmp_path / "none", [-1] * 8)
    assert record(model, _processor(), folder, split="test", use_cache=False, progress=False).labels is None


def test_shuffle_seed_halves_are_disjoint_cover_the_split_and_key_the_cache(folders, tmp_path):
    whole = load_dataset_split(folders["indexed"], "test")
    first = load_dataset_split(folders["indexed"], "test[:50%]", shuffle_seed=7)
    second = load_dataset_split(folders["indexed"], "test[50%:]", shuffle_seed=7)
    assert len(first) == len(second) == 100
    first_rows, second_rows = list(first["row"]), list(second["row"])
    assert not set(first_rows) & set(second_rows)
    assert sorted(first_rows + second_rows) == list(whole["row"])
    assert first_rows != list(range(100))  # really permuted ...
    assert list(load_dataset_split(folders["indexed"], "test[:50%]", shuffle_seed=7)["row"]) == first_rows  # ... fixed

    model = timm_classifier("test_efficientnet", seed=0, labels=dict(enumerate(CIFAR_NAMES)))
    kwargs = {"split": "test[:25%]", "cache_dir": tmp_path / "cache", "progress": False, "batch_size": 50}
    plain = record(model, _processor(), folders["indexed"], **kwargs)
    seeded = {seed: record(model, _processor(), folders["indexed"], shuffle_seed=seed, **kwargs) for seed in (1, 2)}
    assert len({plain.cache_key, seeded[1].cache_key, seeded[2].cache_key}) == 3
    assert (plain.shuffle_seed, seeded[1].shuffle_seed) == (None, 1)
    expected_labels = load_dataset_split(folders["indexed"], "test[:25%]", shuffle_seed=1)["label"]
    assert seeded[1].labels.tolist() == list(expected_labels)
    again = record(model, _processor(), folders["indexed"], shuffle_seed=1, **kwargs)  # from the cache
    assert again.cache_key == seeded[1].cache_key and np.array_equal(again.logits, seeded[1].logits)
    assert (tmp_path / "cache" / f"{seeded[1].cache_key}.npz").exists()


def _calibrate_in_process(args: list[str]) -> list[str]:
    """Runs `tinysaver calibrate` in this process; returns the messages of the UserWarnings it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tinysaver(args) == 0
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_calibrate_warns_on_a_label_sorted_split_and_shuffle_seed_silences_it(folders, tiny_models_dir, tmp_path):
    messages = _calibrate_in_process(
        _calibrate_args(tiny_models_dir, folders["sorted"], tmp_path / "a", tmp_path / "c")
    )
    sorted_labels = np.sort(np.asarray(datasets.load_dataset(folders["sorted"], split="test")["label"]))
    held = len(np.unique(sorted_labels[:100]))
    coverage = [m for m in messages if f"The calibration split 'test[:50%]' holds {held} of the model's 10" in m]
    order = [m for m in messages if "is sorted or grouped by label (labels rise with the row" in m]
    assert len(coverage) == len(order) == 1, messages
    assert "--shuffle-seed N" in coverage[0] and "--shuffle-seed N" in order[0]

    args = _calibrate_args(tiny_models_dir, folders["sorted"], tmp_path / "b", tmp_path / "c", "--shuffle-seed", "0")
    assert not [m for m in _calibrate_in_process(args) if "calibration split" in m]
    assert json.loads((tmp_path / "b" / "calibration.json").read_text())["shuffle_seed"] == 0
    assert json.loads((tmp_path / "a" / "calibration.json").read_text())["shuffle_seed"] is None

    # Through the Python API too, from the cached records.
    cascade = build_cascade(tiny_models_dir["saver"], tiny_models_dir["base"])
    with pytest.warns(UserWarning, match="sorted or grouped by label"):
        calibrate_cascade(cascade, folders["sorted"], "test[:50%]", "exit-rate", exit_rate=0.9, progress=False,
                          cache_dir=tmp_path / "c")  # fmt: skip


def test_label_order_statistics_flag_sorted_and_grouped_data_but_not_random_order():
    rng = np.random.default_rng(0)
    for n, classes in ((30, 2), (100, 10), (650, 1000), (5000, 10)):
        for _ in range(20):
            labels = rng.integers(0, classes, n)
            assert not [m for m in label_order_warnings(labels, classes) if "sorted or grouped" in m], (n, classes)
    grouped = np.repeat(rng.permutation(10), 20)  # runs of one label, in no sorted order
    message = label_order_warnings(grouped, 10)[-1]
    assert "95 % of neighbouring rows share a label, against 10 % in a random order" in message
    assert label_order_warnings(np.tile(np.arange(10), 20), 10) == []  # balanced, interleaved: fine


@requires_shared("datasets/imagenet-val-1300")
def test_imagenet_subset_is_in_random_order_and_a_sorted_copy_is_flagged():
    labels = np.asarray(datasets.load_dataset(str(IMAGENET), split="validation")["label"])
    half = labels[: len(labels) // 2]
    messages = label_order_warnings(half, 1000, "validation[:50%]")
    assert len(messages) == 1 and f"holds {len(np.unique(half))} of the model's 1000 classes" in messages[0]
    # As many classes as chance allows at this size: the advice is more images, not a shuffle.
    assert "calibrate on more images (about 3,000" in messages[0] and "--shuffle-seed" not in messages[0]
    sorted_half = np.sort(labels)[: len(labels) // 2]
    messages = label_order_warnings(sorted_half, 1000, "validation[:50%]")
    assert "labels rise with the row (correlation 1.00)" in messages[-1]


def test_search_takes_shuffle_seed_and_label_map(folders, tiny_models_dir, tmp_path):
    results = {}
    for name, extra in (("original", []), ("renamed", ["--label-map", '{"plane": "airplane", "car": "automobile"}'])):
        results_file = tmp_path / f"{name}.json"
        code = tinysaver(
            ["search", "--base", tiny_models_dir["base"], "--candidates", tiny_models_dir["saver"], "--dataset",
             folders[name], "--split", "test[:50%]", "--shuffle-seed", "3", "--batch-size", "50", "--cache-dir",
             str(tmp_path / "cache"), "--results-file", str(results_file), "--no-progress", *extra]
        )  # fmt: skip
        assert code == 0
        results[name] = json.loads(results_file.read_text())
    assert results["original"]["shuffle_seed"] == results["renamed"]["shuffle_seed"] == 3
    assert results["renamed"]["base_accuracy"] == results["original"]["base_accuracy"]
    expected = load_dataset_split(folders["original"], "test[:50%]", shuffle_seed=3)
    base = record(
        timm_classifier("test_resnet", seed=1, labels=dict(enumerate(CIFAR_NAMES))),
        _processor(),
        expected,
        use_cache=False,
        progress=False,
    )
    assert results["original"]["base_accuracy"] == base.accuracy


def test_esn_train_takes_shuffle_seed_and_label_map(folders, tmp_path, capsys):
    import torch

    from hf_tinysaver import CifarResNetConfig, CifarResNetForImageClassification

    models = {}
    for role, depth, seed in (("saver", 8, 0), ("base", 14, 1)):
        torch.manual_seed(seed)
        model = CifarResNetForImageClassification(CifarResNetConfig(depth=depth, widths=[8, 16, 16])).eval()
        model.config.preprocessing = PREPROCESSING
        model.save_pretrained(tmp_path / role)
        models[role] = str(tmp_path / role)

    def esn_train(dataset: str, name: str, *extra: str) -> int:
        return tinysaver(
            ["esn-train", "--saver", models["saver"], "--base", models["base"], "--dataset", dataset,
             "--train-split", "test[:50%]", "--calib-split", "test[50%:75%]", "--eval-split", "test[75%:]",
             "--shuffle-seed", "0", "--width", "16", "--layers", "1", "--heads", "2", "--epochs", "1", "--train-batch-size", "32",
             "--max-drop", "10", "--cache-dir", str(tmp_path / "cache"), "--results-file",
             str(tmp_path / f"{name}.json"), "--no-progress", *extra]
        )  # fmt: skip

    assert esn_train(folders["renamed"], "refused") == 2
    assert "dataset class 0 'plane' vs model class 0 'airplane'" in capsys.readouterr().err
    assert esn_train(folders["original"], "original") == 0
    assert esn_train(folders["renamed"], "mapped", "--label-map", '{"plane": "airplane", "car": "automobile"}') == 0
    original, mapped = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("original", "mapped"))
    assert original["shuffle_seed"] == 0
    assert mapped["tinysaver"]["calibration"] == original["tinysaver"]["calibration"]
    assert mapped["esn"]["eval"]["base_accuracy"] == original["esn"]["eval"]["base_accuracy"]
