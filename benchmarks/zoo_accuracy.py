#!/usr/bin/env python
"""Top-1 accuracy and MACs of every zoo model on its real dataset; for the MobileNets also the int8 TFLite
interpreter's top-1 on the same crops and how often the float conversion agrees with it.

    python benchmarks/zoo_accuracy.py                      # everything, written to benchmarks/results/zoo_accuracy.json
    python benchmarks/zoo_accuracy.py -m cifar10-resnet20 --limit 500 --results-file /tmp/quick.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hf_tinysaver.models.image_processing_tinysaver import TinySaverImageProcessor
from hf_tinysaver.models.mac_counting import macs_summary
from hf_tinysaver.provenance import PROVENANCE_KEY, provenance
from hf_tinysaver.storage import write_text_atomic
from hf_tinysaver.zoo import ZOO_MODELS, load_zoo_dataset, load_zoo_model, resolve_assets
from hf_tinysaver.zoo.mobilenet_tflite import TFLiteImageClassifier, pixel_values_to_uint8

DEFAULT_RESULTS_FILE = Path(__file__).resolve().parent / "results" / "zoo_accuracy.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--models", "-m", nargs="+", default=list(ZOO_MODELS), metavar="NAME", help="zoo models (default: all)"
    )
    parser.add_argument("--batch-size", "-b", type=int, default=100, help="images per forward pass (default: 100)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of each dataset split")
    parser.add_argument("--assets", "-a", metavar="DIR", default=None, help="assets folder (default: ../shared)")
    parser.add_argument("--num-threads", "-j", type=int, default=None, help="torch / interpreter threads")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 TFLite interpreter runs")
    parser.add_argument(
        "--results-file", default=str(DEFAULT_RESULTS_FILE), help=f"JSON output (default: {DEFAULT_RESULTS_FILE})"
    )
    return parser.parse_args(argv)


def evaluate(name: str, args: argparse.Namespace) -> dict:
    entry = ZOO_MODELS[name]
    model = load_zoo_model(name, assets=args.assets)
    spec = model.config.preprocessing
    processor = TinySaverImageProcessor(preprocessing=spec)
    dataset = load_zoo_dataset(entry.dataset, entry.split, assets=args.assets)
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    interpreter = None
    if entry.family == "mobilenet_tflite" and not args.no_int8:
        interpreter = TFLiteImageClassifier(resolve_assets(args.assets) / entry.asset, num_threads=args.num_threads)

    labels, predictions, int8_predictions = [], [], []
    start = time.perf_counter()
    for batch in dataset.iter(batch_size=args.batch_size):
        pixel_values = processor(images=batch["image"], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            predictions.append(model(pixel_values).logits.argmax(-1).numpy())
        labels.append(np.asarray(batch["label"]))
        if interpreter is not None:
            int8_predictions.append(interpreter(pixel_values_to_uint8(pixel_values, spec)).argmax(-1))
    seconds = time.perf_counter() - start
    labels, predictions = np.concatenate(labels), np.concatenate(predictions)

    result = {
        "model": name,
        "class": type(model).__name__,
        "dataset": entry.dataset,
        "split": entry.split,
        "n": int(len(labels)),
        "top1": round(100 * float((predictions == labels).mean()), 2),
        "macs": int(model.config.macs),
        "params": int(sum(parameter.numel() for parameter in model.parameters())),
        "input_size": spec["input_size"],
        "seconds": round(seconds, 1),
    }
    if int8_predictions:
        int8_predictions = np.concatenate(int8_predictions)
        result["int8_top1"] = round(100 * float((int8_predictions == labels).mean()), 2)
        result["int8_agreement"] = round(100 * float((int8_predictions == predictions).mean()), 2)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unknown = [name for name in args.models if name not in ZOO_MODELS]
    if unknown:
        print(f"Unknown zoo models {unknown}; choose from {list(ZOO_MODELS)}.", file=sys.stderr)
        return 2
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    results = []
    for name in args.models:
        result = evaluate(name, args)
        results.append(result)
        int8 = (
            f"  int8 {result['int8_top1']:.2f} %  agreement {result['int8_agreement']:.2f} %"
            if "int8_top1" in result
            else ""
        )
        print(
            f"{name:<24} top-1 {result['top1']:6.2f} % on {result['n']:>5}  MACs {macs_summary(result['macs']):>8}"
            f"{int8}  ({result['seconds']:.0f} s)",
            flush=True,
        )
    report = {
        "benchmark": "zoo_accuracy",
        "command": " ".join(["python", "benchmarks/zoo_accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
        "limit": args.limit,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "results": results,
        PROVENANCE_KEY: provenance(
            argv=["python", "benchmarks/zoo_accuracy.py", *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    results_file = write_text_atomic(args.results_file, json.dumps(report, indent=2) + "\n")
    print(f"Wrote {results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
