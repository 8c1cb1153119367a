"""Every script in examples/ runs as written (real assets where they are the point, tiny models otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, SHARED, requires_shared

EXAMPLES = REPO_ROOT / "examples"


def run_example(
    args: list[str], cwd, env_extra: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    env = {**os.environ, "TINYSAVER_ASSETS": str(SHARED), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.update(env_extra or {})
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


@pytest.mark.slow
@requires_shared("models/cifar10-resnet", "datasets/cifar10-jpeg")
def test_quickstart(tmp_path):
    result = run_example(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--calibration-split", "test[:500]", "--out", "cascade"],
        cwd=tmp_path,
    )
    assert "calibrated: threshold" in result.stdout
    assert result.stdout.count("predicted") == 4
    assert (tmp_path / "cascade" / "model.safetensors").exists()


@pytest.mark.slow
@requires_shared("models/cifar10-resnet", "datasets/cifar10-jpeg")
def test_calibrate_cifar10(tmp_path):
    result = run_example(
        [sys.executable, str(EXAMPLES / "calibrate_cifar10.py"), "--limit", "400", "--confidence-level", "0.9"],
        cwd=tmp_path,
    )
    for row in ("exit rate", "cascade accuracy (%)", "drop (points)", "relative MACs", "oracle bound"):
        assert row in result.stdout


def test_evaluate_multiprocess(tiny_cascade_dir, tiny_dataset, tmp_path):
    results = tmp_path / "results.json"
    run_example(
        ["bash", str(EXAMPLES / "evaluate_multiprocess.sh"), str(tiny_cascade_dir), str(tiny_dataset), "train",
         str(results), "2"],
        cwd=tmp_path,
        env_extra={"TINYSAVER_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    evaluation = json.loads(results.read_text())
    assert evaluation["processes"] == 2 and evaluation["n"] == 40
    assert evaluation["simulation_matches_forward"] is True


def test_push_to_hub(tiny_cascade_dir, tmp_path):
    from hf_tinysaver.testing import DEFAULT_TOKEN, DEFAULT_USER, FakeHub

    repo_id = f"{DEFAULT_USER}/tiny-cascade"
    with FakeHub(tmp_path / "hub") as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(
            HF_ENDPOINT=hub.endpoint,
            HF_TOKEN=DEFAULT_TOKEN,
            HF_HOME=str(tmp_path / "hf_home"),
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
        )
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "push_to_hub.py"), "--model", str(tiny_cascade_dir), "--repo-id", repo_id],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        assert "pushed:" in result.stdout and "loaded TinySaverForImageClassification" in result.stdout
        assert hub.file_bytes(repo_id, "model.safetensors") == (tiny_cascade_dir / "model.safetensors").read_bytes()
        assert b"tinysaver" in hub.file_bytes(repo_id, "README.md")
