"""`tinysaver search`: rank candidate savers for a base model and save the winning calibrated cascade."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .arguments import (
    CONFIDENCE_LEVEL_TYPE,
    MAX_DROP_TYPE,
    MODEL_HELP,
    add_confidence_argument,
    add_data_arguments,
    add_overwrite_argument,
    data_options,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "search",
        help="Rank candidate savers for a base model by the cost of their calibrated cascades.",
        description=(
            "Records the base and every candidate on a labelled split, rejects candidates with another label space "
            "or with MACs not below the base's, and ranks the rest by the cascade's relative MACs at the primary "
            "allowed drop (--max-drop), with the paper's delta C beside."
        ),
    )
    parser.add_argument("--base", required=True, help=MODEL_HELP)
    parser.add_argument(
        "--candidates", "-c", nargs="+", required=True, help="Candidate savers: zoo names, folders or Hub ids."
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--max-drop",
        type=MAX_DROP_TYPE,
        default=0.5,
        help="Primary allowed top-1 drop in points: its relative MACs ranks and the winner is calibrated to it.",
    )
    parser.add_argument(
        "--max-drops",
        type=MAX_DROP_TYPE,
        nargs="+",
        default=[0.0, 0.5, 1.0],
        help="Allowed drops (points) at which every candidate is scored.",
    )
    parser.add_argument(
        "--confidence-level",
        type=CONFIDENCE_LEVEL_TYPE,
        default=None,
        help="Score with max-drop's certificate at this level (the default of calibrate --confidence-level).",
    )
    add_confidence_argument(parser, help="Saver confidence metric.")
    parser.add_argument(
        "--prescreen",
        action="store_true",
        help="Skip, unrecorded, candidates that provably cannot rank first (bound from MACs and tabulated accuracy).",
    )
    parser.add_argument(
        "--candidate-table",
        default=None,
        help="CSV/JSON with name, macs and/or accuracy (fraction) per model: MACs replace counted ones, accuracies "
        "(at least the split's) tighten the pre-screen.",
    )
    parser.add_argument(
        "--results-file", required=True, help="Ranked table as JSON; a CSV with the same basename goes beside it."
    )
    parser.add_argument("--plot", default=None, help="Trade-off plot PNG (default: the results file with .png).")
    parser.add_argument(
        "--out",
        "-o",
        default=None,
        help="Save the winner's cascade, calibrated at --max-drop, to this folder (checked before the search; an "
        "existing folder is replaced only when it holds nothing but an earlier cascade, or with --overwrite).",
    )
    add_overwrite_argument(parser)
    parser.set_defaults(func=run_search)


def run_search(args: argparse.Namespace) -> int:
    from ..records import distributed_state
    from ..storage import check_output_folder
    from ..workflows.search import save_winning_cascade, search_savers

    if args.out is not None:
        check_output_folder(args.out, overwrite=args.overwrite, kind="cascade", option="--out")
    result = search_savers(
        args.base,
        args.candidates,
        args.dataset,
        args.split,
        max_drops=args.max_drops,
        primary_max_drop=args.max_drop,
        confidence=args.confidence,
        confidence_level=args.confidence_level,
        prescreen=args.prescreen,
        candidate_table=args.candidate_table,
        **data_options(args),
    )
    is_main = distributed_state().is_main_process
    if is_main:
        json_path, csv_path = result.write(args.results_file)
        written = [str(json_path), str(csv_path)]
        if result.ranked:
            plot_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")
            written.append(str(result.plot(plot_path)))
        print(result.table())
        print(f"Wrote {', '.join(written)}")
    if args.out is None:
        return 0
    if result.winner is None:
        if is_main:
            print(f"tinysaver search: no cascade saved to {args.out}: no candidate saves compute.", file=sys.stderr)
        return 1
    cascade, calibration = save_winning_cascade(
        result,
        args.out,
        batch_size=args.batch_size,
        assets=args.assets,
        cache_dir=args.cache_dir,
        progress=args.progress,
        overwrite=args.overwrite,
    )
    if is_main:
        print(f"Calibrated {result.winner.name} -> {result.base} (max-drop {args.max_drop}): {calibration.describe()}")
        print(f"Saved the winning cascade to {args.out} (calibration.json, tradeoff.csv, tradeoff.png)")
    return 0


__all__ = ["add_parser", "run_search"]
