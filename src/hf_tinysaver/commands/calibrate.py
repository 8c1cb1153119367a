"""`tinysaver calibrate`: choose a cascade's exit threshold on a split and save the calibrated cascade."""

from __future__ import annotations

import argparse

from .arguments import (
    CONFIDENCE_LEVEL_TYPE,
    FRACTION_TYPE,
    MAX_DROP_TYPE,
    add_confidence_argument,
    add_data_arguments,
    add_overwrite_argument,
    add_saver_and_base_arguments,
    data_options,
    number_type,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="Choose a cascade's exit threshold on a split and save the calibrated cascade."
    )
    add_saver_and_base_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument(
        "--objective",
        default="max-drop",
        choices=["paper-no-loss", "max-drop", "exit-rate", "budget", "agreement"],
        help="How to choose the threshold.",
    )
    parser.add_argument("--max-drop", type=MAX_DROP_TYPE, default=None, help="max-drop: allowed top-1 drop in points.")
    parser.add_argument("--exit-rate", type=FRACTION_TYPE, default=None, help="exit-rate: fraction that must exit.")
    parser.add_argument(
        "--budget",
        type=number_type(0.0, meaning="relative MACs, e.g. 0.5"),
        default=None,
        help="budget: target relative MACs.",
    )
    parser.add_argument(
        "--max-disagreement",
        type=FRACTION_TYPE,
        default=None,
        help="agreement: allowed fraction of disagreements with the base.",
    )
    parser.add_argument(
        "--confidence-level",
        type=CONFIDENCE_LEVEL_TYPE,
        default=None,
        help="max-drop/agreement: hold the target on fresh data with this probability (a certificate).",
    )
    parser.add_argument(
        "--certificate",
        default=None,
        choices=["discordant-binomial", "cp-difference", "clopper-pearson"],
        help="max-drop with --confidence-level: the test behind the certificate (default: discordant-binomial).",
    )
    add_confidence_argument(parser)
    parser.add_argument(
        "--fit-temperature", action="store_true", help="Fit the saver's confidence temperature on the split first."
    )
    parser.add_argument(
        "--out",
        "-o",
        required=True,
        help="Folder to save the calibrated cascade in. It is written beside and swapped in when complete, so an "
        "interrupt leaves the old folder or the new one. An existing folder is replaced only when it holds nothing "
        "but an earlier hf_tinysaver cascade, or with --overwrite. Checked before any recording starts.",
    )
    add_overwrite_argument(parser)
    parser.add_argument(
        "--allow-no-savings",
        action="store_true",
        help="Save the cascade even when the chosen point costs as much as the base alone or more (an error else).",
    )
    parser.set_defaults(func=run_calibrate)


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


__all__ = ["add_parser", "run_calibrate"]
