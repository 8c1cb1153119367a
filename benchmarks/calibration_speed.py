"""Time to score one saver/base pair for every calibration objective (the saver search scores ~50 candidates).

Usage:
    python benchmarks/calibration_speed.py [--samples 50000] [--num-labels 10] [--repeats 20]
        [--results-file benchmarks/results/calibration_speed.json]

The per-sample data are synthetic (random logits with a label-dependent signal): the timing depends only on the
sample count and the number of classes, not on the values. Reported: the median over repeats, in milliseconds, of
(a) all objectives from the saver's confidences and both models' predictions, (b) the same plus the guarantee-mode
objectives, and (c) everything from the raw float32 logits, including `compute_confidence`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hf_tinysaver.calibration.simulation import CascadeSimulation
from hf_tinysaver.provenance import PROVENANCE_KEY, provenance
from hf_tinysaver.storage import write_json_atomic

PLAIN_OBJECTIVES = [
    ("paper-no-loss", {}),
    ("max-drop", {"max_drop": 0.0}),
    ("max-drop", {"max_drop": 0.5}),
    ("max-drop", {"max_drop": 1.0}),
    ("exit-rate", {"exit_rate": 0.8}),
    ("budget", {"relative_macs": 0.5}),
    ("agreement", {"max_disagreement": 0.01}),
]
GUARANTEE_OBJECTIVES = [
    ("max-drop", {"max_drop": 0.5, "confidence_level": 0.95}),
    ("agreement", {"max_disagreement": 0.01, "confidence_level": 0.95}),
]


def synthetic_pair(samples: int, num_labels: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_labels, (samples,), generator=generator)
    one_hot = torch.nn.functional.one_hot(labels, num_labels).float()
    saver_logits = torch.randn(samples, num_labels, generator=generator) * 2 + 5 * one_hot
    base_logits = torch.randn(samples, num_labels, generator=generator) * 2 + 7 * one_hot
    return saver_logits, base_logits.argmax(-1).numpy(), labels.numpy()


def score(simulation: CascadeSimulation, objectives) -> None:
    for objective, parameters in objectives:
        simulation.calibrate(objective, **parameters)
    simulation.delta_c()
    simulation.oracle_relative_macs()


def median_ms(function, repeats: int) -> float:
    function()  # warm-up: imports, first-call allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", "-n", type=int, default=50_000)
    parser.add_argument("--num-labels", type=int, default=10)
    parser.add_argument("--repeats", "-r", type=int, default=20)
    parser.add_argument("--results-file", default=str(Path(__file__).parent / "results" / "calibration_speed.json"))
    args = parser.parse_args()

    saver_logits, base_predictions, labels = synthetic_pair(args.samples, args.num_labels)
    simulation = CascadeSimulation.from_logits(saver_logits, base_predictions, labels, relative_saver_macs=0.3)
    arrays = (simulation.confidence, simulation.saver_predictions, base_predictions, labels)

    def from_arrays(objectives):
        return lambda: score(CascadeSimulation(*arrays, relative_saver_macs=0.3), objectives)

    def from_logits():
        fresh = CascadeSimulation.from_logits(saver_logits, base_predictions, labels, relative_saver_macs=0.3)
        score(fresh, PLAIN_OBJECTIVES)

    results = {
        "samples": args.samples,
        "num_labels": args.num_labels,
        "repeats": args.repeats,
        "objectives": [name for name, _ in PLAIN_OBJECTIVES] + ["delta_c", "oracle_relative_macs"],
        "all_objectives_ms": median_ms(from_arrays(PLAIN_OBJECTIVES), args.repeats),
        "all_objectives_with_guarantees_ms": median_ms(
            from_arrays(PLAIN_OBJECTIVES + GUARANTEE_OBJECTIVES), args.repeats
        ),
        "all_objectives_from_logits_ms": median_ms(from_logits, args.repeats),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # other jobs on the machine slow threaded torch ops down
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    results[PROVENANCE_KEY] = provenance(argv=["python", *sys.argv])
    print(json.dumps(results, indent=2))
    write_json_atomic(args.results_file, results)


if __name__ == "__main__":
    main()
