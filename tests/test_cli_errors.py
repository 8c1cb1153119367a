"""`tinysaver` reports user errors as one line `tinysaver: error: ...` with exit code 2 (a traceback with --debug)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from hf_tinysaver.zoo import ZOO

# The console script installed beside this interpreter (PYTHONPATH points it at this checkout's sources).
TINYSAVER = shutil.which("tinysaver", path=str(Path(sys.executable).parent)) or shutil.which("tinysaver")

# One typical user error per subcommand: (arguments, text the message must hold). `{tmp}` is a scratch folder.
CASES = {
    "record-typo": (["record", "-m", "cifar10-resnet2O", "-d", "cifar10", "--split", "test[:8]"], "cifar10-resnet20"),
    "calibrate-unknown-saver": (
        ["calibrate", "--saver", "nonexistent-model", "--base", "cifar10-resnet56", "-d", "cifar10"]
        + ["--split", "test[:8]", "-o", "{tmp}/out"],
        "neither a zoo name",
    ),
    "calibrate-missing-target": (
        ["calibrate", "-s", "cifar10-resnet20", "--base", "cifar10-resnet56", "-d", "cifar10", "--split", "test[:8]"]
        + ["--objective", "exit-rate", "-o", "{tmp}/out"],
        "--exit-rate",
    ),
    "evaluate-no-cascade": (
        ["evaluate", "-m", "no-such-cascade", "-d", "cifar10", "--split", "test"],
        "saved cascade",
    ),
    "evaluate-unknown-hub-id": (
        ["evaluate", "-m", "someone/no-such-cascade", "-d", "cifar10", "--split", "test"],
        "neither a saved cascade folder nor a Hub id",
    ),
    "search-unknown-base": (
        ["search", "--base", "efficientnet-lite9", "-c", "cifar10-resnet20", "-d", "cifar10", "--split", "test[:8]"]
        + ["--results-file", "{tmp}/search.json"],
        "efficientnet-lite",
    ),
    "esn-unknown-saver": (
        ["esn-train", "--saver", "tiny-typo", "--base", "cifar10-resnet56", "--dataset", "cifar10"],
        "zoo",
    ),
    "zoo-export-unknown": (["zoo", "export", "resnet20", "{tmp}/export"], "Unknown zoo model"),
    "push-missing-folder": (["push", "someone/cascade", "{tmp}/never-saved"], "never-saved"),
    "demo-missing-assets": (["demo", "--assets", "{tmp}/no-assets", "-o", "{tmp}/demo"], "--assets"),
}


def tinysaver(arguments: list[str], **environment: str) -> subprocess.Popen:
    """Starts the real `tinysaver` command (the console script's entry point) on this checkout's sources."""
    env = {key: value for key, value in os.environ.items() if key != "TINYSAVER_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    env.update(environment)
    return subprocess.Popen(
        [TINYSAVER, *arguments], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Every case's exit code and stderr; the processes run side by side (each pays the imports once)."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    started = {
        name: tinysaver([argument.replace("{tmp}", str(tmp)) for argument in arguments])
        for name, (arguments, _) in CASES.items()
    }
    started["debug-flag"] = tinysaver(["--debug", *CASES["record-typo"][0]])
    started["debug-environment"] = tinysaver(CASES["record-typo"][0], TINYSAVER_DEBUG="1")
    results = {}
    for name, process in started.items():
        _, stderr = process.communicate(timeout=600)
        results[name] = (process.returncode, stderr)
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_error_is_one_line_with_exit_code_2(runs, case):
    code, stderr = runs[case]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(errors) == 1 and errors[0].startswith("tinysaver: error: "), stderr
    assert stderr.rstrip().endswith(errors[0]), stderr
    assert CASES[case][1] in errors[0], errors[0]


def test_an_unknown_model_name_says_what_it_is_not_and_lists_the_zoo(runs):
    (message,) = [line for line in runs["record-typo"][1].splitlines() if line.startswith("tinysaver: error: ")]
    assert (
        "'cifar10-resnet2O' is neither a zoo name, nor a local model folder, nor a Hub id reachable offline" in message
    )
    assert "Did you mean 'cifar10-resnet20'?" in message
    assert all(name in message for name in ZOO)


@pytest.mark.parametrize("case", ["debug-flag", "debug-environment"])
def test_debug_shows_the_traceback(runs, case):
    code, stderr = runs[case]
    assert code == 1, stderr
    assert "Traceback (most recent call last)" in stderr and "neither a zoo name" in stderr
    assert "tinysaver: error:" not in stderr


def test_argument_errors_stay_argparse_errors():
    process = tinysaver(["calibrate", "--saver", "cifar10-resnet20"])
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 2
    assert stderr.startswith("usage: tinysaver calibrate") and "tinysaver calibrate: error:" in stderr
