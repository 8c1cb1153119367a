"""Where a model or dataset comes from: one precedence rule (local path, then zoo name, then Hub id), one split loader."""

from __future__ import annotations

import doctest
from pathlib import Path

import datasets
import pytest
from huggingface_hub import constants

from conftest import SHARED, requires_shared
from hf_tinysaver.sources import (
    Source,
    dataset_name,
    load_dataset_split,
    load_model,
    load_model_config,
    parse_source,
    resolve_dataset_source,
    split_name,
)
from test_records import write_parquet_folder
from tiny_models import tiny_vit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ZOO_MODEL = "cifar10-resnet20"


def rows(data: datasets.Dataset) -> list[int]:
    """Which stored rows of the indexed dataset a loaded split holds, in order."""
    return list(data["row"])


@pytest.fixture
def in_tmp_path(tmp_path, monkeypatch) -> Path:
    """Runs the test in an empty working directory, so that relative names resolve against it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def indexed_folder(tmp_path_factory) -> Path:
    """A local parquet dataset whose `row` column tells which stored row each loaded example is."""
    folder = tmp_path_factory.mktemp("indexed")
    (folder / "data").mkdir()
    rows = datasets.Dataset.from_dict({"row": list(range(40)), "label": [i % 10 for i in range(40)]})
    rows.to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    return folder


def test_parse_source_precedence(in_tmp_path):
    model = tiny_vit()
    assert parse_source(model) == Source("object", model)
    assert parse_source(ZOO_MODEL) == Source("zoo", ZOO_MODEL)
    assert parse_source("someone/some-model") == Source("hub", "someone/some-model")
    assert parse_source("cifar10", what="dataset") == Source("zoo", "cifar10")
    assert parse_source("cifar10") == Source("hub", "cifar10")  # a zoo dataset is no zoo model
    # A string that cannot be a Hub id, and any path object, name local paths even when missing.
    assert parse_source("missing/nested/folder") == Source("local", "missing/nested/folder")
    assert parse_source(Path(ZOO_MODEL)) == Source("local", ZOO_MODEL)
    (in_tmp_path / ZOO_MODEL).mkdir()
    (in_tmp_path / "cifar10").mkdir()
    assert parse_source(ZOO_MODEL) == Source("local", ZOO_MODEL)  # an existing local path always wins
    assert parse_source("cifar10", what="dataset") == Source("local", "cifar10")
    with pytest.raises(ValueError, match="'model' or 'dataset'"):
        parse_source(ZOO_MODEL, what="models")


def test_a_local_folder_named_like_a_zoo_model_wins(in_tmp_path):
    model = tiny_vit(seed=3)
    model.save_pretrained(in_tmp_path / ZOO_MODEL)
    loaded = load_model(ZOO_MODEL)
    assert loaded.config.model_type == "vit"
    assert loaded.state_dict()["classifier.weight"].equal(model.state_dict()["classifier.weight"])
    assert load_model_config(ZOO_MODEL).model_type == "vit"
    assert load_model(loaded) is loaded and load_model_config(loaded) is loaded.config


@requires_shared("models/cifar10-resnet")
def test_a_zoo_name_loads_the_zoo_model(in_tmp_path):
    assert load_model(ZOO_MODEL, assets=SHARED).config.model_type == "cifar_resnet"
    assert load_model_config(ZOO_MODEL, assets=SHARED).model_type == "cifar_resnet"


def test_an_unknown_model_offline_gets_one_line_with_a_suggestion(in_tmp_path):
    assert constants.HF_HUB_OFFLINE, "run the tests with HF_HUB_OFFLINE=1"
    for load in (load_model, load_model_config):
        with pytest.raises(ValueError) as caught:
            load("cifar10-resnet2O")
        message = str(caught.value)
        assert (
            "'cifar10-resnet2O' is neither a zoo name, nor a local model folder, nor a Hub id reachable offline"
            in (message)
        )
        assert "Did you mean 'cifar10-resnet20'?" in message and "\n" not in message
    with pytest.raises(ValueError, match="No such local path 'missing/nested/folder'"):
        load_model("missing/nested/folder")
    (in_tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; pass the folder `save_pretrained` wrote"):
        load_model("weights.bin")


def test_a_local_dataset_folder_named_like_a_zoo_dataset_wins(in_tmp_path):
    write_parquet_folder(in_tmp_path / "cifar10", count=6)
    assert resolve_dataset_source("cifar10") == "cifar10"
    loaded = load_dataset_split("cifar10", "test")
    assert len(loaded) == 6 and loaded.features["label"].dtype == "int64"  # not the zoo's 10,000 ClassLabel rows


@requires_shared("datasets/cifar10-jpeg")
def test_a_zoo_dataset_name_reads_the_assets_folder(in_tmp_path):
    folder = SHARED / "datasets" / "cifar10-jpeg"
    assert Path(resolve_dataset_source("cifar10", assets=SHARED)) == folder.resolve()
    loaded = load_dataset_split("cifar10", "test[:4]", assets=SHARED)
    assert len(loaded) == 4 and loaded.features["label"].names[0] == "airplane"


def test_an_unknown_dataset_offline_gets_one_line_with_a_suggestion(in_tmp_path):
    with pytest.raises(ValueError) as caught:
        load_dataset_split("cifr10", "test")
    message = str(caught.value)
    assert "'cifr10' is neither a zoo name, nor a local dataset folder, nor a Hub dataset id reachable offline" in (
        message
    )
    assert "Did you mean 'cifar10'?" in message and "\n" not in message
    with pytest.raises(ValueError, match="No such local path"):
        load_dataset_split(Path("no-such-folder"), "test")


def test_split_slicing_and_the_shuffle_seed_rule(indexed_folder):
    assert rows(load_dataset_split(indexed_folder, "test[:10]")) == list(range(10))
    assert rows(load_dataset_split(indexed_folder, "test[-5:]")) == list(range(35, 40))
    first = rows(load_dataset_split(indexed_folder, "test[:50%]", shuffle_seed=7))
    second = rows(load_dataset_split(indexed_folder, "test[50%:]", shuffle_seed=7))
    assert len(first) == len(second) == 20 and sorted(first + second) == list(range(40))  # disjoint halves
    assert first != list(range(20))  # of the whole split permuted, not of the stored order
    assert rows(load_dataset_split(str(indexed_folder), "test[:50%]", shuffle_seed=7)) == first  # the same seed
    assert rows(load_dataset_split(indexed_folder, "test[:50%]", shuffle_seed=8)) != first
    with pytest.raises(ValueError, match="Name the split"):
        load_dataset_split(indexed_folder, None)
    with pytest.raises(ValueError, match="shuffle_seed must be an integer"):
        load_dataset_split(indexed_folder, "test", shuffle_seed=True)
    with pytest.raises(ValueError, match="Cannot read the split 'test\\[:50%'"):
        load_dataset_split(indexed_folder, "test[:50%", shuffle_seed=1)


def test_saved_datasets_and_loaded_ones(indexed_folder, tmp_path):
    whole = load_dataset_split(indexed_folder, "test")
    datasets.DatasetDict(test=whole).save_to_disk(str(tmp_path / "saved-dict"))
    assert rows(load_dataset_split(tmp_path / "saved-dict", "test[5:8]")) == [5, 6, 7]
    whole.save_to_disk(str(tmp_path / "saved-one"))
    assert rows(load_dataset_split(tmp_path / "saved-one", "test[5:8]")) == [5, 6, 7]
    assert rows(load_dataset_split(tmp_path / "saved-one", "test[:50%]", shuffle_seed=7)) == (
        rows(load_dataset_split(indexed_folder, "test[:50%]", shuffle_seed=7))
    )
    with pytest.raises(ValueError, match="one saved dataset \\(save_to_disk\\) whose split is 'test'"):
        load_dataset_split(tmp_path / "saved-one", "train")

    assert load_dataset_split(whole, None) is whole  # a loaded dataset is used as it is
    assert rows(load_dataset_split(whole, "ignored", shuffle_seed=3)) == rows(whole.shuffle(seed=3))
    assert split_name(whole, None) == "test" and split_name(whole, "test[:5]") == "test[:5]"
    with pytest.raises(ValueError, match="pass one split, e.g. dataset\\['test'\\]"):
        load_dataset_split(datasets.DatasetDict(test=whole), "test")
    with pytest.raises(TypeError, match="got list"):
        load_dataset_split([1, 2, 3], "test")
    assert (
        dataset_name(tmp_path / "saved-one") == str(tmp_path / "saved-one")
        and dataset_name(whole) == indexed_folder.name
    )


@requires_shared("models/cifar10-resnet", "datasets/cifar10-jpeg")
def test_the_module_example_runs():
    import hf_tinysaver.sources

    text = hf_tinysaver.sources.__doc__.replace("```python", "").replace("```", "")
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(doctest.DocTestParser().get_doctest(text, {}, "hf_tinysaver.sources", None, 0))
    assert runner.summarize(verbose=False).failed == 0
