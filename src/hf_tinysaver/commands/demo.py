"""`tinysaver demo`: the whole TinySaver workflow, offline, on real pretrained models and real images (see
[`hf_tinysaver.workflows.demo.run_demo`])."""

from __future__ import annotations

import argparse

from ..workflows.demo import DEMO_TASKS  # standard library only: building the parser stays light
from .arguments import MAX_DROP_TYPE, add_batch_size_argument, add_overwrite_argument


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="Search, calibrate, evaluate, save and serve a cascade on the offline zoo, end to end."
    )
    parser.add_argument("--task", choices=sorted(DEMO_TASKS), default="cifar10", help="cifar10 (default) or imagenet.")
    parser.add_argument("--max-drop", type=MAX_DROP_TYPE, default=0.5, help="Allowed top-1 drop in points.")
    add_batch_size_argument(parser)
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="Calibrate on the first N and evaluate on the last N images only (quick runs).",
    )
    parser.add_argument(
        "--out",
        "-o",
        default="tinysaver-demo",
        help="Folder for the cascade, plots and results. It is written beside and swapped in when the demo "
        "completes, so an interrupted run leaves the previous output intact. An existing folder is replaced only "
        "when it holds nothing but an earlier demo output, or with --overwrite.",
    )
    add_overwrite_argument(parser)
    parser.add_argument(
        "--assets",
        default=None,
        help="Folder with models/ and datasets/ (default: $TINYSAVER_ASSETS, then ../shared).",
    )
    parser.add_argument("--cache-dir", default=None, help="Records cache (default: $TINYSAVER_CACHE or ~/.cache).")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="Hide progress bars.")
    parser.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from ..workflows.demo import run_demo

    run_demo(
        task=args.task,
        max_drop=args.max_drop,
        batch_size=args.batch_size,
        limit=args.limit,
        out=args.out,
        overwrite=args.overwrite,
        assets=args.assets,
        cache_dir=args.cache_dir,
        progress=args.progress,
    )
    return 0


__all__ = ["add_parser", "run_demo_command"]
