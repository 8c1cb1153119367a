"""`tinysaver plan`: how many calibration images a certified `max-drop` threshold needs, from a pilot split."""

from __future__ import annotations

import argparse

from .arguments import (
    CONFIDENCE_LEVEL_TYPE,
    FRACTION_TYPE,
    MAX_DROP_TYPE,
    add_confidence_argument,
    add_data_arguments,
    add_saver_and_base_arguments,
    data_options,
    number_type,
)


def add_parser(subparsers) -> None:
    power_type = number_type(0.0, 1.0, low_open=True, high_open=True, meaning="share of calibration sets, e.g. 0.8")

    parser = subparsers.add_parser(
        "plan",
        help="Plan the calibration size: how many images a certificate needs to let the pilot's share exit.",
    )
    add_saver_and_base_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--max-drop", type=MAX_DROP_TYPE, default=0.5, help="Target top-1 drop in points.")
    parser.add_argument(
        "--confidence-level", type=CONFIDENCE_LEVEL_TYPE, default=0.95, help="Level of the certificate."
    )
    parser.add_argument(
        "--target-exit-rate",
        type=FRACTION_TYPE,
        default=None,
        help="Exit rate to certify (default: the pilot's in-sample exit rate at half the target drop).",
    )
    parser.add_argument(
        "--certificate", default="discordant-binomial", choices=["discordant-binomial", "cp-difference"]
    )
    parser.add_argument("--power", type=power_type, default=0.8, help="Share of calibration sets that should pass.")
    add_confidence_argument(parser)
    parser.add_argument("--results-file", default=None, help="Write the plan as JSON here.")
    parser.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from ..calibration.certification import default_target_exit_rate, plan_calibration_size
    from ..provenance import PROVENANCE_KEY, model_provenance
    from ..records import distributed_state
    from ..workflows.cascade import build_cascade, record_sub_models, simulation_for, write_json_atomic

    cascade = build_cascade(args.saver, args.base, assets=args.assets, confidence=args.confidence)
    saver_records, base_records = record_sub_models(cascade, args.dataset, args.split, **data_options(args))
    if saver_records.labels is None:
        raise ValueError(f"Planning a certificate needs labels; the pilot split {args.split!r} has none.")
    pilot = simulation_for(cascade, saver_records, base_records)
    target_exit_rate = args.target_exit_rate
    if target_exit_rate is None:
        target_exit_rate = default_target_exit_rate(pilot, args.max_drop)
    size = plan_calibration_size(
        pilot,
        args.max_drop,
        args.confidence_level,
        target_exit_rate=target_exit_rate,
        method=args.certificate,
        power=args.power,
    )
    in_sample = pilot.calibrate("max-drop", max_drop=args.max_drop)
    plan = {
        "saver": args.saver,
        "base": args.base,
        "dataset": args.dataset,
        "split": args.split,
        "shuffle_seed": args.shuffle_seed,
        "pilot_n": pilot.n,
        "max_drop": args.max_drop,
        "confidence_level": args.confidence_level,
        "certificate": args.certificate,
        "power": args.power,
        "target_exit_rate": target_exit_rate,
        "target_relative_macs": pilot.relative_saver_macs + 1.0 - target_exit_rate,
        "pilot_in_sample_exit_rate": in_sample.exit_rate,
        "calibration_size": size,
        PROVENANCE_KEY: model_provenance(cascade),
    }
    if distributed_state().is_main_process:
        print(
            f"A {args.certificate} certificate of at most {args.max_drop:g} points at confidence "
            f"{args.confidence_level:g} needs about {size:,} calibration images to let {100 * target_exit_rate:.1f} % "
            f"exit (relative MACs {plan['target_relative_macs']:.3f}) in {100 * args.power:.0f} % of calibration "
            f"sets (pilot: {pilot.n:,} images, in-sample exit rate {100 * in_sample.exit_rate:.1f} % at "
            f"{args.max_drop:g} points)."
        )
        if args.results_file:
            write_json_atomic(args.results_file, plan)
    return 0


__all__ = ["add_parser", "run_plan"]
