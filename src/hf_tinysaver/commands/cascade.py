"""`tinysaver record`, `tinysaver calibrate` and `tinysaver evaluate`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable


def number_type(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    meaning: str = "",
) -> Callable[[str], float]:
    """An argparse `type` that accepts only finite numbers within the bounds (no `inf`, `nan`).

    Args:
        low: Lower bound, or None.
        high: Upper bound, or None.
        low_open: Whether `low` itself is excluded.
        high_open: Whether `high` itself is excluded.
        meaning: What the number is, appended to the message.

    Returns:
        The parser, which raises `argparse.ArgumentTypeError` (argparse's usage error, exit code 2) with the rule.
    """

    def parse(text: str) -> float:
        from ..calibration.simulation import check_number, number_rule  # on use: building the parser stays light

        try:
            return check_number("value", float(text), low, high, low_open, high_open)
        except ValueError:
            rule = number_rule(low, high, low_open, high_open)
            wanted = rule if rule == "a finite number" else f"a finite number {rule}"
            wanted += f" ({meaning})" if meaning else ""
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None

    return parse


def threshold_type(text: str) -> float:
    """An argparse `type` for an exit threshold, checked by the cascade config's own `validate_threshold`."""
    from ..models.configuration_tinysaver import validate_threshold

    try:
        value = float(text)
    except ValueError:
        value = text
    try:
        return validate_threshold(value, name="the threshold")
    except ValueError as error:
        message = str(error).replace(f"got {value!r} of type str", f"got {text!r}")
        raise argparse.ArgumentTypeError(message.replace(f"got {value!r}", f"got {text!r}")) from None


MAX_DROP_TYPE = number_type(0.0, 100.0, meaning="allowed top-1 drop in points, e.g. 0.5")
FRACTION_TYPE = number_type(0.0, 1.0, meaning="a fraction of the images")
CONFIDENCE_LEVEL_TYPE = number_type(0.0, 1.0, low_open=True, high_open=True, meaning="a probability, e.g. 0.95")


def data_options(args: argparse.Namespace) -> dict:
    """What the arguments of [`_add_data_arguments`] mean to the workflow functions (`record_sub_models`,
    `calibrate_cascade`, `evaluate_cascade`, `search_savers`), as keyword arguments: one place to pass them on."""
    return {
        "batch_size": args.batch_size,
        "assets": args.assets,
        "cache_dir": args.cache_dir,
        "progress": args.progress,
        "shuffle_seed": args.shuffle_seed,
        "label_map": args.label_map,
    }


def _add_data_arguments(parser: argparse.ArgumentParser, default_split: str | None = None) -> None:
    parser.add_argument(
        "--dataset",
        "-d",
        required=True,
        help="Zoo dataset (cifar10, imagenet-val-1300), local dataset folder or Hub id.",
    )
    parser.add_argument(
        "--split",
        default=default_split,
        required=default_split is None,
        help="Split with slicing, e.g. 'test[:50%%]'.",
    )
    parser.add_argument(
        "--shuffle-seed",
        type=int,
        default=None,
        metavar="N",
        help="Apply a fixed random permutation (seed N) to the whole named split before --split's slice is taken, "
        "e.g. for data stored sorted by label; 'test[:50%%]' and 'test[50%%:]' under one seed stay disjoint.",
    )
    parser.add_argument(
        "--label-map",
        default=None,
        metavar="JSON",
        help="Dataset class -> model class, by index or name, as JSON text or a JSON file (e.g. "
        '\'{"plane": "airplane"}\'), for a dataset whose class names differ from the model\'s id2label.',
    )
    parser.add_argument("--batch-size", "-b", type=int, default=64, help="Images per forward pass.")
    parser.add_argument(
        "--assets", default=None, help="Folder with the real weights and datasets (default: ../shared)."
    )
    parser.add_argument("--cache-dir", default=None, help="Records cache (default: $TINYSAVER_CACHE or ~/.cache).")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="Hide progress bars.")


def add_parser(subparsers) -> None:
    record_parser = subparsers.add_parser(
        "record", help="Run one model over a dataset split and cache its per-sample logits."
    )
    record_parser.add_argument("--model", "-m", required=True, help="Zoo name, local model folder or Hub id.")
    _add_data_arguments(record_parser)
    record_parser.add_argument("--results-file", default=None, help="Write a JSON summary (accuracy, n, cache key).")
    record_parser.set_defaults(func=run_record)

    calibrate_parser = subparsers.add_parser(
        "calibrate", help="Choose a cascade's exit threshold on a split and save the calibrated cascade."
    )
    calibrate_parser.add_argument("--saver", "-s", required=True, help="Zoo name, local model folder or Hub id.")
    calibrate_parser.add_argument("--base", "-B", required=True, help="Zoo name, local model folder or Hub id.")
    _add_data_arguments(calibrate_parser)
    calibrate_parser.add_argument(
        "--objective",
        default="max-drop",
        choices=["paper-no-loss", "max-drop", "exit-rate", "budget", "agreement"],
        help="How to choose the threshold.",
    )
    calibrate_parser.add_argument(
        "--max-drop", type=MAX_DROP_TYPE, default=None, help="max-drop: allowed top-1 drop in points."
    )
    calibrate_parser.add_argument(
        "--exit-rate", type=FRACTION_TYPE, default=None, help="exit-rate: fraction that must exit."
    )
    calibrate_parser.add_argument(
        "--budget",
        type=number_type(0.0, meaning="relative MACs, e.g. 0.5"),
        default=None,
        help="budget: target relative MACs.",
    )
    calibrate_parser.add_argument(
        "--max-disagreement",
        type=FRACTION_TYPE,
        default=None,
        help="agreement: allowed fraction of disagreements with the base.",
    )
    calibrate_parser.add_argument(
        "--confidence-level",
        type=CONFIDENCE_LEVEL_TYPE,
        default=None,
        help="max-drop/agreement: hold the target on fresh data with this probability (a certificate).",
    )
    calibrate_parser.add_argument(
        "--certificate",
        default=None,
        choices=["discordant-binomial", "cp-difference", "clopper-pearson"],
        help="max-drop with --confidence-level: the test behind the certificate (default: discordant-binomial).",
    )
    calibrate_parser.add_argument("--confidence", default="max_prob", choices=["max_prob", "margin", "entropy"])
    calibrate_parser.add_argument(
        "--fit-temperature", action="store_true", help="Fit the saver's confidence temperature on the split first."
    )
    calibrate_parser.add_argument(
        "--out",
        "-o",
        required=True,
        help="Folder to save the calibrated cascade in. It is written beside and swapped in when complete, so an "
        "interrupt leaves the old folder or the new one. An existing folder is replaced only when it holds nothing "
        "but an earlier hf_tinysaver cascade, or with --overwrite. Checked before any recording starts.",
    )
    calibrate_parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace --out as a whole even when it holds files hf_tinysaver did not write (they are deleted).",
    )
    calibrate_parser.add_argument(
        "--allow-no-savings",
        action="store_true",
        help="Save the cascade even when the chosen point costs as much as the base alone or more (an error else).",
    )
    calibrate_parser.set_defaults(func=run_calibrate)

    evaluate_parser = subparsers.add_parser(
        "evaluate", help="Run a saved cascade over a split and measure accuracy, exit rate, MACs and speed."
    )
    evaluate_parser.add_argument("--model", "-m", required=True, help="A saved cascade folder or Hub id.")
    _add_data_arguments(evaluate_parser)
    evaluate_parser.add_argument(
        "--threshold", type=threshold_type, default=None, help="Override the saved threshold (a number in [-1, 1])."
    )
    evaluate_parser.add_argument("--results-file", default=None, help="Write the results as JSON here.")
    evaluate_parser.set_defaults(func=run_evaluate)


def _objective_parameters(args: argparse.Namespace) -> dict:
    parameters = {
        "max-drop": {
            "max_drop": args.max_drop,
            "confidence_level": args.confidence_level,
            "certificate": args.certificate,
        },
        "exit-rate": {"exit_rate": args.exit_rate},
        "budget": {"relative_macs": args.budget},
        "agreement": {"max_disagreement": args.max_disagreement, "confidence_level": args.confidence_level},
        "paper-no-loss": {},
    }[args.objective]
    if args.objective == "max-drop" and args.max_drop is None:
        parameters["max_drop"] = 0.5
    if args.certificate is not None and (args.objective != "max-drop" or args.confidence_level is None):
        raise ValueError("--certificate applies to --objective max-drop with --confidence-level (e.g. 0.95).")
    missing = [
        name for name, value in parameters.items() if value is None and name not in ("confidence_level", "certificate")
    ]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-").replace("relative-macs", "budget") for name in missing)
        raise ValueError(f"The {args.objective} objective needs {flags}.")
    return parameters


def run_record(args: argparse.Namespace) -> int:
    from ..models.image_processing_tinysaver import TinySaverImageProcessor
    from ..models.modeling_tinysaver import find_preprocessing
    from ..records import distributed_state, record
    from ..workflows.cascade import load_model, resolve_dataset_source, write_json_atomic

    model = load_model(args.model, args.assets)
    preprocessing = find_preprocessing(model, args.model, role="model")
    records = record(
        model,
        TinySaverImageProcessor(preprocessing=preprocessing),
        resolve_dataset_source(args.dataset, args.assets),
        split=args.split,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        preprocessing=preprocessing,
        model_name=args.model,
        progress=args.progress,
        shuffle_seed=args.shuffle_seed,
        label_map=args.label_map,
    )
    summary = {"model": args.model, "dataset": args.dataset, "split": args.split, "n": records.n}
    summary["shuffle_seed"] = args.shuffle_seed
    summary.update(accuracy=records.accuracy, cache_key=records.cache_key, num_labels=int(records.logits.shape[1]))
    if distributed_state().is_main_process:
        print(f"{args.model} on {args.dataset} {args.split}: n={records.n}", end="")
        print(f", top-1 {100 * records.accuracy:.2f} %" if records.accuracy is not None else "")
        if args.results_file:
            write_json_atomic(args.results_file, summary)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from ..records import distributed_state
    from ..storage import TRADEOFF_PLOT_FILE, check_output_folder
    from ..workflows.cascade import build_cascade, calibrate_cascade, save_calibrated_cascade

    parameters = _objective_parameters(args)
    check_output_folder(args.out, overwrite=args.overwrite, kind="cascade", option="--out")
    cascade = build_cascade(args.saver, args.base, assets=args.assets, confidence=args.confidence)
    result, simulation = calibrate_cascade(
        cascade,
        args.dataset,
        args.split,
        objective=args.objective,
        fit_temperature=args.fit_temperature,
        allow_no_savings=args.allow_no_savings,
        **data_options(args),
        **parameters,
    )
    if not distributed_state().is_main_process:
        return 0
    out = save_calibrated_cascade(cascade, result, simulation, args.out, overwrite=args.overwrite)
    print(f"Calibrated {args.saver} -> {args.base} ({args.objective}): {result.describe()}")
    plot = f", {TRADEOFF_PLOT_FILE}" if (out / TRADEOFF_PLOT_FILE).is_file() else ""
    print(f"Saved the cascade to {out} (calibration.json, tradeoff.csv{plot})")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from huggingface_hub import constants
    from transformers import AutoModelForImageClassification

    from ..records import distributed_state
    from ..workflows.cascade import evaluate_cascade, write_json_atomic

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
    results = evaluate_cascade(cascade, args.dataset, args.split, **data_options(args))
    results["model"] = str(args.model)
    if distributed_state().is_main_process:
        print(
            f"accuracy {100 * results['accuracy']:.2f} % (base {100 * results['base_accuracy']:.2f} %, drop "
            f"{results['accuracy_drop_points']:.2f} points), exit rate {results['exit_rate']:.4f}, relative MACs "
            f"{results['relative_macs']:.4f}, {results['images_per_second']:.1f} img/s, n={results['n']}"
        )
        if results["costs_more_than_base"]:
            print(
                f"warning: this cascade costs {results['relative_macs']:.4f}x its base alone (exit rate "
                f"{results['exit_rate']:.4f}, saver share {results['saver_macs'] / results['base_macs']:.4f}): it "
                "saves nothing on this split; recalibrate it (see `tinysaver calibrate`) or use the base alone."
            )
        if args.results_file:
            write_json_atomic(args.results_file, results)
    return 0
