"""Trade-off of a real cascade calibrated on one half of the data and measured on the other, against the oracle bound
and the static alternative of matched accuracy.

Usage:
    python benchmarks/tradeoff.py --task cifar10 [--results-file benchmarks/results/tradeoff_cifar10.json]
    python benchmarks/tradeoff.py --task imagenet [--results-file benchmarks/results/tradeoff_imagenet.json]
        [--saver NAME] [--max-drops 0 0.5 1.0] [--forward-drops 0 0.5 1.0] [--assets ../shared] [--cache-dir DIR]
        [-b BATCH]

Pairs (benchmarks/tasks.py): CIFAR-10 ResNet-20 -> ResNet-56 (`test[:50%]` / `test[50%:]`); ImageNet, the best
MobileNet -> EfficientNet-Lite2 (`validation[:50%]` / `validation[50%:]` of imagenet-val-1300), where "best" is the
search's rank-1 MobileNet on the calibration half (relative MACs at a 0.5-point drop) unless `--saver` names one.

For each allowed drop: the threshold chosen with max-drop on the calibration half; accuracy, exit rate and relative
MACs there and on the held-out half, from the held-out records (simulation) and from the real cascade's forward
pass (`evaluate_cascade`, for the `--forward-drops`), which must agree exactly; the oracle bounds on the held-out
half (`oracle_relative_macs`: the base runs only where the saver is wrong and the base right;
`oracle_relative_macs_at_drop`: the cheapest any exit rule can be within that drop); and the static alternative,
the cheapest single zoo model of the task whose held-out accuracy is at least the cascade's ("none" when only the
base or a larger model matches; `cascade_is_cheaper` then compares with the base alone).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path

import torch
from tasks import TASKS, zoo_models_of

from hf_tinysaver.provenance import PROVENANCE_KEY, provenance
from hf_tinysaver.workflows.cascade import (
    build_cascade,
    evaluate_cascade,
    load_model,
    record_sub_models,
    simulation_for,
    write_json_atomic,
)
from hf_tinysaver.workflows.search import oracle_relative_macs_at_drop, search_savers

RESULTS = Path(__file__).parent / "results"


def point_figures(result) -> dict:
    return {
        "exit_rate": result.exit_rate,
        "accuracy": result.accuracy,
        "base_accuracy": result.base_accuracy,
        "accuracy_drop_points": result.accuracy_drop,
        "relative_macs": result.relative_macs,
        "agreement": result.agreement,
    }


def single_models(task: dict, common: dict) -> list[dict]:
    """Held-out accuracy and MACs of every zoo model of the task, each alone (records cached)."""
    from hf_tinysaver.models.image_processing_tinysaver import TinySaverImageProcessor
    from hf_tinysaver.records import record
    from hf_tinysaver.workflows.cascade import resolve_dataset_source

    base_macs = load_model(task["base"], common["assets"]).config.macs
    rows = []
    for name in zoo_models_of(task["dataset"]):
        model = load_model(name, common["assets"])
        preprocessing = model.config.preprocessing
        records = record(
            model,
            TinySaverImageProcessor(preprocessing=preprocessing),
            resolve_dataset_source(task["dataset"], common["assets"]),
            split=task["held_out_split"],
            batch_size=common["batch_size"],
            cache_dir=common["cache_dir"],
            preprocessing=preprocessing,
            model_name=name,
            progress=False,
        )
        macs = int(model.config.macs)
        rows.append({"name": name, "macs": macs, "relative_macs": macs / base_macs, "accuracy": records.accuracy})
    return sorted(rows, key=lambda row: row["macs"])


def static_alternative(singles: list[dict], accuracy: float, base: str) -> dict:
    matching = [row for row in singles if row["accuracy"] >= accuracy]
    cheapest = min(matching, key=lambda row: row["macs"], default=None)
    base_macs = next(row["macs"] for row in singles if row["name"] == base)
    if cheapest is None or cheapest["macs"] >= base_macs:
        return {"name": "none", "macs": None, "relative_macs": None, "accuracy": None}
    return dict(cheapest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", "-t", choices=sorted(TASKS), required=True)
    parser.add_argument("--saver", "-s", default=None, help="Zoo saver (default: the task's, or the search's pick).")
    parser.add_argument("--results-file", default=None, help="Default: benchmarks/results/tradeoff_<task>.json.")
    parser.add_argument("--max-drops", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument(
        "--forward-drops", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="Drops run with the real cascade."
    )
    parser.add_argument("--assets", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--batch-size", "-b", type=int, default=None)
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    results_file = Path(args.results_file or RESULTS / f"tradeoff_{args.task}.json")
    common = {
        "batch_size": args.batch_size or task["batch_size"],
        "assets": args.assets,
        "cache_dir": args.cache_dir,
        "progress": False,
    }

    saver, saver_selection = args.saver or task["saver"], "given"
    if saver is None:
        pool = search_savers(task["base"], task["saver_pool"], task["dataset"], task["calibration_split"], **common)
        saver = pool.winner.name if pool.winner else pool.ranked[0].name
        saver_selection = {
            "rule": f"rank 1 of tinysaver search over {task['saver_pool']} on {task['calibration_split']}",
            "ranking": {c.name: c.relative_macs["0.5"] for c in pool.ranked},
        }
    cascade = build_cascade(saver, task["base"], assets=common["assets"])
    records = {
        half: record_sub_models(cascade, task["dataset"], task[f"{half}_split"], **common)
        for half in ("calibration", "held_out")
    }
    calibration = simulation_for(cascade, *records["calibration"])
    held_out = simulation_for(cascade, *records["held_out"])
    singles = single_models(task, common)

    operating_points = []
    for max_drop in args.max_drops:
        chosen = calibration.calibrate("max-drop", max_drop=max_drop)
        simulated = held_out.evaluate(chosen.threshold)
        point = {
            "max_drop": max_drop,
            "threshold": chosen.threshold,
            "calibration": point_figures(chosen),
            "held_out_simulated": point_figures(simulated),
            "held_out_forward": None,
            "oracle_relative_macs": held_out.oracle_relative_macs(),
            "oracle_relative_macs_at_drop": oracle_relative_macs_at_drop(
                held_out.relative_saver_macs, held_out.saver_accuracy, held_out.base_accuracy, max_drop
            ),
        }
        if max_drop in args.forward_drops:
            cascade.config.threshold = chosen.threshold
            forward = evaluate_cascade(cascade, task["dataset"], task["held_out_split"], **common)
            point["held_out_forward"] = {
                key: forward[key]
                for key in (
                    "accuracy",
                    "base_accuracy",
                    "accuracy_drop_points",
                    "exit_rate",
                    "relative_macs",
                    "agreement",
                    "images_per_second",
                    "n",
                    "simulation_matches_forward",
                )
            }
        static = static_alternative(singles, simulated.accuracy, task["base"])
        # Against the static alternative, or against the base alone when no smaller model matches.
        static["cascade_is_cheaper"] = simulated.relative_macs < (static["relative_macs"] or 1.0)
        point["static_alternative"] = static
        operating_points.append(point)
        forward_text = (
            f", forward matches: {point['held_out_forward']['simulation_matches_forward']}"
            if point["held_out_forward"]
            else ""
        )
        print(
            f"drop {max_drop}: held-out accuracy {100 * simulated.accuracy:.2f} % (base "
            f"{100 * simulated.base_accuracy:.2f} %), exit {simulated.exit_rate:.4f}, relative MACs "
            f"{simulated.relative_macs:.4f}, oracle {point['oracle_relative_macs']:.4f} / at drop "
            f"{point['oracle_relative_macs_at_drop']:.4f}, static {static['name']} "
            f"({static['relative_macs']}){forward_text}"
        )

    output = {
        "task": args.task,
        "saver": saver,
        "base": task["base"],
        "saver_selection": saver_selection,
        "dataset": task["dataset"],
        "calibration_split": task["calibration_split"],
        "held_out_split": task["held_out_split"],
        "objective": "max-drop",
        "saver_macs": cascade.config.saver_macs,
        "base_macs": cascade.config.base_macs,
        "relative_saver_macs": calibration.relative_saver_macs,
        "calibration": {
            "n": calibration.n,
            "base_accuracy": calibration.base_accuracy,
            "saver_accuracy": calibration.saver_accuracy,
            "oracle_relative_macs": calibration.oracle_relative_macs(),
        },
        "held_out": {
            "n": held_out.n,
            "base_accuracy": held_out.base_accuracy,
            "saver_accuracy": held_out.saver_accuracy,
            "oracle_relative_macs": held_out.oracle_relative_macs(),
        },
        "single_models_held_out": singles,
        "operating_points": operating_points,
        "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "machine": platform.processor() or platform.machine(),
    }
    output[PROVENANCE_KEY] = provenance(argv=["python", *sys.argv])
    write_json_atomic(results_file, output)
    print(f"Wrote {results_file}")


if __name__ == "__main__":
    main()
