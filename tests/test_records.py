"""Records: correctness against direct forward passes, cache reuse, interrupted runs, damaged chunks, 2 processes."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import PartialState, debug_launcher

from conftest import REPO_ROOT, random_images, requires_shared
from hf_tinysaver import (
    CifarResNetConfig,
    CifarResNetForImageClassification,
    TinySaverForImageClassification,
    TinySaverImageProcessor,
)
from hf_tinysaver.records import (
    Records,
    _save_arrays,
    default_cache_dir,
    distributed_state,
    folder_fingerprint,
    model_fingerprint,
    pair_from_records,
    record,
)
from tiny_models import timm_classifier

PREPROCESSING = {"input_size": [3, 32, 32], "resize": "fixed", "interpolation": "bilinear"}
NUM_IMAGES = 30


def write_parquet_folder(folder: Path, count: int = NUM_IMAGES, seed: int = 0, with_labels: bool = True) -> Path:
    """A Hub-style local dataset folder (one parquet test split) of random images."""
    columns = {"image": random_images(count, seed=seed)}
    if with_labels:
        columns["label"] = [int(v) for v in np.random.RandomState(seed).randint(0, 10, count)]
    dataset = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
    (folder / "data").mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    return folder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    return write_parquet_folder(tmp_path_factory.mktemp("data") / "toy")


@pytest.fixture(scope="module")
def model():
    return timm_classifier("test_efficientnet", seed=0)


@pytest.fixture(scope="module")
def processor():
    return TinySaverImageProcessor(preprocessing=PREPROCESSING)


class CallCounter:
    """Counts forward calls of a model through a hook (the model's weights, and so its cache key, stay the same).

    With `fail_after`, the call after that many raises, as a crash mid-run would.
    """

    def __init__(self, model: torch.nn.Module, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.remove()


def run(model, processor, data_folder, cache_dir, **kwargs) -> Records:
    kwargs = {"split": "test", "batch_size": 4, "chunk_batches": 2, "progress": False} | kwargs
    return record(model, processor, str(data_folder), cache_dir=cache_dir, **kwargs)


def assert_same_records(actual: Records, expected: Records) -> None:
    np.testing.assert_array_equal(actual.logits, expected.logits)
    np.testing.assert_array_equal(actual.predictions, expected.predictions)
    np.testing.assert_array_equal(actual.labels, expected.labels)
    assert (actual.model_hash, actual.dataset_fingerprint, actual.split) == (
        expected.model_hash,
        expected.dataset_fingerprint,
        expected.split,
    )


def test_records_match_a_direct_forward_pass(model, processor, data_folder, tmp_path):
    records = run(model, processor, data_folder, tmp_path, split="test[:50%]")
    dataset = datasets.load_dataset(str(data_folder), split="test[:50%]")
    assert records.n == len(dataset) == NUM_IMAGES // 2
    with torch.no_grad():
        expected = model(pixel_values=processor(images=list(dataset["image"]), return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(torch.from_numpy(records.logits), expected.logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(records.predictions, expected.logits.argmax(-1).numpy())
    np.testing.assert_array_equal(records.labels, np.asarray(dataset["label"]))
    assert records.logits.dtype == np.float32 and records.labels.dtype == np.int64
    assert records.split == "test[:50%]" and records.preprocessing == processor.to_dict()
    assert len(set(records.predictions.tolist())) > 1  # the random model separates images
    with_workers = run(model, processor, data_folder, None, split="test[:50%]", use_cache=False, num_workers=2)
    np.testing.assert_array_equal(with_workers.logits, records.logits)


def test_second_run_reads_the_cache_without_calling_the_model(model, processor, data_folder, tmp_path):
    with CallCounter(model) as first:
        records = run(model, processor, data_folder, tmp_path)
    assert first.calls == 8  # ceil(30 / 4) batches
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{records.cache_key}.npz"]  # chunks cleaned up
    with CallCounter(model) as second:
        again = run(model, processor, data_folder, tmp_path, batch_size=16)
    assert second.calls == 0
    assert_same_records(again, records)

    # Anything that changes the outputs changes the key: split, preprocessing, weights.
    other_processor = TinySaverImageProcessor(preprocessing=PREPROCESSING | {"mean": [0.4] * 3})
    other_model = timm_classifier("test_efficientnet", seed=5)
    for changed in (
        {"split": "test[:50%]"},
        {"processor": other_processor},
        {"model": other_model},
    ):
        arguments = {"model": model, "processor": processor} | changed
        with CallCounter(arguments["model"]) as counter:
            run(arguments.pop("model"), arguments.pop("processor"), data_folder, tmp_path, **arguments)
        assert counter.calls > 0, changed
    assert model_fingerprint(other_model) != records.model_hash


def test_changed_folder_content_is_not_served_stale_records(model, processor, tmp_path):
    folder = write_parquet_folder(tmp_path / "data", seed=1)
    first = run(model, processor, folder, tmp_path / "cache")
    fingerprint = folder_fingerprint(folder)
    write_parquet_folder(tmp_path / "data", seed=2)  # same path, new images
    assert folder_fingerprint(folder) != fingerprint
    second = run(model, processor, folder, tmp_path / "cache")
    assert second.cache_key != first.cache_key
    assert not np.array_equal(second.logits, first.logits)
    direct = run(model, processor, folder, None, use_cache=False)
    np.testing.assert_array_equal(second.logits, direct.logits)


def test_interrupted_run_resumes_from_complete_chunks(model, processor, data_folder, tmp_path):
    reference = run(model, processor, data_folder, None, use_cache=False)
    with CallCounter(model, fail_after=5), pytest.raises(RuntimeError, match="simulated crash"):
        run(model, processor, data_folder, tmp_path)
    partial = next(tmp_path.glob("*.partial"))
    # Chunks of 2 batches: the crash in batch 5 leaves chunks 0 and 1 (rows 0-15) complete.
    assert sorted(p.name for p in partial.iterdir()) == [
        "rows-0000000000-0000000008.npz",
        "rows-0000000008-0000000016.npz",
    ]
    with CallCounter(model) as resumed:
        records = run(model, processor, data_folder, tmp_path)
    assert resumed.calls == 4  # only the 4 batches not yet recorded
    assert_same_records(records, reference)
    assert not partial.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "wrong_rows"])
def test_damaged_chunk_is_detected_and_recomputed(model, processor, data_folder, tmp_path, caplog, damage):
    reference = run(model, processor, data_folder, None, use_cache=False)
    with CallCounter(model, fail_after=5), pytest.raises(RuntimeError):
        run(model, processor, data_folder, tmp_path)
    chunk = sorted(next(tmp_path.glob("*.partial")).iterdir())[1]
    content = chunk.read_bytes()
    if damage == "truncate":
        chunk.write_bytes(content[: len(content) // 2])
    elif damage == "flip_byte":
        # Inside the logits payload (the header is short), keeping the zip structure intact.
        position = content.index(b"NUMPY") + 200
        chunk.write_bytes(content[:position] + bytes([content[position] ^ 0xFF]) + content[position + 1 :])
    else:  # a well-formed chunk of the wrong size (e.g. written under another batch plan)
        _save_arrays(chunk, {"logits": np.zeros((3, 10), dtype=np.float32)})
    with caplog.at_level(logging.WARNING, logger="hf_tinysaver.records"), CallCounter(model) as resumed:
        records = run(model, processor, data_folder, tmp_path)
    assert resumed.calls == 6  # chunk 1 (2 batches) again, plus the 4 never recorded
    assert "damaged chunk" in caplog.text
    assert_same_records(records, reference)


def test_damaged_cache_file_is_recorded_again(model, processor, data_folder, tmp_path, caplog):
    records = run(model, processor, data_folder, tmp_path)
    cache_file = tmp_path / f"{records.cache_key}.npz"
    cache_file.write_bytes(cache_file.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING, logger="hf_tinysaver.records"), CallCounter(model) as counter:
        again = run(model, processor, data_folder, tmp_path)
    assert counter.calls == 8 and "damaged" in caplog.text
    assert_same_records(again, records)
    assert Records.load(cache_file).n == NUM_IMAGES


def test_records_save_load_roundtrip_and_unlabelled_data(model, processor, tmp_path):
    folder = write_parquet_folder(tmp_path / "unlabelled", count=9, with_labels=False)
    records = run(model, processor, folder, tmp_path / "cache")
    assert records.labels is None and records.accuracy is None
    records.save(tmp_path / "copy.npz")
    loaded = Records.load(tmp_path / "copy.npz")
    np.testing.assert_array_equal(loaded.logits, records.logits)
    np.testing.assert_array_equal(loaded.predictions, records.predictions)
    assert loaded.metadata() == records.metadata() and loaded.labels is None


def test_loaded_dataset_objects_and_column_detection(model, processor, tmp_path):
    dataset = datasets.Dataset.from_dict({"img": random_images(6, seed=3), "labels": [1, 2, 3, 4, 5, 6]})
    records = record(model, processor, dataset, split="mine", batch_size=4, cache_dir=tmp_path, progress=False)
    assert records.labels.tolist() == [1, 2, 3, 4, 5, 6] and records.split == "mine"
    with CallCounter(model) as counter:
        record(model, processor, dataset, split="mine", batch_size=4, cache_dir=tmp_path, progress=False)
    assert counter.calls == 0  # in-memory datasets have a content fingerprint too

    with pytest.raises(ValueError, match="pass one split"):
        record(model, processor, datasets.DatasetDict({"test": dataset}), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="image_column=<name>"):
        record(model, processor, dataset.remove_columns("img"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Name the split"):
        record(model, processor, "some/dataset", cache_dir=tmp_path)

    def plain_processor(images, return_tensors):
        return processor(images=images, return_tensors=return_tensors)

    with pytest.raises(ValueError, match="pass `preprocessing="):
        record(model, plain_processor, dataset, cache_dir=tmp_path)
    described = record(
        model,
        plain_processor,
        dataset,
        batch_size=4,  # as above: another batch size may change float32 logits in the last bits on some CPUs
        cache_dir=tmp_path,
        preprocessing={"name": "plain"},
        progress=False,
    )
    np.testing.assert_array_equal(described.logits, records.logits)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYSAVER_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "records"
    assert default_cache_dir("esn") == tmp_path / "esn"  # the ESN's feature cache shares the one root
    monkeypatch.delenv("TINYSAVER_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "hf_tinysaver" / "records"
    assert default_cache_dir("esn") == Path.home() / ".cache" / "hf_tinysaver" / "esn"


def test_simulation_from_records_matches_the_cascade_forward(data_folder, tmp_path):
    saver = timm_classifier("test_efficientnet", seed=0)
    base = timm_classifier("test_resnet", seed=1)
    cascade = TinySaverForImageClassification.from_saver_and_base(saver, base).eval()
    config = cascade.config
    saver_records = run(
        saver, TinySaverImageProcessor(preprocessing=config.saver_preprocessing), data_folder, tmp_path
    )
    base_records = run(base, TinySaverImageProcessor(preprocessing=config.base_preprocessing), data_folder, tmp_path)
    simulation = pair_from_records(saver_records, base_records, relative_saver_macs=0.2)
    result = simulation.calibrate("exit-rate", exit_rate=0.5)

    dataset = datasets.load_dataset(str(data_folder), split="test")
    inputs = cascade.get_image_processor()(images=list(dataset["image"]), return_tensors="pt")
    with torch.no_grad():
        outputs = cascade(**inputs, threshold=result.threshold)
    # One batch of 30 here, batches of 4 when recording: float32 logits differ in the last bits, the decisions do
    # not (the threshold sits midway between distinct confidences).
    np.testing.assert_allclose(outputs.saver_confidence.numpy(), simulation.confidence, rtol=1e-5)
    np.testing.assert_array_equal(outputs.exited.numpy(), simulation.confidence > result.threshold)
    assert outputs.exited.float().mean().item() == result.exit_rate
    accuracy = (outputs.logits.argmax(-1).numpy() == saver_records.labels).mean()
    assert accuracy == pytest.approx(result.accuracy)

    with pytest.raises(ValueError, match="record both on the same split"):
        half = run(
            base,
            TinySaverImageProcessor(preprocessing=config.base_preprocessing),
            data_folder,
            tmp_path,
            split="test[:50%]",
        )
        pair_from_records(saver_records, half, relative_saver_macs=0.2)


def _two_process_worker(data_folder: str, cache_dir: str, output_dir: str) -> None:
    PartialState._reset_state()  # forked from the test process, whose single-process state it inherited
    state = distributed_state()
    # After the state, which sets its own thread count on CPU: CPU kernels round differently with other counts.
    torch.set_num_threads(1)
    model = timm_classifier("test_efficientnet", seed=0)
    processor = TinySaverImageProcessor(preprocessing=PREPROCESSING)
    counter = CallCounter(model)
    records = record(
        model,
        processor,
        data_folder,
        split="test",
        batch_size=4,
        chunk_batches=3,
        cache_dir=cache_dir,
        progress=False,
    )
    np.savez(
        Path(output_dir) / f"rank{state.process_index}.npz",
        logits=records.logits,
        labels=records.labels,
        calls=counter.calls,
        world=state.num_processes,
    )


def test_two_processes_give_the_single_process_records(model, processor, data_folder, tmp_path):
    assert torch.get_num_threads() == 1  # as in the workers: the logits must be bit-identical
    single = run(model, processor, data_folder, None, use_cache=False, chunk_batches=3)
    debug_launcher(
        _two_process_worker, args=(str(data_folder), str(tmp_path / "cache"), str(tmp_path)), num_processes=2
    )
    outputs = [np.load(tmp_path / f"rank{rank}.npz") for rank in (0, 1)]
    assert [int(o["world"]) for o in outputs] == [2, 2]
    assert sorted(int(o["calls"]) for o in outputs) == [4, 4]  # 8 batches shared, none twice
    for output in outputs:  # every process gets the gathered records, identical to one process, row for row
        np.testing.assert_array_equal(output["logits"], single.logits)
        np.testing.assert_array_equal(output["labels"], single.labels)
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1 and not list((tmp_path / "cache").glob("*.partial"))
    np.testing.assert_array_equal(Records.load(cached[0]).logits, single.logits)


def test_docstring_example_runs():
    import doctest

    from hf_tinysaver import records as records_module

    text = records_module.record.__doc__.replace("```python", "").replace("```", "")
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(doctest.DocTestParser().get_doctest(text, {}, "record", None, 0))
    assert runner.summarize(verbose=False).failed == 0


@pytest.mark.slow
@requires_shared("datasets/cifar10-jpeg", "models/cifar10-resnet/resnet20-12fca82f.th")
def test_real_cifar_pair_reproduces_the_reference_figures(shared_dir):
    """ResNet-20 -> ResNet-56 on CIFAR-10 JPEG `test[:50%]`: the figures of the design notes (section 1)."""

    def load(depth: int, file_name: str) -> CifarResNetForImageClassification:
        checkpoint = torch.load(
            shared_dir / "models" / "cifar10-resnet" / file_name, map_location="cpu", weights_only=True
        )
        model = CifarResNetForImageClassification(CifarResNetConfig(depth=depth))
        model.load_state_dict({k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()})
        return model.eval()

    preprocessing = {"input_size": [3, 32, 32], "resize": "fixed", "mean": [0.485, 0.456, 0.406]}
    processor = TinySaverImageProcessor(preprocessing=preprocessing | {"std": [0.229, 0.224, 0.225]})
    cache_dir = REPO_ROOT / ".cache" / "records"  # git-ignored; a second run only calibrates
    dataset = str(shared_dir / "datasets" / "cifar10-jpeg")
    saver, base = load(20, "resnet20-12fca82f.th"), load(56, "resnet56-4bfd9763.th")
    saver_records, base_records = (
        record(m, processor, dataset, split="test[:50%]", batch_size=250, cache_dir=cache_dir, progress=False)
        for m in (saver, base)
    )
    relative_saver_macs = 40.551040 / 125.485696  # MACs of ResNet-20 / ResNet-56 (FlopCounterMode, 32x32)
    simulation = pair_from_records(saver_records, base_records, relative_saver_macs)

    paper = simulation.calibrate("paper-no-loss")
    assert paper.exit_rate == pytest.approx(0.877, abs=0.001) and paper.delta_c == pytest.approx(-0.554, abs=0.001)
    # Every distinct float64 confidence instead of the 0.001 grid: the rule stops near r = 0.108.
    assert simulation.calibrate("paper-no-loss", grid_size=None).exit_rate == pytest.approx(0.108, abs=0.001)
    for max_drop, relative_macs in ((0.0, 0.443), (0.5, 0.395), (1.0, 0.374)):
        result = simulation.calibrate("max-drop", max_drop=max_drop)
        assert result.relative_macs == pytest.approx(relative_macs, abs=0.001)
