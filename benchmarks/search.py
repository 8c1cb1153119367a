"""Saver search on real zoo models, with the pre-screen checked and the winner's real cascade measured on held-out data.

Usage:
    python benchmarks/search.py --task cifar10 [--results-file benchmarks/results/search_cifar10.json]
    python benchmarks/search.py --task imagenet [--results-file benchmarks/results/search_imagenet.json]
        [--max-drop 0.5] [--assets ../shared] [--cache-dir DIR] [-b BATCH] [--out DIR]

Tasks (benchmarks/tasks.py): CIFAR-10, base ResNet-56, candidates ResNet-20/32/44, search on `test[:50%]`, held out
`test[50%:]`; ImageNet, base EfficientNet-Lite2, candidates the four MobileNets and EfficientNet-Lite0/1, search on
`imagenet-val-1300` `validation[:50%]`, held out `validation[50%:]`.

1. `search_savers` ranks every candidate on the search half (records cached) and writes the results JSON, the CSV and
   the plot beside it (same basename).
2. The pre-screen is run twice more, with MACs only and with a table of the candidates' accuracies on the search half
   (what a user's table must at least hold); the skipped candidates and whether the winner stays the same are
   reported under `prescreen_check`.
3. The winner's cascade is calibrated with max-drop at the primary drop on the search half (`save_winning_cascade`)
   and run for real (`evaluate_cascade`) on the held-out half: `held_out_evaluation`, with the simulated figures from
   the held-out records beside (`simulated_exit_rate`, `simulated_accuracy`, `simulation_matches_forward`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from tasks import TASKS

from hf_tinysaver.provenance import PROVENANCE_KEY, provenance
from hf_tinysaver.workflows.cascade import evaluate_cascade
from hf_tinysaver.workflows.search import save_winning_cascade, search_savers

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", "-t", choices=sorted(TASKS), required=True)
    parser.add_argument("--results-file", default=None, help="Default: benchmarks/results/search_<task>.json.")
    parser.add_argument("--max-drop", type=float, default=0.5, help="Primary allowed drop (points).")
    parser.add_argument("--assets", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--batch-size", "-b", type=int, default=None)
    parser.add_argument("--out", "-o", default=None, help="Keep the winner's calibrated cascade here.")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    results_file = Path(args.results_file or RESULTS / f"search_{args.task}.json")
    batch_size = args.batch_size or task["batch_size"]
    common = {"batch_size": batch_size, "assets": args.assets, "cache_dir": args.cache_dir, "progress": False}

    start = time.perf_counter()
    result = search_savers(
        task["base"],
        task["candidates"],
        task["dataset"],
        task["calibration_split"],
        primary_max_drop=args.max_drop,
        **common,
    )
    search_seconds = time.perf_counter() - start
    print(result.table())

    prescreen_check = {}
    accuracies = {c.name: {"accuracy": c.accuracy} for c in result.ranked}
    for label, table in (("macs_only", None), ("macs_and_split_accuracy", accuracies)):
        screened = search_savers(
            task["base"],
            task["candidates"],
            task["dataset"],
            task["calibration_split"],
            primary_max_drop=args.max_drop,
            prescreen=True,
            candidate_table=table,
            **common,
        )
        prescreen_check[label] = {
            "recorded": [c.name for c in screened.ranked],
            "skipped": {c.name: c.reason for c in screened.candidates if c.status == "skipped"},
            "winner": screened.winner.name if screened.winner else None,
            "same_winner_as_full_search": (screened.winner and screened.winner.name)
            == (result.winner and result.winner.name),
        }

    held_out = None
    if result.winner is not None:
        with tempfile.TemporaryDirectory() as scratch:
            cascade, calibration = save_winning_cascade(result, args.out or scratch, **common)
            held_out = evaluate_cascade(cascade, task["dataset"], task["held_out_split"], **common)
        held_out["calibration_split_accuracy"] = calibration.accuracy
        held_out["calibration_split_relative_macs"] = calibration.relative_macs
        print(
            f"Winner {result.winner.name} on {task['held_out_split']} (real forward): accuracy "
            f"{100 * held_out['accuracy']:.2f} % (base {100 * held_out['base_accuracy']:.2f} %), exit rate "
            f"{held_out['exit_rate']:.4f}, relative MACs {held_out['relative_macs']:.4f}, simulation matches: "
            f"{held_out['simulation_matches_forward']}"
        )

    extra = {
        "task": args.task,
        "held_out_split": task["held_out_split"],
        "held_out_evaluation": held_out,
        "prescreen_check": prescreen_check,
        "search_seconds": search_seconds,
        "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        PROVENANCE_KEY: provenance(argv=["python", *sys.argv]),
    }
    json_path, csv_path = result.write(results_file, extra=extra)
    plot_path = result.plot(json_path.with_suffix(".png"))
    print(f"Wrote {json_path}, {csv_path}, {plot_path}")


if __name__ == "__main__":
    main()
