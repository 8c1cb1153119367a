"""The `tinysaver` command line itself: a light parser (no torch or transformers to print help), `--version`, every
subcommand's help, one meaning per flag across subcommands, `push REPO_ID FOLDER` (the old order warns), and the
library habits the CLI relies on (lazy top-level names, hub progress bars, no global matplotlib backend)."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from hf_tinysaver.commands import build_parser, installed_version, main
from hf_tinysaver.commands.push import resolve_push_arguments

SOURCE_ROOT = REPO_ROOT / "src"


def run_python(code: str, **environment: str) -> dict:
    """Runs `code` in a fresh interpreter on this checkout's sources; it prints one JSON object, returned here."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")]))
    env.update(environment)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


HEAVY = ("torch", "transformers", "torchvision", "timm", "datasets", "matplotlib")


def test_building_the_parser_and_printing_help_import_neither_torch_nor_transformers():
    loaded = run_python(
        "import contextlib, io, json, sys\n"
        "import hf_tinysaver.commands as commands\n"
        "commands.build_parser()\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    commands.main(['--help'])\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    commands.main(['--version'])\n"
        "for command in ('record', 'calibrate', 'evaluate', 'plan', 'search', 'esn-train', 'push', 'zoo', 'demo'):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        commands.main([command, '--help'])\n"
        f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))\n"
    )
    assert loaded == []


def test_import_hf_tinysaver_is_light_and_its_names_load_on_use():
    result = run_python(
        "import json, sys\n"
        "import hf_tinysaver\n"
        "light = [name for name in ('torch', 'transformers') if name in sys.modules]\n"
        "listed = sorted(set(hf_tinysaver.__all__) - set(dir(hf_tinysaver)))\n"
        "from hf_tinysaver import TinySaverConfig\n"
        "from transformers import AutoConfig\n"
        "registered = type(AutoConfig.for_model('tinysaver')).__name__\n"
        "print(json.dumps({'light': light, 'not_in_dir': listed, 'registered': registered,\n"
        "                  'version': hf_tinysaver.__version__}))\n"
    )
    assert result["light"] == [] and result["not_in_dir"] == []
    assert result["registered"] == "TinySaverConfig"  # using a config class ran the Auto registrations
    import hf_tinysaver

    assert result["version"] == hf_tinysaver.__version__


def test_every_public_name_imports():
    import hf_tinysaver

    for name in hf_tinysaver.__all__:
        exec(f"from hf_tinysaver import {name}", {})
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        hf_tinysaver.not_a_name  # noqa: B018


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import PackageNotFoundError, version

    from hf_tinysaver.models.configuration_tinysaver import TINYSAVER_VERSION

    try:
        expected = version("hf_tinysaver")
    except PackageNotFoundError:
        expected = TINYSAVER_VERSION
    assert installed_version() == expected
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"tinysaver {expected}\n"


def subcommand_parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) for every subcommand, nested ones (`zoo list`) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield (*prefix, name), subparser
                yield from subcommand_parsers(subparser, (*prefix, name))


COMMANDS = [" ".join(words) for words, _ in subcommand_parsers(build_parser())]


def test_the_parser_has_every_subcommand():
    expected = {"record", "calibrate", "evaluate", "plan", "search", "esn-train", "push", "zoo", "demo"}
    assert expected <= set(COMMANDS) and {"zoo list", "zoo export"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    assert f"usage: tinysaver {command}" in capsys.readouterr().out


# The subcommands that run models over images, so take a forward batch size.
FORWARD_COMMANDS = {"record", "calibrate", "evaluate", "plan", "search", "esn-train", "demo"}


def test_flags_mean_the_same_in_every_subcommand():
    by_command = {" ".join(words): subparser for words, subparser in subcommand_parsers(build_parser())}
    for command, subparser in by_command.items():
        options = {option: action for action in subparser._actions for option in action.option_strings}
        assert "-B" not in options, f"{command}: -B sits beside -b; the base model is --base"
        if "-b" in options or "--batch-size" in options:
            assert options["-b"] is options["--batch-size"], f"{command}: -b must be --batch-size"
            assert options["-b"].dest == "batch_size" and options["-b"].type is int, command
        if command in FORWARD_COMMANDS:
            assert "-b" in options, f"{command} runs models and must take -b/--batch-size"
        if "--base" in options:
            assert options["--base"].option_strings == ["--base"], f"{command}: --base has no short flag"
        if "-m" in options:
            assert options["-m"].dest == "model", f"{command}: -m is --model wherever it exists"
        if "--out" in options:
            assert options["-o"] is options["--out"], f"{command}: -o is --out wherever it exists"
            assert "--overwrite" in options, f"{command}: an --out folder can be replaced with --overwrite"
    esn = {option for action in by_command["esn-train"]._actions for option in action.option_strings}
    assert "--train-batch-size" in esn


def test_esn_train_batch_sizes():
    arguments = ["esn-train", "--saver", "s", "--base", "b", "--dataset", "d"]
    parsed = build_parser().parse_args([*arguments, "-b", "32", "--train-batch-size", "8"])
    assert (parsed.batch_size, parsed.train_batch_size) == (32, 8)
    # The old name of the forward batch size still works.
    assert build_parser().parse_args([*arguments, "--feature-batch-size", "16"]).batch_size == 16
    # --no-progress as in every other command; the old --quiet still works.
    assert build_parser().parse_args(arguments).progress is True
    assert build_parser().parse_args([*arguments, "--no-progress"]).progress is False
    assert build_parser().parse_args([*arguments, "--quiet"]).progress is False


def test_push_takes_repo_id_then_folder(tmp_path):
    folder = tmp_path / "cascade"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_push_arguments("someone/cascade", str(folder)) == ("someone/cascade", str(folder))
        # Neither is a folder, but the first reads as a repo id: the new order (push then reports the missing folder).
        assert resolve_push_arguments("someone/cascade", "missing") == ("someone/cascade", "missing")
    with pytest.warns(FutureWarning, match=rf"tinysaver push someone/cascade {folder}"):
        assert resolve_push_arguments(str(folder), "someone/cascade") == ("someone/cascade", str(folder))
    with pytest.warns(FutureWarning, match="deprecated"):  # a missing folder path first, a repo id second
        assert resolve_push_arguments(str(tmp_path / "a" / "b"), "someone/cascade")[0] == "someone/cascade"


def test_push_has_no_short_commit_message_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["push", "someone/cascade", "folder", "-m", "message"])
    assert exit_info.value.code == 2
    parsed = build_parser().parse_args(["push", "someone/cascade", "folder", "--commit-message", "message"])
    assert (parsed.repo_id, parsed.folder, parsed.commit_message) == ("someone/cascade", "folder", "message")


@pytest.fixture(scope="module")
def saved_cascade(tmp_path_factory):
    from test_hub import make_cascade, write_plot

    folder = tmp_path_factory.mktemp("saved") / "cascade"
    make_cascade().save_pretrained(folder)
    write_plot(folder / "tradeoff.png")
    return folder


def test_cli_push_in_the_new_and_the_old_argument_order(fake_hub, hub_env, saved_cascade, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert main(["push", "tester/cli-new-order", str(saved_cascade), "--commit-message", "New order"]) == 0
    assert fake_hub.commits("tester/cli-new-order")[0].title == "New order"
    assert capsys.readouterr().out.strip().startswith(f"{fake_hub.endpoint}/tester/cli-new-order/commit/")

    with pytest.warns(FutureWarning, match="tinysaver push tester/cli-old-order"):
        assert main(["push", str(saved_cascade), "tester/cli-old-order"]) == 0
    assert fake_hub.commits("tester/cli-old-order"), "the old order still pushes"
    names = {path for _, path in fake_hub.commits("tester/cli-old-order")[0].operations}
    assert {"config.json", "README.md", "tradeoff.png"} <= names


def source_files():
    return sorted((SOURCE_ROOT / "hf_tinysaver").rglob("*.py"))


def test_progress_bars_come_from_huggingface_hub_and_nothing_uses_pyplot():
    """Raw tqdm ignores HF_HUB_DISABLE_PROGRESS_BARS; pyplot and `matplotlib.use` change the whole process."""
    found = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for module in modules:
                if module.split(".")[0] == "tqdm" or module == "matplotlib.pyplot":
                    found.append(f"{path.relative_to(SOURCE_ROOT)} line {node.lineno}: {module}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "use":
                if isinstance(node.func.value, ast.Name) and node.func.value.id == "matplotlib":
                    found.append(f"{path.relative_to(SOURCE_ROOT)} line {node.lineno}: matplotlib.use")
    assert found == []


def test_plot_tradeoff_leaves_the_matplotlib_backend_alone(tmp_path):
    result = run_python(
        "import json, sys\n"
        "from types import SimpleNamespace\n"
        "import numpy as np\n"
        "from hf_tinysaver.plotting import plot_tradeoff\n"
        "curve = SimpleNamespace(relative_macs=np.linspace(0.1, 1.1, 5), accuracy=np.linspace(0.5, 0.9, 5))\n"
        f"path = plot_tradeoff({str(tmp_path / 'plot.png')!r}, {{'saver': curve}}, base_accuracy=0.9)\n"
        "print(json.dumps({'pyplot': 'matplotlib.pyplot' in sys.modules, 'png': open(path, 'rb').read(4).hex()}))\n"
    )
    assert result == {"pyplot": False, "png": "89504e47"}
    assert [path.name for path in Path(tmp_path).iterdir()] == ["plot.png"]


def test_the_cli_asks_openmp_for_passive_waits_unless_the_user_chose():
    code = (
        "import json, os\n"
        "from hf_tinysaver.commands import use_passive_openmp_waits\n"
        "use_passive_openmp_waits()\n"
        "print(json.dumps(os.environ.get('OMP_WAIT_POLICY')))\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(environment, PYTHONPATH=os.pathsep.join([str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")])),
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert json.loads(result.stdout.strip().splitlines()[-1]) == "PASSIVE", result.stderr
    assert run_python(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
