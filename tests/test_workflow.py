"""`tinysaver calibrate` / `evaluate` / `record`: real cascades on real data, and 2-process runs under accelerate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import SHARED, requires_shared
from hf_tinysaver.commands import main as tinysaver
from tiny_models import timm_classifier


def run_cli(args: list[str]) -> int:
    return tinysaver(args)


def test_evaluate_single_process_reports_real_forward_and_simulation(tiny_cascade_dir, tiny_dataset, tmp_path):
    results_file = tmp_path / "results.json"
    code = run_cli(
        ["evaluate", "--model", str(tiny_cascade_dir), "--dataset", str(tiny_dataset), "--split", "train",
         "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--results-file", str(results_file),
         "--no-progress"]
    )  # fmt: skip
    assert code == 0
    results = json.loads(results_file.read_text())
    for key in ("accuracy", "base_accuracy", "exit_rate", "relative_macs", "images_per_second", "n"):
        assert key in results
    assert results["n"] == 40 and 0 < results["exit_rate"] < 1
    assert results["simulation_matches_forward"] is True
    assert results["relative_macs"] == pytest.approx(
        results["saver_macs"] / results["base_macs"] + 1 - results["exit_rate"]
    )
    from test_provenance import assert_provenance

    assert_provenance(results, "evaluate", "--results-file", str(results_file))


def _accelerate_command() -> list[str]:
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate launcher is not on PATH")
    # `--cpu --num_processes 2` silently runs one process; --multi_gpu falls back to CPU + gloo with two real ones.
    return [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hf_tinysaver.commands"]  # fmt: skip


def test_evaluate_under_accelerate_launch_with_two_processes_matches_one(tiny_cascade_dir, tiny_dataset, tmp_path):
    common = ["evaluate", "--model", str(tiny_cascade_dir), "--dataset", str(tiny_dataset), "--split", "train",
              "--batch-size", "8", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    one = tmp_path / "one.json"
    two = tmp_path / "two.json"
    subprocess.run(
        [sys.executable, "-m", "hf_tinysaver.commands", *common, "--cache-dir", str(tmp_path / "c1"), "--results-file",
         str(one)], env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    launched = subprocess.run(
        [*_accelerate_command(), *common, "--cache-dir", str(tmp_path / "c2"), "--results-file", str(two)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    single, double = json.loads(one.read_text()), json.loads(two.read_text())
    assert single["processes"] == 1 and double["processes"] == 2
    for key in ("accuracy", "base_accuracy", "exit_rate", "agreement", "relative_macs", "n", "simulated_exit_rate"):
        assert double[key] == single[key], key
    assert double["simulation_matches_forward"] is True


def test_record_command_caches(tiny_dataset, tmp_path):
    model_dir = tmp_path / "model"
    timm_classifier("test_efficientnet", seed=5).save_pretrained(model_dir)
    args = ["record", "--model", str(model_dir), "--dataset", str(tiny_dataset), "--split", "train[:16]",
            "--cache-dir", str(tmp_path / "cache"), "--results-file", str(tmp_path / "r.json"), "--no-progress"]  # fmt: skip
    assert run_cli(args) == 0
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["n"] == 16 and summary["cache_key"] and summary["num_labels"] == 10
    from test_provenance import assert_provenance

    assert_provenance(summary, "record", "--results-file")
    cached = tmp_path / "cache" / f"{summary['cache_key']}.npz"
    first_write = cached.stat().st_mtime_ns
    assert run_cli(args) == 0
    assert cached.stat().st_mtime_ns == first_write  # the second run read the cache


def test_calibrate_rejects_missing_objective_parameters(tmp_path, capsys):
    code = run_cli(
        ["calibrate", "--saver", "a", "--base", "b", "--dataset", "d", "--split", "s", "--objective", "exit-rate",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 2
    assert "exit-rate objective needs --exit-rate" in capsys.readouterr().err


@pytest.mark.slow
@requires_shared("models/cifar10-resnet", "datasets/cifar10-jpeg")
def test_calibrate_then_evaluate_real_cifar_cascade(tmp_path):
    """ResNet-20 -> ResNet-56: calibrated on one slice, the real cascade on another equals the simulation exactly."""
    out = tmp_path / "cascade"
    cache = ["--cache-dir", str(tmp_path / "cache"), "--assets", str(SHARED), "--no-progress"]
    assert run_cli(
        ["calibrate", "--saver", "cifar10-resnet20", "--base", "cifar10-resnet56", "--dataset", "cifar10",
         "--split", "test[:1000]", "--objective", "max-drop", "--max-drop", "0.5", "--out", str(out), *cache]
    ) == 0  # fmt: skip
    calibration = json.loads((out / "calibration.json").read_text())
    for key in (
        "threshold",
        "objective",
        "exit_rate",
        "accuracy",
        "base_accuracy",
        "saver_accuracy",
        "relative_macs",
        "n",
    ):
        assert key in calibration
    assert calibration["n"] == 1000 and calibration["objective"] == "max-drop"
    assert calibration["base_accuracy"] - calibration["accuracy"] <= 0.005 + 1e-12
    assert calibration["relative_macs"] < 0.6
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The record is the one CalibrationRecord type (the ESN's too), dated and versioned, and names no plot file.
    from hf_tinysaver import __version__
    from hf_tinysaver.calibration.record import CalibrationRecord

    record = CalibrationRecord.from_dict(calibration)
    assert record.to_dict() == calibration and "plot" not in calibration
    assert record.accuracy_drop == pytest.approx(100 * (record.base_accuracy - record.accuracy))
    assert record.hf_tinysaver_version == __version__ and record.date and not record.is_multi_exit
    curve = np.genfromtxt(out / "tradeoff.csv", delimiter=",", names=True)
    assert curve["exit_rate"].min() == 0 and curve["exit_rate"].max() == 1

    # Simulation equals reality: evaluating the saved cascade on the calibration split reproduces the prediction.
    same_split = tmp_path / "same.json"
    assert run_cli(
        ["evaluate", "--model", str(out), "--dataset", "cifar10", "--split", "test[:1000]", "--results-file",
         str(same_split), *cache]
    ) == 0  # fmt: skip
    measured = json.loads(same_split.read_text())
    assert measured["exit_rate"] == calibration["exit_rate"] and measured["accuracy"] == calibration["accuracy"]

    held_out = tmp_path / "held_out.json"
    assert run_cli(
        ["evaluate", "--model", str(out), "--dataset", "cifar10", "--split", "test[1000:1500]", "--results-file",
         str(held_out), *cache]
    ) == 0  # fmt: skip
    results = json.loads(held_out.read_text())
    assert results["n"] == 500 and results["simulation_matches_forward"] is True
    assert 0.5 < results["exit_rate"] < 1 and results["relative_macs"] < 1


def test_evaluate_plot_draws_the_held_out_tradeoff_and_says_what_happened(
    tiny_cascade_dir, tiny_dataset, tmp_path, capsys
):
    plot, results_file = tmp_path / "held-out.png", tmp_path / "results.json"
    code = run_cli(
        ["evaluate", "--model", str(tiny_cascade_dir), "--dataset", str(tiny_dataset), "--split", "train",
         "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--results-file", str(results_file),
         "--plot", str(plot), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    results = json.loads(results_file.read_text())
    assert f"drop {results['accuracy_drop_points']:.2f} points" in printed.replace("drop -0.00", "drop 0.00")
    assert f"plot: {plot}" in printed
    assert {"target_missed", "saver_alone", "max_drop"} <= set(results)
