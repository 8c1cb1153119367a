"""Saving never destroys or half-writes a folder, and `push` uploads only the folder's own files.

The interrupt tests run the real CLI (`hf_tinysaver.commands.main`) in child processes forked from a server process that
imported the libraries once, so that a child starts in milliseconds instead of the ~20 s an import costs here, and
kill those children with real signals at random moments, the save phase included.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageClassification

from conftest import requires_shared
from hf_tinysaver.commands import main
from hf_tinysaver.hub.push import push_cascade
from hf_tinysaver.storage import (
    OutputFolderError,
    atomic_folder,
    check_output_folder,
    current_umask,
    write_json_atomic,
)

SPLIT = "test[:256]"
OLD_ARGS = ["-s", "cifar10-resnet20", "--objective", "max-drop", "--max-drop", "0.5"]
NEW_ARGS = ["-s", "cifar10-resnet32", "--objective", "exit-rate", "--exit-rate", "0.9"]
CIFAR = requires_shared("models/cifar10-resnet", "datasets/cifar10-jpeg")


def calibrate_argv(out: Path, cache: Path, which: list[str], *extra: str) -> list[str]:
    data = [
        "--base",
        "cifar10-resnet56",
        "-d",
        "cifar10",
        "--split",
        SPLIT,
        "--cache-dir",
        str(cache),
        "--no-progress",
    ]
    return ["calibrate", *which, *data, "--out", str(out), *extra]


def siblings(target: Path) -> list[str]:
    """Hidden temporary folders beside `target` (`.<name>.tmp-*`, `.<name>.old-*`, `.<name>.probe-*`)."""
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def temporaries(target: Path, pid: int | str = "") -> list[str]:
    """The temporary folders the save writes into (`.<name>.tmp-<pid>-*`): they exist during the save phase only."""
    return [name for name in siblings(target) if name.startswith(f".{target.name}.tmp-{pid}")]


# ------------------------------------------------------------------------------------------ refusing bad --out


def test_check_refuses_foreign_files_and_names_overwrite(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match=r"notes\.txt.*--overwrite"):
        check_output_folder(folder, option="--out")
    assert check_output_folder(folder, overwrite=True) == folder
    # A config.json of another model is not the library's own either, even though the name is.
    (folder / "notes.txt").unlink()
    write_json_atomic(folder / "config.json", {"model_type": "bert"})
    with pytest.raises(OutputFolderError, match=r"config\.json \(model_type 'bert'\)"):
        check_output_folder(folder)
    write_json_atomic(folder / "config.json", {"model_type": "tinysaver"})
    assert check_output_folder(folder) == folder
    # An ESN folder is not a plain cascade folder and the other way round.
    with pytest.raises(OutputFolderError, match="tinysaver"):
        check_output_folder(folder, kind="esn")


def test_atomic_folder_replaces_the_whole_folder_and_keeps_the_usual_permissions(tmp_path):
    target = tmp_path / "cascade"
    target.mkdir()
    for stale in ("pytorch_model.bin", "model.safetensors.index.json", "model-00001-of-00002.safetensors"):
        (target / stale).write_bytes(b"old")
    write_json_atomic(target / "config.json", {"model_type": "tinysaver", "threshold": 0.1})
    with pytest.raises(OutputFolderError, match=r"pytorch_model\.bin.*--overwrite"):
        with atomic_folder(target, option="--out"):
            raise AssertionError("must not be reached")
    with atomic_folder(target, overwrite=True) as folder:
        assert folder.parent == target.parent and folder.name.startswith(".cascade.tmp-")
        write_json_atomic(folder / "config.json", {"model_type": "tinysaver", "threshold": 0.9})
        fd = os.open(folder / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)  # as transformers writes it
        os.close(fd)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    assert json.loads((target / "config.json").read_text())["threshold"] == 0.9
    mask = current_umask()
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (target / "config.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask
    assert siblings(target) == []


def test_failed_block_leaves_the_old_folder_and_no_temporary(tmp_path):
    target = tmp_path / "cascade"
    with atomic_folder(target) as folder:
        write_json_atomic(folder / "config.json", {"model_type": "tinysaver", "threshold": 0.5})
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_folder(target) as folder:
                write_json_atomic(folder / "config.json", {"model_type": "tinysaver", "threshold": 0.7})
                raise error
        assert json.loads((target / "config.json").read_text())["threshold"] == 0.5
        assert siblings(target) == []


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_leftovers_of_a_killed_swap_are_repaired(tmp_path):
    target = tmp_path / "cascade"
    # A SIGKILLed run left its temporary folder; a two-rename swap was cut between its renames (the old folder is
    # complete under its .old- name and the target name is absent).
    stale = tmp_path / f".cascade.tmp-{dead_pid()}-0123"
    stale.mkdir()
    (stale / "config.json").write_text("")
    old = tmp_path / f".cascade.old-{dead_pid()}-4567"
    old.mkdir()
    write_json_atomic(old / "config.json", {"model_type": "tinysaver", "threshold": 0.3})
    check_output_folder(target)
    assert json.loads((target / "config.json").read_text())["threshold"] == 0.3 and siblings(target) == []
    # A temporary folder of a live process (this one) is left alone.
    mine = tmp_path / f".cascade.tmp-{os.getpid()}-89ab"
    mine.mkdir()
    with atomic_folder(target) as folder:
        write_json_atomic(folder / "config.json", {"model_type": "tinysaver", "threshold": 0.4})
    assert siblings(target) == [mine.name]


def assert_fails_before_recording(argv: list[str], cache: Path, capsys, message: str) -> None:
    started = time.perf_counter()
    assert main(argv) == 2
    elapsed = time.perf_counter() - started
    error = capsys.readouterr().err
    assert message in error, error
    assert elapsed < 10, f"the bad --out was reported after {elapsed:.1f} s"
    assert not cache.exists(), "records were written before the bad --out was reported"


@pytest.mark.parametrize("where", ["file", "under-file", "proc", "foreign", "foreign-config"])
def test_calibrate_reports_a_bad_out_before_recording(where, tmp_path, capsys):
    a_file = tmp_path / "somefile"
    a_file.write_text("not a folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    if where == "foreign":
        (foreign / "data.csv").write_text("1,2\n")
    else:
        (foreign / "config.json").write_text('{"model_type": "vit"}')
    out, message = {
        "file": (a_file, "is an existing file"),
        "under-file": (a_file / "sub" / "cascade", "is a file, not a folder"),
        "proc": (Path("/proc/tinysaver-out/cascade"), "cannot be written"),
        "foreign": (foreign, "--overwrite"),
        "foreign-config": (foreign, "--overwrite"),
    }[where]
    cache = tmp_path / "cache"
    assert_fails_before_recording(calibrate_argv(out, cache, OLD_ARGS), cache, capsys, message)
    assert a_file.read_text() == "not a folder" and sorted(os.listdir(foreign)) in (["config.json"], ["data.csv"])


def test_esn_search_and_demo_report_a_bad_out_before_work(tmp_path, capsys, shared_dir):
    a_file = tmp_path / "somefile"
    a_file.write_text("not a folder")
    cache = tmp_path / "cache"
    esn = ["esn-train", "--saver", "cifar10-resnet20", "--base", "cifar10-resnet56", "--dataset", "cifar10"]
    assert_fails_before_recording([*esn, "--cache-dir", str(cache), "--out", str(a_file)], cache, capsys, "--out")
    search = ["search", "--base", "cifar10-resnet56", "--candidates", "cifar10-resnet20", "-d", "cifar10"]
    search += ["--split", SPLIT, "--results-file", str(cache / "search.json"), "--cache-dir", str(cache)]
    assert_fails_before_recording([*search, "--out", str(a_file / "x")], cache, capsys, "is a file, not a folder")
    demo = ["demo", "--limit", "10", "--cache-dir", str(cache), "--assets", str(shared_dir)]
    assert_fails_before_recording([*demo, "--out", str(a_file)], cache, capsys, "is an existing file")


# ------------------------------------------------------------------------------- calibrate into existing folders


@pytest.fixture(scope="module")
def records_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("records")


@CIFAR
@pytest.mark.slow
def test_calibrate_replaces_its_own_output_and_overwrite_removes_stale_files(records_cache, tmp_path, capsys):
    out = tmp_path / "cascade"
    assert main(calibrate_argv(out, records_cache, OLD_ARGS)) == 0
    first = json.loads((out / "config.json").read_text())
    # Re-running into its own output needs no --overwrite.
    assert main(calibrate_argv(out, records_cache, NEW_ARGS)) == 0
    assert json.loads((out / "calibration.json").read_text())["objective"] == "exit-rate"
    assert json.loads((out / "config.json").read_text())["threshold"] != first["threshold"]

    # Files of another writer (an old PyTorch checkpoint) are refused, then removed as a whole with --overwrite;
    # stale shards and their index (names the library writes) go as well, instead of confusing from_pretrained.
    (out / "pytorch_model.bin").write_bytes(b"old weights")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    capsys.readouterr()
    assert main(calibrate_argv(out, records_cache, OLD_ARGS)) == 2
    error = capsys.readouterr().err
    assert "pytorch_model.bin" in error and "--overwrite" in error
    assert main(calibrate_argv(out, records_cache, OLD_ARGS, "--overwrite")) == 0
    names = set(os.listdir(out))
    assert {"pytorch_model.bin", "model.safetensors.index.json", "model-00001-of-00002.safetensors"}.isdisjoint(names)
    assert {"config.json", "model.safetensors", "calibration.json", "tradeoff.csv", "tradeoff.png"} <= names
    assert siblings(out) == []
    mask = current_umask()
    assert {name: (out / name).stat().st_mode & 0o777 for name in names} == {name: 0o666 & ~mask for name in names}
    cascade = AutoModelForImageClassification.from_pretrained(out)
    assert cascade.config.threshold == json.loads((out / "calibration.json").read_text())["threshold"]


# ------------------------------------------------------------------------------------ interrupts at any moment

FORK_SERVER = r"""
import json, os, sys, traceback
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import datasets, safetensors.torch, torch, transformers
import hf_tinysaver, hf_tinysaver.workflows.cascade, hf_tinysaver.plotting, hf_tinysaver.zoo, hf_tinysaver.storage
from hf_tinysaver.commands import main

print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = main(request["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


class ForkServer:
    """Runs `hf_tinysaver.commands.main(argv)` in children forked from a process that imported everything once."""

    def __init__(self, log: Path):
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline().strip() == "ready"

    def start(self, argv: list[str]) -> int:
        self.process.stdin.write(json.dumps({"argv": argv, "log": str(self.log)}) + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def wait(self) -> int:
        """The child's wait status."""
        return int(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("logs") / "children.log")
    yield server
    server.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def without_run_provenance(record: dict) -> dict:
    """A config or calibration record without the `provenance` of the run that wrote it (its command names that run's
    --out folder, so two runs of the same calibration into different folders differ there and nowhere else)."""
    record = json.loads(json.dumps(record))
    record.pop("provenance", None)
    if isinstance(record.get("calibration"), dict):
        record["calibration"].pop("provenance", None)
    return record


def folder_state(folder: Path) -> dict:
    """What `verify` compares: file names, config, calibration record (without the run's provenance) and the
    weights' digest."""
    return {
        "names": sorted(os.listdir(folder)),
        "config": without_run_provenance(json.loads((folder / "config.json").read_text())),
        "calibration": without_run_provenance(json.loads((folder / "calibration.json").read_text())),
        "weights": {
            name: hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
            for name, tensor in AutoModelForImageClassification.from_pretrained(folder).state_dict().items()
        },
    }


def verify(folder: Path, references: dict[str, dict]) -> str:
    """Asserts that `folder` is, as a whole, one of the reference cascades; returns which."""
    assert folder.is_dir(), f"{folder} is missing"
    config = json.loads((folder / "config.json").read_text())  # never a 0-byte or half-written config
    calibration = json.loads((folder / "calibration.json").read_text())
    assert calibration["threshold"] == config["threshold"] == config["calibration"]["threshold"]
    # Both files come from one run: the same provenance, whose command wrote this very folder or its reference.
    assert calibration["provenance"] == config["calibration"]["provenance"], f"{folder} mixes files of two runs"
    which = {"max-drop": "old", "exit-rate": "new"}[calibration["objective"]]
    model = AutoModelForImageClassification.from_pretrained(folder)
    assert model.config.threshold == calibration["threshold"]
    weights = {
        name: hashlib.sha256(tensor.numpy().tobytes()).hexdigest() for name, tensor in model.state_dict().items()
    }
    state = {
        "names": sorted(os.listdir(folder)),
        "config": without_run_provenance(config),
        "calibration": without_run_provenance(calibration),
        "weights": weights,
    }
    assert state == references[which], f"{folder} mixes files of the old and the new cascade"
    return which


@pytest.fixture(scope="module")
def references(fork_server, records_cache, tmp_path_factory):
    """The old and the new cascade, each saved once completely, and the timing of a full run of the new one."""
    root = tmp_path_factory.mktemp("references")
    fork_server.start(calibrate_argv(root / "old", records_cache, OLD_ARGS))
    assert os.WEXITSTATUS(fork_server.wait()) == 0
    # Once into a scratch folder so that the new saver is converted and recorded (cached) before the timed run.
    fork_server.start(calibrate_argv(root / "scratch", records_cache, NEW_ARGS))
    assert os.WEXITSTATUS(fork_server.wait()) == 0
    # Timed run into a copy of the old one: when the temporary folder appears (the save phase starts) and ends.
    target = root / "new"
    shutil.copytree(root / "old", target)
    started = time.perf_counter()
    pid = fork_server.start(calibrate_argv(target, records_cache, NEW_ARGS, "--overwrite"))
    save_started = None
    while alive(pid):
        if save_started is None and temporaries(target):
            save_started = time.perf_counter() - started
        time.sleep(0.002)
    duration = time.perf_counter() - started
    assert os.WEXITSTATUS(fork_server.wait()) == 0 and save_started is not None
    states = {"old": folder_state(root / "old"), "new": folder_state(target)}
    assert states["old"]["weights"] != states["new"]["weights"]
    assert states["old"]["config"]["threshold"] != states["new"]["config"]["threshold"]
    return {"root": root, "states": states, "duration": duration, "save_started": save_started}


@CIFAR
@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_the_old_or_the_new_cascade(fork_server, references, records_cache):
    root, states = references["root"], references["states"]
    duration, save_started = references["duration"], references["save_started"]
    target = root / "target"
    rng = random.Random(13)
    # Half the kills anywhere in the run, half in its save phase (from the temporary folder's creation to the end).
    delays = [rng.uniform(0, 1.1 * duration) for _ in range(12)]
    delays += [rng.uniform(0.9 * save_started, duration) for _ in range(12)]
    outcomes = []
    for delay in delays:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(root / "old", target)
        pid = fork_server.start(calibrate_argv(target, records_cache, NEW_ARGS, "--overwrite"))
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        status = fork_server.wait()
        killed_mid_save = bool(temporaries(target, f"{pid}-"))
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed or os.WEXITSTATUS(status) == 0
        outcomes.append((round(delay, 3), killed, killed_mid_save, verify(target, states)))
    summary = f"run {duration:.2f} s, save phase from {save_started:.2f} s; (delay, killed, mid-save, result):\n"
    summary += "\n".join(map(str, outcomes))
    print(summary)
    assert sum(killed for _, killed, _, _ in outcomes) >= 8, summary
    assert sum(mid_save for _, _, mid_save, _ in outcomes) >= 3, f"too few kills hit the save phase:\n{summary}"

    # The stale temporary folders of the killed runs do not break the next save, which removes them.
    pid = fork_server.start(calibrate_argv(target, records_cache, NEW_ARGS, "--overwrite"))
    assert os.WEXITSTATUS(fork_server.wait()) == 0
    assert verify(target, states) == "new" and siblings(target) == []


@CIFAR
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_in_the_save_phase_leave_no_temporary_folder(
    signum, fork_server, references, records_cache
):
    root, states = references["root"], references["states"]
    target = root / f"target-{signum.name}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(root / "old", target)
    pid = fork_server.start(calibrate_argv(target, records_cache, NEW_ARGS, "--overwrite"))
    while alive(pid) and not temporaries(target):
        time.sleep(0.001)
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
    status = fork_server.wait()
    assert not os.WIFSIGNALED(status), "the signal ended the process before it could clean up"
    # Interrupted: the old cascade; the signal came after the swap: the new one. Never a temporary folder left.
    assert verify(target, states) == ("new" if os.WEXITSTATUS(status) == 0 else "old")
    assert siblings(target) == []


@CIFAR
@pytest.mark.slow
def test_sigkill_of_the_console_script_in_the_save_phase(references, records_cache):
    root, states = references["root"], references["states"]
    target = root / "target-console"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(root / "old", target)
    process = subprocess.Popen(
        ["tinysaver", *calibrate_argv(target, records_cache, NEW_ARGS, "--overwrite")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while process.poll() is None and not temporaries(target):
        time.sleep(0.001)
    process.kill()
    process.wait()
    assert verify(target, states) in ("old", "new")


# ------------------------------------------------------------------------------ push uploads only its own files


@pytest.fixture(scope="module")
def saved_cascade(tmp_path_factory):
    from test_hub import make_cascade, write_plot

    folder = tmp_path_factory.mktemp("saved") / "cascade"
    make_cascade().save_pretrained(folder)
    write_plot(folder / "tradeoff.png")
    return folder


def with_plot(folder: Path, destination: Path, plot: str) -> Path:
    shutil.copytree(folder, destination, symlinks=True)
    config = json.loads((destination / "config.json").read_text())
    config["calibration"]["plot"] = plot
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def secret_file(tmp_path: Path) -> tuple[Path, str]:
    secret = tmp_path / "secret.png"
    content = b"\x89PNG\r\n\x1a\n" + os.urandom(64) + b"\0private"
    secret.write_bytes(content)
    return secret, hashlib.sha256(content).hexdigest()


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink-plot", "symlink-file"])
def test_push_refuses_paths_that_leave_the_folder(kind, fake_hub, hub_env, saved_cascade, tmp_path):
    secret, secret_sha = secret_file(tmp_path)
    folder = tmp_path / "nested" / "cascade"
    folder.parent.mkdir()
    plot = {"absolute": str(secret), "dotdot": "../../secret.png", "symlink-plot": "link.png"}.get(
        kind, "tradeoff.png"
    )
    with_plot(saved_cascade, folder, plot)
    if kind == "symlink-plot":
        (folder / "link.png").symlink_to(secret)
    if kind == "symlink-file":
        (folder / "notes.png").symlink_to(secret)
    repo_id = f"tester/leak-{kind}"
    requests_before = len(fake_hub.requests)
    with pytest.raises(ValueError, match="outside"):
        push_cascade(folder, repo_id)
    assert len(fake_hub.requests) == requests_before, "nothing may be sent"
    with pytest.raises(KeyError):
        fake_hub.repo(repo_id)
    assert secret_sha not in fake_hub.lfs_uploads


def test_cli_push_refuses_an_outside_plot(fake_hub, hub_env, saved_cascade, tmp_path, capsys):
    secret, secret_sha = secret_file(tmp_path)
    folder = with_plot(saved_cascade, tmp_path / "cascade", str(secret))
    assert main(["push", "tester/leak-cli", str(folder)]) == 2
    error = capsys.readouterr().err
    assert "outside the folder" in error and str(secret) in error
    assert secret_sha not in fake_hub.lfs_uploads


def test_push_uploads_exactly_the_folders_own_files(fake_hub, hub_env, saved_cascade, tmp_path):
    secret, secret_sha = secret_file(tmp_path)
    folder = with_plot(saved_cascade, tmp_path / "cascade", "tradeoff.png")
    # Leftovers that are not the cascade's: a temporary folder of an interrupted save, a hidden cache.
    for hidden in (".cascade.tmp-1-ab", ".cache"):
        (folder / hidden).mkdir()
        shutil.copyfile(secret, folder / hidden / "secret.png")
    (folder / "sub").mkdir()
    shutil.copyfile(secret, folder / "sub" / ".hidden.png")
    (folder / "sub" / "extra.txt").write_text("mine")
    (folder / "sub" / "inside-link.txt").symlink_to(folder / "sub" / "extra.txt")
    commit = push_cascade(folder, "tester/own-files")
    files = set(fake_hub.commits("tester/own-files")[0].files)
    own = {
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    }
    assert files == own | {"README.md", ".gitattributes"}, commit
    assert fake_hub.file_bytes("tester/own-files", "sub/inside-link.txt") == b"mine"
    assert secret_sha not in fake_hub.lfs_uploads
    card = fake_hub.file_bytes("tester/own-files", "README.md").decode()
    assert "(tradeoff.png)" in card


def test_explicit_plot_is_uploaded_under_its_name(fake_hub, hub_env, saved_cascade, tmp_path):
    plot = shutil.copyfile(saved_cascade / "tradeoff.png", tmp_path / "chosen.png")
    push_cascade(saved_cascade, "tester/explicit-plot", plot=plot)
    files = fake_hub.commits("tester/explicit-plot")[0].files
    assert fake_hub.file_bytes("tester/explicit-plot", "chosen.png") == Path(plot).read_bytes()
    assert "tradeoff.png" in files


def test_save_calibrated_cascade_refuses_foreign_files_without_overwrite(tmp_path):
    """The Python API applies the same rule as the CLI (checked before anything is written)."""
    import numpy as np

    from hf_tinysaver.calibration.simulation import CascadeSimulation
    from test_hub import make_cascade

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 64)
    simulation = CascadeSimulation(
        confidence=rng.random(64),
        saver_predictions=np.where(rng.random(64) < 0.7, labels, (labels + 1) % 10),
        base_predictions=np.where(rng.random(64) < 0.8, labels, (labels + 2) % 10),
        labels=labels,
        relative_saver_macs=0.3,
    )
    result = simulation.calibrate("exit-rate", exit_rate=0.5)
    cascade = make_cascade(threshold=float(result.threshold))
    from hf_tinysaver.workflows.cascade import save_calibrated_cascade

    out = tmp_path / "cascade"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match=r"keep\.txt.*overwrite=True"):
        save_calibrated_cascade(cascade, result, simulation, out)
    assert os.listdir(out) == ["keep.txt"] and siblings(out) == []
    save_calibrated_cascade(cascade, result, simulation, out, overwrite=True)
    assert "keep.txt" not in os.listdir(out)
    assert json.loads((out / "calibration.json").read_text()) == cascade.config.calibration
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    assert reloaded.config.threshold == cascade.config.threshold
    for name, tensor in cascade.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
