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
        "--save-to-folder",
        action="store_true",
        help=(
            "Also write the results as evaluation.json into the --model folder (a local cascade folder), so that "
            "`tinysaver push` shows them in the model card as the held-out evaluation."
        ),
    )
    parser.add_argument(
        "--measure-speedup",
        type=int,
        default=0,
        metavar="N",
        help="Also time the cascade against its base alone on the first N images of the split (interleaved rounds, "
        "at --batch-size): the measured speedups, with the hardware, go into the results (and the model card "
        "after --save-to-folder). 0 skips it.",
    )
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

    # Loading a model module runs hf_tinysaver/models/__init__.py, which registers the Auto classes.
    from ..models import modeling_tinysaver  # noqa: F401
    from ..records import distributed_state
    from ..storage import EVALUATION_FILE, write_json_atomic
    from ..workflows.cascade import describe_evaluation, evaluate_cascade, plot_held_out_tradeoff

    if args.save_to_folder and not os.path.isdir(args.model):
        raise ValueError(
            f"--save-to-folder writes {EVALUATION_FILE} into the cascade folder, but --model {args.model!r} is not a "
            "local folder; pass the folder `tinysaver calibrate --out` wrote (download a Hub cascade first with "
            "`hf download REPO_ID --local-dir FOLDER`), or use --results-file instead."
        )
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
    if args.measure_speedup < 0 or 0 < args.measure_speedup < args.batch_size:
        raise ValueError(
            f"--measure-speedup takes at least --batch-size ({args.batch_size}) images, or 0 to skip timing; got "
            f"{args.measure_speedup}."
        )
    if args.threshold is not None:
        if args.save_to_folder and args.threshold != cascade.config.threshold:
            raise ValueError(
                f"--save-to-folder records how the saved cascade performs at its own threshold "
                f"({cascade.config.threshold:.6g}), but --threshold {args.threshold:g} overrides it; drop one of the "
                "two (use --results-file to keep the results of another threshold)."
            )
        cascade.config.threshold = args.threshold
    results, simulation = evaluate_cascade(
        cascade,
        args.dataset,
        args.split,
        return_simulation=True,
        speedup_images=args.measure_speedup,
        **data_options(args),
    )
    results["model"] = str(args.model)
    if distributed_state().is_main_process:
        print("\n".join(describe_evaluation(results)))
        print(f"{results['images_per_second']:.1f} img/s (cascade forward passes)")
        if args.results_file:
            write_json_atomic(args.results_file, results)
        if args.save_to_folder:
            print(f"wrote {write_json_atomic(os.path.join(args.model, EVALUATION_FILE), results)}")
        if args.plot:
            path = plot_held_out_tradeoff(args.plot, cascade, simulation, results)
            print(f"plot: {path}")
    return 0


__all__ = ["add_parser", "run_evaluate"]
