"""`tinysaver evaluate`: run a saved cascade over a split and measure accuracy, exit rate, MACs and speed."""

from __future__ import annotations

import argparse
import os

from .arguments import add_data_arguments, data_options, threshold_type


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="Run a saved cascade over a split and measure accuracy, exit rate, MACs and speed."
    )
    parser.add_argument("--model", "-m", required=True, help="A saved cascade folder or Hub id.")
    add_data_arguments(parser)
    parser.add_argument(
        "--threshold", type=threshold_type, default=None, help="Override the saved threshold (a number in [-1, 1])."
    )
    parser.add_argument("--results-file", default=None, help="Write the results as JSON here.")
    parser.add_argument(
        "--plot",
        default=None,
        help="Write the held-out trade-off (accuracy vs relative MACs over every threshold, the cascade's point "
        "marked, beside the calibration's) as a PNG here.",
    )
    parser.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from huggingface_hub import constants
    from transformers import AutoModelForImageClassification

    from .. import models  # noqa: F401  (registers the library's model types with the Auto classes)
    from ..records import distributed_state
    from ..workflows.cascade import describe_evaluation, evaluate_cascade, plot_held_out_tradeoff, write_json_atomic

    if not (os.path.isdir(args.model) or "/" in args.model):
        raise ValueError(f"--model must be a saved cascade folder or Hub id, got {args.model!r}.")
    try:
        cascade = AutoModelForImageClassification.from_pretrained(args.model)
    except OSError as error:
        if os.path.isdir(args.model):
            raise
        reach = "reachable offline" if constants.HF_HUB_OFFLINE else "that loads"
        raise ValueError(
            f"--model {args.model!r} is neither a saved cascade folder nor a Hub id {reach}; pass the folder "
            "`tinysaver calibrate --out` wrote."
        ) from error
    if args.threshold is not None:
        cascade.config.threshold = args.threshold
    results, simulation = evaluate_cascade(
        cascade, args.dataset, args.split, return_simulation=True, **data_options(args)
    )
    results["model"] = str(args.model)
    if distributed_state().is_main_process:
        print("\n".join(describe_evaluation(results)))
        print(f"{results['images_per_second']:.1f} img/s (cascade forward passes)")
        if args.results_file:
            write_json_atomic(args.results_file, results)
        if args.plot:
            path = plot_held_out_tradeoff(args.plot, cascade, simulation, results)
            print(f"plot: {path}")
    return 0


__all__ = ["add_parser", "run_evaluate"]
