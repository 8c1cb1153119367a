"""Time to score and rank 50 candidate savers from cached records of 50,000 samples each (`rank_savers`).

Usage:
    python benchmarks/search_speed.py [--candidates 50] [--samples 50000] [--num-labels 10] [--repeats 5]
        [--results-file benchmarks/results/search_speed.json]

The records are synthetic (random float32 logits with a label-dependent signal of random strength, random MACs):
the timing depends on the sizes, not on the values. Scoring one candidate computes its confidences from its logits,
the paper's delta C, the oracle, the max-drop operating points at 0, 0.5 and 1.0 points, and the ranking. Reported
(medians over the repeats, wall clock and, `*_cpu_seconds`, this process's CPU time, which other jobs on a shared
machine do not inflate): scoring from records in memory (`scoring_seconds`, the figure to keep under 2 s), the
same with the records loaded from their cache files on disk each time (`load_and_scoring_seconds`), and with the
pre-screen on (records in memory).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hf_tinysaver.provenance import PROVENANCE_KEY, provenance
from hf_tinysaver.records import Records
from hf_tinysaver.workflows.cascade import write_json_atomic
from hf_tinysaver.workflows.search import SaverCandidate, rank_savers

BASE_MACS = 1e9


def synthetic_records(name: str, labels: np.ndarray, signal: float, num_labels: int, seed: int) -> Records:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(labels), num_labels, generator=generator) * 2
    logits += signal * torch.nn.functional.one_hot(torch.from_numpy(labels), num_labels)
    logits = logits.numpy()
    return Records(logits, logits.argmax(1), labels, name, name, "synthetic", "train")


def median_seconds(function, repeats: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of `function()` (CPU time is what other jobs on the machine do not inflate)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", "-k", type=int, default=50)
    parser.add_argument("--samples", "-n", type=int, default=50_000)
    parser.add_argument("--num-labels", type=int, default=10)
    parser.add_argument("--repeats", "-r", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads: the per-candidate arrays are small, and on a shared machine OpenMP's spinning makes more "
        "threads slower.",
    )
    parser.add_argument("--results-file", default=str(Path(__file__).parent / "results" / "search_speed.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.num_labels, args.samples)
    base = synthetic_records("base", labels, 8.0, args.num_labels, seed=0)
    pool = [
        (f"candidate-{i:02d}", float(rng.uniform(0.02, 0.9)) * BASE_MACS, float(rng.uniform(2.0, 8.0)))
        for i in range(args.candidates)
    ]
    in_memory = [
        SaverCandidate(name, macs, synthetic_records(name, labels, signal, args.num_labels, seed=i + 1))
        for i, (name, macs, signal) in enumerate(pool)
    ]

    with tempfile.TemporaryDirectory() as cache:
        for candidate in in_memory:
            candidate.records.save(Path(cache) / f"{candidate.name}.npz")

        def from_disk() -> list[SaverCandidate]:
            return [
                SaverCandidate(c.name, c.macs, lambda path=Path(cache) / f"{c.name}.npz": Records.load(path))
                for c in in_memory
            ]

        rank_savers(base, BASE_MACS, in_memory)  # warm-up: imports, first-call allocations
        scoring = median_seconds(lambda: rank_savers(base, BASE_MACS, in_memory), args.repeats)
        loading = median_seconds(lambda: rank_savers(base, BASE_MACS, from_disk()), args.repeats)
        screened = rank_savers(base, BASE_MACS, in_memory, prescreen=True)
        prescreen = median_seconds(lambda: rank_savers(base, BASE_MACS, in_memory, prescreen=True), args.repeats)

    result = rank_savers(base, BASE_MACS, in_memory)
    output = {
        "candidates": args.candidates,
        "samples": args.samples,
        "num_labels": args.num_labels,
        "repeats": args.repeats,
        "max_drops": list(result.max_drops),
        "scoring_seconds": scoring[0],
        "scoring_cpu_seconds": scoring[1],
        "scoring_ms_per_candidate": 1000 * scoring[0] / args.candidates,
        "load_and_scoring_seconds": loading[0],
        "load_and_scoring_cpu_seconds": loading[1],
        "prescreen_scoring_seconds": prescreen[0],
        "prescreen_skipped": sum(c.status == "skipped" for c in screened.candidates),
        "under_2_seconds": scoring[0] < 2.0,
        "winner": result.winner.name if result.winner else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # other jobs on the machine slow the timing down
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    output[PROVENANCE_KEY] = provenance(argv=["python", *sys.argv])
    write_json_atomic(args.results_file, output)
    print(
        f"{args.candidates} candidates x {args.samples} samples: scoring {scoring[0]:.3f} s ({scoring[1]:.3f} s CPU), "
        f"with loading {loading[0]:.3f} s, pre-screened {prescreen[0]:.3f} s ({output['prescreen_skipped']} skipped)"
    )


if __name__ == "__main__":
    main()
