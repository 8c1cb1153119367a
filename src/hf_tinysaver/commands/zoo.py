"""`tinysaver zoo list` and `tinysaver zoo export NAME OUT_DIR`: the zoo from the command line."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    """Registers the `zoo` command and its `list` and `export` subcommands."""
    parser = subparsers.add_parser(
        "zoo",
        help="list the pretrained zoo models or export one as a save_pretrained folder",
        description="Real pretrained classifiers converted to Hugging Face models (cached, deterministic).",
    )
    commands = parser.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)

    list_parser = commands.add_parser("list", help="list the zoo models")
    list_parser.add_argument(
        "--format", "-f", choices=("table", "json"), default="table", help="output format (default: table)"
    )
    list_parser.set_defaults(func=run_list)

    export_parser = commands.add_parser(
        "export",
        help="write a zoo model as a save_pretrained folder",
        description=(
            "Write weights (safetensors), config (label names, `macs`, `preprocessing`) and image processor of a zoo "
            "model to OUT_DIR."
        ),
    )
    export_parser.add_argument("name", metavar="NAME", help="zoo model name (see `tinysaver zoo list`)")
    export_parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if needed)")
    export_parser.add_argument(
        "--assets",
        "-a",
        metavar="DIR",
        default=None,
        help="folder holding models/ and datasets/ (default: $TINYSAVER_ASSETS, else ../shared)",
    )
    export_parser.set_defaults(func=run_export)


def run_list(args: argparse.Namespace) -> int:
    from ..zoo.registry import ZOO_MODELS

    if args.format == "json":
        rows = [
            {"name": entry.name, "description": entry.description, "dataset": entry.dataset}
            for entry in ZOO_MODELS.values()
        ]
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(name) for name in ZOO_MODELS)
    for entry in ZOO_MODELS.values():
        print(f"{entry.name:<{width}}  {entry.description}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..zoo.registry import export_zoo_model

    out_dir = export_zoo_model(args.name, args.out_dir, assets=args.assets)
    print(f"Exported {args.name} to {out_dir}")
    return 0


__all__ = ["add_parser", "run_export", "run_list"]
