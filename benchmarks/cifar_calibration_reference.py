"""Calibrates the real CIFAR-10 pair ResNet-20 -> ResNet-56 and compares with the reference figures of the design notes.

Usage:
    python benchmarks/cifar_calibration_reference.py [--shared ../shared] [--cache-dir DIR] [--batch-size 256]
        [--results-file benchmarks/results/cifar_calibration_reference.json]

Records both models on `test[:50%]` (calibration) and `test[50%:]` (held out) of `../shared/datasets/cifar10-jpeg`
with `hf_tinysaver.records.record` (cached: a second run only calibrates), then runs every objective on the
calibration half and applies the thresholds to the held-out half. MACs come from `torch.utils.flop_counter`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_tinysaver import CifarResNetConfig, CifarResNetForImageClassification, TinySaverImageProcessor
from hf_tinysaver.calibration.simulation import CascadeSimulation
from hf_tinysaver.provenance import PROVENANCE_KEY, provenance
from hf_tinysaver.records import pair_from_records, record
from hf_tinysaver.storage import write_json_atomic

PREPROCESSING = {
    "input_size": [3, 32, 32],
    "resize": "fixed",
    "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
WEIGHTS = {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}


def load_resnet(shared: Path, depth: int) -> CifarResNetForImageClassification:
    checkpoint = torch.load(
        shared / "models" / "cifar10-resnet" / WEIGHTS[depth], map_location="cpu", weights_only=True
    )
    state_dict = {key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()}
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=depth))
    model.load_state_dict(state_dict, strict=True)
    model.name_or_path = f"cifar10-resnet{depth}"
    return model.eval()


def count_macs(model: torch.nn.Module) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops() / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--results-file", default=str(Path(__file__).parent / "results" / "cifar_calibration_reference.json")
    )
    args = parser.parse_args()
    shared = Path(args.shared)
    dataset = str(shared / "datasets" / "cifar10-jpeg")
    processor = TinySaverImageProcessor(preprocessing=PREPROCESSING)
    saver, base = load_resnet(shared, 20), load_resnet(shared, 56)
    relative_saver_macs = count_macs(saver) / count_macs(base)

    records, record_seconds = {}, {}
    for split in ("test[:50%]", "test[50%:]"):
        for name, model in (("saver", saver), ("base", base)):
            start = time.perf_counter()
            records[name, split] = record(
                model, processor, dataset, split=split, batch_size=args.batch_size, cache_dir=args.cache_dir
            )
            record_seconds[f"{name} {split}"] = round(time.perf_counter() - start, 2)
    calibration = pair_from_records(records["saver", "test[:50%]"], records["base", "test[:50%]"], relative_saver_macs)
    held_out = pair_from_records(records["saver", "test[50%:]"], records["base", "test[50%:]"], relative_saver_macs)
    whole = CascadeSimulation(
        [*calibration.confidence, *held_out.confidence],
        [*calibration.saver_predictions, *held_out.saver_predictions],
        [*calibration.base_predictions, *held_out.base_predictions],
        [*calibration.labels, *held_out.labels],
        relative_saver_macs,
    )

    objectives = {
        "paper-no-loss": {},
        "paper-no-loss every distinct confidence": {"grid_size": None},
        "max-drop 0": {"max_drop": 0.0},
        "max-drop 0.5": {"max_drop": 0.5},
        "max-drop 1.0": {"max_drop": 1.0},
        "max-drop 0.5 guaranteed 0.95": {"max_drop": 0.5, "confidence_level": 0.95},
        "agreement 0.01": {"max_disagreement": 0.01},
        "agreement 0.01 guaranteed 0.95": {"max_disagreement": 0.01, "confidence_level": 0.95},
        "budget 0.5": {"relative_macs": 0.5},
    }
    results = {}
    for label, parameters in objectives.items():
        objective = label.split(" ")[0]
        chosen = calibration.calibrate(objective, **parameters)
        applied = held_out.evaluate(chosen.threshold)
        results[label] = {
            "calibration": chosen.to_dict()
            | {"accuracy_drop_points": chosen.accuracy_drop, "delta_c": chosen.delta_c},
            "held_out": {
                "exit_rate": applied.exit_rate,
                "accuracy": applied.accuracy,
                "base_accuracy": applied.base_accuracy,
                "accuracy_drop_points": applied.accuracy_drop,
                "relative_macs": applied.relative_macs,
                "agreement": applied.agreement,
            },
        }
    output = {
        "pair": "cifar10-resnet20 -> cifar10-resnet56",
        "relative_saver_macs": relative_saver_macs,
        "saver_accuracy_test": whole.saver_accuracy,
        "base_accuracy_test": whole.base_accuracy,
        "oracle_relative_macs_test": whole.oracle_relative_macs(),
        "record_seconds": record_seconds,
        "objectives": results,
    }
    output[PROVENANCE_KEY] = provenance(argv=["python", *sys.argv])
    print(json.dumps(output, indent=2))
    write_json_atomic(args.results_file, output)


if __name__ == "__main__":
    main()
