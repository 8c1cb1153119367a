"""The records cache under concurrency and tampering: two runs at once, files of another key, file permissions."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import datasets
import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, random_images
from hf_tinysaver import TinySaverImageProcessor
from hf_tinysaver.records import Records, _save_arrays, record
from tiny_models import timm_classifier

PREPROCESSING = {"input_size": [3, 32, 32], "resize": "fixed", "interpolation": "bilinear"}
NUM_IMAGES = 16
ROUNDS = 10  # keys both processes record at once; the old cache failed about one race in six

# Records ROUNDS keys (one tiny model per seed) into one cache, waiting for the file `go` before it starts so that
# both processes race on every key, and saves each key's logits for the parent to compare.
WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import datasets, numpy as np, torch
    sys.path.insert(0, sys.argv[1])
    from tiny_models import timm_classifier
    from hf_tinysaver import TinySaverImageProcessor
    from hf_tinysaver.records import record

    torch.set_num_threads(1)
    data_dir, cache, out, rounds = Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), int(sys.argv[5])
    data = datasets.load_from_disk(str(data_dir))
    processor = TinySaverImageProcessor(preprocessing=PREPROCESSING)
    models = [timm_classifier("test_efficientnet", seed=seed) for seed in range(rounds)]
    out.mkdir(parents=True)
    (out / "ready").touch()
    while not (data_dir.parent / "go").exists():
        time.sleep(0.01)
    for seed, model in enumerate(models):
        records = record(
            model, processor, data, split="test", batch_size=2, chunk_batches=1, cache_dir=cache, progress=False
        )
        np.save(out / f"{seed}.npy", records.logits)
    """
).replace("PREPROCESSING", repr(PREPROCESSING))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> datasets.Dataset:
    labels = [int(v) for v in np.random.RandomState(0).randint(0, 10, NUM_IMAGES)]
    dataset = datasets.Dataset.from_dict({"image": random_images(NUM_IMAGES, seed=0), "label": labels})
    folder = tmp_path_factory.mktemp("records-cache") / "data"
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(folder))
    return datasets.load_from_disk(str(folder))


@pytest.fixture(scope="module")
def processor():
    return TinySaverImageProcessor(preprocessing=PREPROCESSING)


def test_two_processes_recording_the_same_keys_at_once_both_succeed(data, tmp_path):
    data_dir = tmp_path / "data"
    data.save_to_disk(str(data_dir))
    cache, outs = tmp_path / "cache", [tmp_path / "a", tmp_path / "b"]
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    environment["OMP_NUM_THREADS"] = "1"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(REPO_ROOT / "tests"), str(data_dir), str(cache), str(out), str(ROUNDS)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    deadline = time.monotonic() + 120
    while not all((out / "ready").exists() for out in outs):
        assert all(worker.poll() is None for worker in workers), [worker.communicate() for worker in workers]
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    results = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_, stderr) in zip(workers, results, strict=True):
        assert worker.returncode == 0, stderr
    for seed in range(ROUNDS):
        first, second = (np.load(out / f"{seed}.npy") for out in outs)
        assert first.shape == (NUM_IMAGES, 10)
        np.testing.assert_array_equal(first, second)
    finished = sorted(cache.glob("*.npz"))
    assert len(finished) == ROUNDS and not list(cache.glob("*.partial"))
    for path in finished:
        assert Records.load(path).n == NUM_IMAGES


class ForwardCounter:
    """Counts the model's forward calls through a hook (its weights, and so its records key, stay the same)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, inputs):
        self.calls += 1


def test_records_of_another_key_copied_over_the_cache_are_ignored_and_recorded_again(
    data, processor, tmp_path, caplog
):
    first, second = timm_classifier("test_efficientnet", seed=0), timm_classifier("test_efficientnet", seed=1)
    kwargs = {"split": "test", "batch_size": 8, "cache_dir": tmp_path, "progress": False}
    expected = record(first, processor, data, **kwargs)
    other = record(second, processor, data, **kwargs)
    assert not np.array_equal(expected.logits, other.logits)
    shutil.copyfile(tmp_path / f"{other.cache_key}.npz", tmp_path / f"{expected.cache_key}.npz")

    counter = ForwardCounter(first)
    with caplog.at_level(logging.WARNING, logger="hf_tinysaver.records"):
        again = record(first, processor, data, **kwargs)
    assert counter.calls == 2  # recorded again, not loaded
    assert "not this key's" in caplog.text and "cache_key" in caplog.text
    np.testing.assert_array_equal(again.logits, expected.logits)
    assert again.model_hash == expected.model_hash
    # The cache holds the right records again: the next call loads them.
    counter.calls = 0
    np.testing.assert_array_equal(record(first, processor, data, **kwargs).logits, expected.logits)
    assert counter.calls == 0


def test_records_load_checks_the_expected_metadata(data, processor, tmp_path):
    records = record(timm_classifier("test_efficientnet", seed=0), processor, data, split="test", cache_dir=tmp_path,
                     progress=False)  # fmt: skip
    path = tmp_path / f"{records.cache_key}.npz"
    assert Records.load(path, expected={"cache_key": records.cache_key, "n": NUM_IMAGES}).n == NUM_IMAGES
    with pytest.raises(ValueError, match="another n"):
        Records.load(path, expected={"n": NUM_IMAGES + 1})
    with pytest.raises(ValueError, match="another dataset_fingerprint"):
        Records.load(path, expected={"dataset_fingerprint": "0" * 16})


def test_a_chunk_of_another_key_is_recomputed(data, processor, tmp_path, caplog):
    first, second = timm_classifier("test_efficientnet", seed=0), timm_classifier("test_efficientnet", seed=1)
    kwargs = {"split": "test", "batch_size": 4, "chunk_batches": 1, "cache_dir": tmp_path, "progress": False}
    expected = record(first, processor, data, **kwargs)
    other = record(second, processor, data, **kwargs)
    (tmp_path / f"{expected.cache_key}.npz").unlink()
    # What an interrupted run leaves behind, but with the first chunk taken from the other key's records.
    _save_arrays(
        tmp_path / f"{expected.cache_key}.partial" / "rows-0000000000-0000000004.npz",
        {"logits": other.logits[:4], "key": np.array(other.cache_key)},
    )
    with caplog.at_level(logging.WARNING, logger="hf_tinysaver.records"):
        again = record(first, processor, data, **kwargs)
    assert "was not recorded for key" in caplog.text
    np.testing.assert_array_equal(again.logits, expected.logits)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_cache_files_follow_the_umask(data, processor, tmp_path, umask):
    previous = os.umask(umask)
    try:
        records = record(timm_classifier("test_efficientnet", seed=0), processor, data, split="test",
                         cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    finally:
        os.umask(previous)
    files = [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]
    assert (tmp_path / "cache" / f"{records.cache_key}.npz") in files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
