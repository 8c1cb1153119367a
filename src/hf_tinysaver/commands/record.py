"""`tinysaver record`: run one model over a dataset split and cache its per-sample logits."""

from __future__ import annotations

import argparse

from .arguments import MODEL_HELP, add_data_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "record", help="Run one model over a dataset split and cache its per-sample logits."
    )
    parser.add_argument("--model", "-m", required=True, help=MODEL_HELP)
    add_data_arguments(parser)
    parser.add_argument("--results-file", default=None, help="Write a JSON summary (accuracy, n, cache key).")
    parser.set_defaults(func=run_record)


def run_record(args: argparse.Namespace) -> int:
    from ..models.image_processing_tinysaver import TinySaverImageProcessor
    from ..models.modeling_tinysaver import find_preprocessing
    from ..provenance import PROVENANCE_KEY, model_provenance
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
    summary[PROVENANCE_KEY] = model_provenance(model)
    if distributed_state().is_main_process:
        print(f"{args.model} on {args.dataset} {args.split}: n={records.n}", end="")
        print(f", top-1 {100 * records.accuracy:.2f} %" if records.accuracy is not None else "")
        if args.results_file:
            write_json_atomic(args.results_file, summary)
    return 0


__all__ = ["add_parser", "run_record"]
