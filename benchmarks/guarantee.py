"""Proves the `max-drop` certificates by simulation on real records: random calibration/test splits of a pool.

The pool is every recorded image of the task (CIFAR-10 `test`, 10,000 images; ImageNet `imagenet-val-1300`
`validation`, 1,300 images), taken as the population. Each split draws `--calibration-size` images for calibration
(without replacement; the rest is the test part), certifies the threshold with every method of
`hf_tinysaver.calibration.certification.CERTIFICATE_METHODS` at `--max-drop` points and `--confidence-level`, and measures at
the chosen threshold the drop on the test part and the true drop on the whole pool. A violation is a split whose
pool drop exceeds the target; a valid certificate has at most `1 - confidence_level` of them. The in-sample
`max-drop` rule (no certificate) is the reference. `plan` is the answer of `plan_calibration_size` with the whole
pool as the pilot. Everything runs on the cached records (numpy), no model runs.

Usage:
    python benchmarks/guarantee.py --task cifar10 --results-file benchmarks/results/guarantee_cifar10.json
    python benchmarks/guarantee.py --task imagenet --results-file benchmarks/results/guarantee_imagenet.json
        [--num-splits 1000] [--calibration-size N] [--max-drop 0.5] [--confidence-level 0.95] [--seed 0]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np
from calibrate_evaluate import SAVERS

from hf_tinysaver.calibration.bounds import clopper_pearson_lower, clopper_pearson_upper
from hf_tinysaver.calibration.certification import CERTIFICATE_METHODS, DEFAULT_CERTIFICATE, plan_calibration_size
from hf_tinysaver.calibration.simulation import CascadeSimulation
from hf_tinysaver.provenance import PROVENANCE_KEY, provenance
from hf_tinysaver.storage import write_json_atomic
from hf_tinysaver.workflows.cascade import build_cascade, record_sub_models, simulation_for
from hf_tinysaver.workflows.demo import DEMO_TASKS

# Default calibration sizes: half of each pool, as the demo and calibrate_evaluate.py calibrate.
CALIBRATION_SIZES = {"cifar10": 5000, "imagenet": 650}
# The goal for CIFAR-10 with 5,000 calibration images: mean relative MACs at most this, violations <= alpha.
CIFAR10_GOAL_RELATIVE_MACS = 0.48


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(DEMO_TASKS), default="cifar10")
    parser.add_argument("--num-splits", type=int, default=1000, help="Random calibration/test splits.")
    parser.add_argument("--calibration-size", type=int, default=None, help="Default: half of the pool.")
    parser.add_argument("--max-drop", type=float, default=0.5, help="Target drop in points.")
    parser.add_argument("--confidence-level", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--results-file", required=True)
    return parser.parse_args(argv)


def load_pool(task_name: str, assets, cache_dir) -> tuple[CascadeSimulation, dict]:
    task = DEMO_TASKS[task_name]
    saver = SAVERS[task_name]
    cascade = build_cascade(saver, task["base"], assets=assets)
    saver_records, base_records = record_sub_models(
        cascade, task["dataset"], task["split"], batch_size=250, assets=assets, cache_dir=cache_dir, progress=False
    )
    pool = simulation_for(cascade, saver_records, base_records)
    return pool, {"saver": saver, "base": task["base"], "dataset": task["dataset"], "split": task["split"]}


def subset(pool: CascadeSimulation, indices: np.ndarray) -> CascadeSimulation:
    return CascadeSimulation(
        pool.confidence[indices],
        pool.saver_predictions[indices],
        pool.base_predictions[indices],
        pool.labels[indices],
        pool.relative_saver_macs,
    )


def summarize(rows: list[dict], max_drop: float, confidence_level: float) -> dict:
    pool_drop = np.array([row["pool_drop"] for row in rows])
    violations = int(np.count_nonzero(pool_drop > max_drop + 1e-9))
    splits = len(rows)
    interval = 0.95
    return {
        "violations": violations,
        "violation_rate": violations / splits,
        "violation_rate_ci95": [
            float(clopper_pearson_lower(violations, splits, 1 - (1 - interval) / 2)),
            float(clopper_pearson_upper(violations, splits, 1 - (1 - interval) / 2)),
        ],
        "valid": bool(violations / splits <= round(1 - confidence_level, 12)),
        "mean_relative_macs": float(np.mean([row["pool_relative_macs"] for row in rows])),
        "mean_calibration_relative_macs": float(np.mean([row["calibration_relative_macs"] for row in rows])),
        "mean_exit_rate": float(np.mean([row["pool_exit_rate"] for row in rows])),
        "mean_pool_drop": float(np.mean(pool_drop)),
        "mean_test_drop": float(np.mean([row["test_drop"] for row in rows])),
        "test_drop_above_target_rate": float(np.mean([row["test_drop"] > max_drop + 1e-9 for row in rows])),
        "certified_nothing_rate": float(np.mean([row["pool_exit_rate"] == 0 for row in rows])),
        "mean_certified_points": float(np.mean([row["certified_points"] for row in rows])),
    }


def run(args) -> dict:
    start = time.perf_counter()
    pool, task = load_pool(args.task, args.assets, args.cache_dir)
    size = args.calibration_size or CALIBRATION_SIZES[args.task]
    if not 0 < size < pool.n:
        raise SystemExit(f"--calibration-size must be between 1 and {pool.n - 1} (the pool has {pool.n} images).")
    rng = np.random.default_rng(args.seed)
    modes = ["in-sample", *CERTIFICATE_METHODS]
    rows = {mode: [] for mode in modes}
    for _ in range(args.num_splits):
        order = rng.permutation(pool.n)
        calibration, test = subset(pool, order[:size]), subset(pool, order[size:])
        for mode in modes:
            if mode == "in-sample":
                result = calibration.calibrate("max-drop", max_drop=args.max_drop)
            else:
                result = calibration.calibrate(
                    "max-drop", max_drop=args.max_drop, confidence_level=args.confidence_level, certificate=mode
                )
            on_pool = pool.evaluate(result.threshold)
            rows[mode].append(
                {
                    "pool_drop": on_pool.accuracy_drop,
                    "pool_relative_macs": on_pool.relative_macs,
                    "pool_exit_rate": on_pool.exit_rate,
                    "calibration_relative_macs": result.relative_macs,
                    "test_drop": test.evaluate(result.threshold).accuracy_drop,
                    "certified_points": len(result.parameters.get("certified_points", [])),
                }
            )
    summaries = {mode: summarize(rows[mode], args.max_drop, args.confidence_level) for mode in modes}
    reference = pool.calibrate("max-drop", max_drop=args.max_drop)
    # The planner with the whole pool as the pilot: the size at which the default certificate lets the pool's
    # in-sample share at half the target exit in 80 % of calibration sets.
    plan_exit_rate = pool.calibrate("max-drop", max_drop=args.max_drop / 2).exit_rate
    planned = plan_calibration_size(pool, args.max_drop, args.confidence_level, target_exit_rate=plan_exit_rate)
    results = {
        "command": "python " + " ".join(shlex.quote(part) for part in ["benchmarks/guarantee.py", *sys.argv[1:]]),
        "task": args.task,
        **task,
        "pool_n": pool.n,
        "relative_saver_macs": pool.relative_saver_macs,
        "calibration_size": size,
        "num_splits": args.num_splits,
        "max_drop": args.max_drop,
        "confidence_level": args.confidence_level,
        "seed": args.seed,
        "default_method": DEFAULT_CERTIFICATE,
        "pool_in_sample": {"relative_macs": reference.relative_macs, "exit_rate": reference.exit_rate},
        "methods": summaries,
        "plan": {"pilot_n": pool.n, "target_exit_rate": plan_exit_rate, "power": 0.8, "calibration_size": planned},
        "seconds": time.perf_counter() - start,
    }
    if args.task == "cifar10" and size == CALIBRATION_SIZES["cifar10"]:
        default = summaries[DEFAULT_CERTIFICATE]
        results["goal"] = {
            "mean_relative_macs_at_most": CIFAR10_GOAL_RELATIVE_MACS,
            "violation_rate_at_most": round(1 - args.confidence_level, 12),
            "met": bool(default["valid"] and default["mean_relative_macs"] <= CIFAR10_GOAL_RELATIVE_MACS),
        }
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    results[PROVENANCE_KEY] = provenance(argv=["python", *sys.argv])
    write_json_atomic(args.results_file, results)
    for mode, summary in results["methods"].items():
        low, high = summary["violation_rate_ci95"]
        print(
            f"{mode:>20}: violations {100 * summary['violation_rate']:.1f} % [{100 * low:.1f}, {100 * high:.1f}], "
            f"mean relative MACs {summary['mean_relative_macs']:.4f}, certified nothing "
            f"{100 * summary['certified_nothing_rate']:.1f} %"
        )
    print(f"planned calibration size (pilot: the pool): {results['plan']['calibration_size']:,}")
    if "goal" in results:
        print(f"goal met: {results['goal']['met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
