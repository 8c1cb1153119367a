"""The `tinysaver` command line: one subcommand per workflow step.

Each subcommand lives beside the code it drives and exposes `add_parser(subparsers)`, which registers its
arguments and sets `func` to the callable that runs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that each register one or more subcommands through `add_parser(subparsers)`.
COMMAND_MODULES = [
    "hf_tinysaver.zoo.cli",
    "hf_tinysaver.hub_cli",
    "hf_tinysaver.workflow_cli",
    "hf_tinysaver.demo",
    "hf_tinysaver.search_cli",
    "hf_tinysaver.esn_cli",
    "hf_tinysaver.plan_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinysaver",
        description="TinySaver cascades for Hugging Face image classifiers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as error:
        print(f"tinysaver {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
