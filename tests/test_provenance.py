"""Every results file records what produced it under one `provenance` key; `evaluate --save-to-folder`."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest
import torch

from conftest import SHARED, requires_shared
from hf_tinysaver.commands import main as tinysaver
from hf_tinysaver.provenance import PROVENANCE_FIELDS, PROVENANCE_KEY, command_line, provenance, running_command
from hf_tinysaver.storage import EVALUATION_FILE, check_output_folder, foreign_files


def assert_provenance(results: dict, *command_parts: str) -> dict:
    """`results` holds a complete provenance whose command is the `tinysaver` command that wrote it."""
    recorded = results[PROVENANCE_KEY]
    assert set(PROVENANCE_FIELDS) <= set(recorded), recorded
    assert recorded["torch"] == torch.__version__ and recorded["transformers"] and recorded["hf_tinysaver"]
    assert recorded["device"] and recorded["dtype"] and recorded["hardware"]
    assert isinstance(recorded["threads"], int) and recorded["threads"] >= 1
    words = shlex.split(recorded["command"])
    assert words[0] == "tinysaver" and all(part in words for part in command_parts), recorded["command"]
    return recorded


def test_provenance_records_versions_hardware_and_the_quoted_command():
    recorded = provenance(device="cpu", dtype=torch.float32, argv=["tinysaver", "evaluate", "--split", "test[:50%]"])
    assert list(recorded) == list(PROVENANCE_FIELDS)
    assert recorded["device"] == "cpu" and recorded["dtype"] == "float32"
    assert recorded["command"] == "tinysaver evaluate --split 'test[:50%]'"
    assert recorded["hardware"].endswith(f"{torch.get_num_threads()} threads")
    with running_command(["tinysaver", "plan", "-m", "a b"]):
        assert command_line() == "tinysaver plan -m 'a b'"
    assert command_line() != "tinysaver plan -m 'a b'"


def test_evaluate_writes_results_with_provenance_and_into_the_folder(tiny_cascade_dir, tiny_dataset, tmp_path):
    folder = tmp_path / "cascade"
    shutil.copytree(tiny_cascade_dir, folder)
    results_file = tmp_path / "results.json"
    code = tinysaver(
        ["evaluate", "--model", str(folder), "--dataset", str(tiny_dataset), "--split", "train", "--batch-size", "8",
         "--cache-dir", str(tmp_path / "cache"), "--results-file", str(results_file), "--no-progress",
         "--save-to-folder"]
    )  # fmt: skip
    assert code == 0
    results = json.loads(results_file.read_text())
    assert json.loads((folder / EVALUATION_FILE).read_text()) == results
    recorded = assert_provenance(results, "evaluate", "--save-to-folder", str(folder))
    assert recorded["device"] == "cpu" and recorded["dtype"] == "float32"
    # The file is the library's own: an earlier cascade folder holding it is still replaced by `calibrate --out`.
    assert foreign_files(folder, "cascade") == []
    assert check_output_folder(folder) == folder


def test_evaluate_measures_the_speedup_that_the_card_then_reports(tiny_cascade_dir, tiny_dataset, tmp_path):
    from transformers import AutoConfig

    from hf_tinysaver.hub.model_card import TinySaverModelCardData, generate_model_card

    folder = tmp_path / "cascade"
    shutil.copytree(tiny_cascade_dir, folder)
    code = tinysaver(
        ["evaluate", "--model", str(folder), "--dataset", str(tiny_dataset), "--split", "train", "--batch-size", "8",
         "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--save-to-folder", "--measure-speedup", "16"]
    )  # fmt: skip
    assert code == 0
    evaluation = json.loads((folder / EVALUATION_FILE).read_text())
    assert evaluation["speedup"] > 0 and evaluation["streamed_speedup"] > 0 and evaluation["mac_predicted_speedup"] > 0
    assert evaluation["speedup_timing"] == {"images": 16, "batch_size": 8, "rounds": 3}
    config = AutoConfig.from_pretrained(folder)
    card = str(generate_model_card(config, TinySaverModelCardData.from_config(config, evaluation=evaluation)))
    assert f"{evaluation['speedup']:.2f}x" in card and evaluation["provenance"]["hardware"] in card


def test_measure_speedup_needs_a_batch_of_images(tiny_cascade_dir, tiny_dataset, capsys):
    code = tinysaver(
        ["evaluate", "--model", str(tiny_cascade_dir), "--dataset", str(tiny_dataset), "--split", "train",
         "--batch-size", "8", "--measure-speedup", "4", "--no-progress"]
    )  # fmt: skip
    assert code == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "--measure-speedup takes at least --batch-size (8) images" in error


def test_save_to_folder_refuses_another_threshold(tiny_cascade_dir, tiny_dataset, capsys, tmp_path):
    folder = tmp_path / "cascade"
    shutil.copytree(tiny_cascade_dir, folder)
    code = tinysaver(
        ["evaluate", "--model", str(folder), "--dataset", str(tiny_dataset), "--split", "train", "--threshold", "0.99",
         "--save-to-folder", "--no-progress"]
    )  # fmt: skip
    assert code == 2 and not (folder / EVALUATION_FILE).exists()
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "--save-to-folder records how the saved cascade performs at its own threshold" in error


def test_save_to_folder_needs_a_local_folder(capsys, tmp_path):
    code = tinysaver(
        ["evaluate", "-m", "someone/cascade", "-d", "cifar10", "--split", "test", "--save-to-folder", "--no-progress"]
    )
    assert code == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert error.startswith("tinysaver: error: --save-to-folder") and "not a local folder" in error


@pytest.mark.slow
@requires_shared("models/cifar10-resnet", "datasets/cifar10-jpeg")
def test_calibrate_and_plan_results_carry_provenance(tmp_path):
    cache = ["--cache-dir", str(tmp_path / "cache"), "--assets", str(SHARED), "--no-progress"]
    pair = [
        "--saver",
        "cifar10-resnet20",
        "--base",
        "cifar10-resnet56",
        "--dataset",
        "cifar10",
        "--split",
        "test[:200]",
    ]
    plan_file = tmp_path / "plan.json"
    assert tinysaver(["plan", *pair, "--max-drop", "2", "--results-file", str(plan_file), *cache]) == 0
    assert_provenance(json.loads(plan_file.read_text()), "plan", "--max-drop")

    out = tmp_path / "cascade"
    assert (
        tinysaver(["calibrate", *pair, "--objective", "max-drop", "--max-drop", "2", "--out", str(out), *cache]) == 0
    )
    calibration = json.loads((out / "calibration.json").read_text())
    assert_provenance(calibration, "calibrate", str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["calibration"][PROVENANCE_KEY] == calibration[PROVENANCE_KEY]
