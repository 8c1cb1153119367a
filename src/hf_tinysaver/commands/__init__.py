"""The `tinysaver` command line: one subcommand per workflow step.

Each subcommand has its own module here exposing `add_parser(subparsers)`, which registers its arguments (shared
definitions live in `arguments.py`) and sets `func` to the callable that runs it. The library logic lives in
`hf_tinysaver.workflows`; command modules import it, and torch and transformers, only inside their run functions.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that each register one subcommand through `add_parser(subparsers)`, in the order `--help` lists them.
COMMAND_MODULES = [
    "hf_tinysaver.commands.zoo",
    "hf_tinysaver.commands.push",
    "hf_tinysaver.commands.record",
    "hf_tinysaver.commands.calibrate",
    "hf_tinysaver.commands.evaluate",
    "hf_tinysaver.commands.demo",
    "hf_tinysaver.commands.search",
    "hf_tinysaver.commands.esn_train",
    "hf_tinysaver.commands.plan",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinysaver",
        description="TinySaver cascades for Hugging Face image classifiers.",
    )
    parser.add_argument("--version", action=_VersionAction, help="Print the installed hf_tinysaver version and exit.")
    parser.add_argument(
        "--debug",
        action="store_true",
        default=_env_flag("TINYSAVER_DEBUG"),
        help="Show the full traceback of an error instead of one line (also: TINYSAVER_DEBUG=1).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def installed_version() -> str:
    """The installed distribution's version, or the source's `TINYSAVER_VERSION` where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hf_tinysaver")
    except PackageNotFoundError:
        from ..models.configuration_tinysaver import TINYSAVER_VERSION

        return TINYSAVER_VERSION


class _VersionAction(argparse.Action):
    """`--version`: like argparse's `version` action, but the version is looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {installed_version()}")  # on stdout, as argparse's own version action
        parser.exit()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the input or the environment is wrong", reported in one line without a traceback.

    Bad values (`ValueError`, including [`InfeasibleTargetError`]), missing or unwritable files and folders, a failed
    push, the Hub's own errors (no such repository, gated, offline, no token) and a Hub that cannot be reached (the
    HTTP client's transport errors). Any other exception is a bug and keeps its traceback.
    """
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    from ..hub.push import HubPushError, network_error_types

    return (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        HubPushError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        LocalTokenNotFoundError,
        *network_error_types(),
    )


def one_line(error: BaseException) -> str:
    """The error's message on one line (its lines joined), or its type's name when it has none."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return message or type(error).__name__


def disable_progress_bars() -> None:
    """`--no-progress`: silences the bars of transformers (weight loading) and huggingface_hub too."""
    from huggingface_hub.utils import disable_progress_bars as disable_hub_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_hub_progress_bars()
    transformers_logging.disable_progress_bar()


def use_passive_openmp_waits() -> None:
    """Sets `OMP_WAIT_POLICY=PASSIVE` for this process when it is unset and torch is not loaded yet.

    PyTorch's OpenMP threads spin while they wait for each other. On a machine whose cores other processes share,
    a spinning thread holds a core its partner needs: on 2 shared cores a CIFAR ResNet-56 batch of 64 measured 4 to 7
    s with the default policy and 0.4 to 0.7 s with passive waits (2 threads each; README, demo timings). Its cost on
    an idle machine has not been measured here; set `OMP_WAIT_POLICY=ACTIVE` to keep spinning. A policy the user set
    is kept.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    """Runs one `tinysaver` command and returns its exit code.

    A user error prints `tinysaver: error: <message>` on one line and returns 2; Ctrl-C prints
    `tinysaver: interrupted` and returns 130. With `--debug` (or `TINYSAVER_DEBUG=1`) errors propagate with their
    traceback. Argument errors are argparse's own (usage, then `tinysaver <command>: error: ...`, exit 2).
    """
    from ..provenance import running_command

    parser = build_parser()
    args = parser.parse_args(argv)
    use_passive_openmp_waits()
    if getattr(args, "progress", True) is False:
        disable_progress_bars()
    command = ["tinysaver", *(sys.argv[1:] if argv is None else argv)]
    if args.debug:
        with running_command(command):
            return int(args.func(args) or 0)
    try:
        with running_command(command):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tinysaver: interrupted", file=sys.stderr)
        return 130
    except user_error_types() as error:
        print(f"tinysaver: error: {one_line(error)}", file=sys.stderr)
        return 2
