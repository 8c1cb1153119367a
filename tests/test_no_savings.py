"""A cascade that saves nothing is never shipped silently: calibrate refuses it, evaluate says so."""

from __future__ import annotations

import json
import logging

import pytest

from conftest import SHARED, requires_shared
from hf_tinysaver import InfeasibleTargetError
from hf_tinysaver.commands import main as tinysaver
from hf_tinysaver.workflows.cascade import build_cascade, calibrate_cascade

PAIR = ["--saver", "cifar10-resnet20", "--base", "cifar10-resnet56", "--dataset", "cifar10"]
# 60 images are far too few for max-drop's guarantee at 95 %: only "nothing exits" (1 + saver share) passes it.
FEW = {"split": "test[:60]", "objective": "max-drop", "max_drop": 0.5, "confidence_level": 0.95}

pytestmark = [pytest.mark.slow, requires_shared("models/cifar10-resnet", "datasets/cifar10-jpeg")]


@pytest.fixture
def common(tmp_path) -> dict:
    return {"assets": SHARED, "cache_dir": tmp_path / "cache", "progress": False}


def test_calibrate_refuses_a_point_that_saves_nothing_and_says_what_would_help(common, caplog):
    cascade = build_cascade("cifar10-resnet20", "cifar10-resnet56", assets=SHARED)
    threshold = cascade.config.threshold
    with caplog.at_level(logging.WARNING, logger="hf_tinysaver.workflows.cascade"):
        with pytest.raises(InfeasibleTargetError) as error:
            calibrate_cascade(cascade, "cifar10", **FEW, **common)
    message = str(error.value)
    assert "\n" not in message
    assert "saves nothing" in message and "chose threshold 1 " in message and "exit rate 0.0000" in message
    for remedy in ("calibrate on more images (about", "--confidence-level", "--max-drop", "--allow-no-savings"):
        assert remedy in message
    assert cascade.config.threshold == threshold and not cascade.config.calibration  # left unchanged
    assert "only 60 samples: the threshold is unreliable" in caplog.text

    result, _ = calibrate_cascade(cascade, "cifar10", **FEW, **common, allow_no_savings=True)
    assert result.relative_macs >= 1 and result.exit_rate == 0
    assert cascade.config.threshold == result.threshold


def test_calibrate_names_the_target_that_leaves_too_few_exits(common):
    cascade = build_cascade("cifar10-resnet20", "cifar10-resnet56", assets=SHARED)
    with pytest.raises(InfeasibleTargetError, match=r"exit-rate target itself .* a higher exit_rate \(--exit-rate\)"):
        calibrate_cascade(cascade, "cifar10", "test[:60]", objective="exit-rate", exit_rate=0.05, **common)


def test_cli_calibrate_fails_then_allow_no_savings_saves_and_evaluate_warns(tmp_path, capsys):
    out, results_file = tmp_path / "cascade", tmp_path / "results.json"
    cache = ["--cache-dir", str(tmp_path / "cache"), "--assets", str(SHARED), "--no-progress"]
    calibrate = ["calibrate", *PAIR, "--split", "test[:60]", "--confidence-level", "0.95", "--out", str(out), *cache]
    assert tinysaver(calibrate) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert error.startswith("tinysaver: error: ") and "--allow-no-savings" in error
    assert not out.exists()

    assert tinysaver([*calibrate, "--allow-no-savings"]) == 0
    assert json.loads((out / "calibration.json").read_text())["relative_macs"] >= 1
    capsys.readouterr()

    evaluate = ["evaluate", "--model", str(out), "--dataset", "cifar10", "--split", "test[60:100]"]
    assert tinysaver([*evaluate, "--results-file", str(results_file), *cache]) == 0
    printed = capsys.readouterr().out
    results = json.loads(results_file.read_text())
    assert results["costs_more_than_base"] is True and results["relative_macs"] >= 1
    assert f"warning: this cascade costs {results['relative_macs']:.4f}x its base alone" in printed
