"""The README's commands and Python snippets run as written."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, SHARED, requires_shared

README = (REPO_ROOT / "README.md").read_text()


def readme_snippet(name: str) -> str:
    match = re.search(rf"<!-- readme-snippet: {name} -->\n```python\n(.*?)```", README, flags=re.DOTALL)
    assert match, f"README has no python snippet marked {name!r}"
    return match.group(1)


def run_readme_snippet(name: str, cwd) -> list[str]:
    """Runs a README snippet in a fresh, offline Python process on the real assets; returns its output lines."""
    env = {**os.environ, "TINYSAVER_ASSETS": str(SHARED), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", readme_snippet(name)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()


def test_ci_runs_exactly_the_readme_install_and_test_commands():
    ci_script = (REPO_ROOT / ".ci" / "run").read_text()
    bash_blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    commands = [line.strip() for block in bash_blocks for line in block.splitlines() if line.strip()]
    assert 'pip install -e ".[dev]"' in commands and "pytest" in commands
    assert 'python -m pip install -e ".[dev]"' in ci_script and "python -m pytest" in ci_script


@pytest.mark.slow
@requires_shared("models/cifar10-resnet", "datasets/cifar10-jpeg")
def test_python_quickstart_runs_as_written(tmp_path):
    lines = run_readme_snippet("quickstart", tmp_path)
    exited_text, predictions_text = re.fullmatch(r"(\[.*?\]) (\[.*?\])", lines[0]).groups()
    exited, predictions = ast.literal_eval(exited_text), ast.literal_eval(predictions_text)
    assert len(exited) == len(predictions) == 4
    assert (tmp_path / "cifar10-resnet20-to-56" / "model.safetensors").exists()
    assert "'label':" in lines[-1]


def test_results_section_is_generated_from_the_results_files():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import update_readme
    finally:
        sys.path.pop(0)
    assert update_readme.main(["--check"]) == 0, "run: python benchmarks/update_readme.py"
    assert "Zoo models" in update_readme.render() and "<!-- results:start -->" in README


@pytest.mark.slow
@requires_shared("models/cifar10-resnet", "datasets/cifar10-jpeg")
def test_serving_snippet_runs_as_written(tmp_path):
    lines = run_readme_snippet("serving", tmp_path)
    assert len(lines) == 4  # 256 images in batches of 64, one output per batch
    for line in lines:
        fraction, predictions = re.fullmatch(r"(\d\.\d\d) exited (\[.*\])", line).groups()
        assert 0.5 < float(fraction) <= 1.0 and len(ast.literal_eval(predictions)) == 8
