"""ESN vs. plain TinySaver on CIFAR-10: saver ResNet-20, base ResNet-56 (real pretrained weights from ../shared).

For each ESN shape (width d in {32, 128}, layers L in {0, 1, 2}) the ESN is trained on the train split (features of
the frozen models cached once), thresholds are searched on `test[:50%]` for allowed drops of 0.5 and 1.0 points, and
everything is measured on `test[50%:]`. The plain TinySaver baseline (same saver, same max-drop objective, same MAC
counts) is calibrated and measured on the same splits.

    python benchmarks/esn_cifar10.py                      # features once (~8 min, 1 thread), then ~5 min
    python benchmarks/esn_cifar10.py --epochs 2 --widths 32 --layers 0 --out /tmp/quick.json   # smoke run

Writes `benchmarks/results/esn_cifar10.json` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from pathlib import Path

import torch

from hf_tinysaver import CifarResNetConfig, CifarResNetForImageClassification, TinySaverESNForImageClassification
from hf_tinysaver.calibration.simulation import CascadeSimulation
from hf_tinysaver.provenance import PROVENANCE_KEY, provenance
from hf_tinysaver.storage import write_json_atomic
from hf_tinysaver.workflows.esn import cached_exit_features, calibrate_and_evaluate, train_exit_sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYSAVER_ASSETS", REPO_ROOT.parent / "shared"))
CIFAR_WEIGHTS = {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}
CIFAR_PREPROCESSING = {
    "input_size": [3, 32, 32],
    "resize": "fixed",
    "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def load_cifar_resnet(depth: int) -> CifarResNetForImageClassification:
    """The pretrained CIFAR-10 ResNet from the zoo when available, else straight from the weight file in ../shared."""
    try:
        from hf_tinysaver.zoo import load_zoo_model

        return load_zoo_model(f"cifar10-resnet{depth}").eval()
    except ImportError:
        pass
    path = SHARED / "models" / "cifar10-resnet" / CIFAR_WEIGHTS[depth]
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: put the shared assets beside the checkout or set TINYSAVER_ASSETS."
        )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=depth))
    model.load_state_dict({key.removeprefix("module."): value for key, value in state_dict.items()})
    return model.eval()


def load_cifar10(split: str):
    try:
        from hf_tinysaver.zoo import load_zoo_dataset

        return load_zoo_dataset("cifar10", split)
    except ImportError:
        import datasets

        return datasets.load_dataset(str(SHARED / "datasets" / "cifar10-jpeg"), split=split)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-drops", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--train-batch-size", type=int, default=256, help="Training batch size of the ESN.")
    parser.add_argument(
        "-b", "--batch-size", type=int, default=256, help="Images per forward pass of the frozen saver and base."
    )
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the ESN is small; 1 is polite).")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--calib-split", default="test[:50%]")
    parser.add_argument("--eval-split", default="test[50%:]")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "esn_cifar10.json"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    saver, base = load_cifar_resnet(20), load_cifar_resnet(56)

    def build(width: int, layers: int) -> TinySaverESNForImageClassification:
        torch.manual_seed(args.seed)
        return TinySaverESNForImageClassification.from_saver_and_base(
            saver,
            base,
            esn_width=width,
            esn_layers=layers,
            esn_num_heads=args.heads,
            saver_preprocessing=CIFAR_PREPROCESSING,
            base_preprocessing=CIFAR_PREPROCESSING,
        )

    # The cached features depend on the frozen models and the exit stages only, not on the ESN's shape.
    probe = build(args.widths[0], args.layers[0])
    features = {}
    for role, split in (("train", args.train_split), ("calib", args.calib_split), ("eval", args.eval_split)):
        split_started = time.perf_counter()
        features[role] = cached_exit_features(
            probe, load_cifar10(split), cache_dir=args.cache_dir, batch_size=args.batch_size, progress=True
        )
        print(f"{role} features ({split}, {len(features[role])} images): {time.perf_counter() - split_started:.0f} s")
    features_seconds = time.perf_counter() - started

    rows = []
    for width, layers in itertools.product(args.widths, args.layers):
        model = build(width, layers)
        train_started = time.perf_counter()
        losses = train_exit_sequence(
            model,
            features["train"],
            epochs=args.epochs,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            batch_size=args.train_batch_size,
            seed=args.seed,
        )
        train_seconds = time.perf_counter() - train_started
        trainable = sum(p.numel() for p in model.esn.parameters())
        eval_plain = CascadeSimulation.from_logits(
            features["eval"].saver_logits,
            features["eval"].base_logits,
            features["eval"].labels,
            relative_saver_macs=model.config.saver_macs / model.config.base_macs,
        )
        for max_drop in args.max_drops:
            result = calibrate_and_evaluate(model, features["calib"], features["eval"], max_drop)
            # Robustness check that favours the baseline: the plain cascade's fewest MACs at the ESN's held-out
            # drop, with its threshold picked on the held-out split itself.
            matched = eval_plain.calibrate("max-drop", max_drop=max(0.0, result["esn"]["eval"]["accuracy_drop"]))
            row = {
                "width": width,
                "layers": layers,
                "max_drop": max_drop,
                "esn_parameters": trainable,
                "train_seconds": round(train_seconds, 1),
                "final_train_loss": losses[-1],
                "relative_exit_macs": result["relative_exit_macs"],
                "esn": result["esn"],
                "tinysaver": result["tinysaver"],
                "relative_macs_esn_over_tinysaver": result["esn"]["eval"]["relative_macs"]
                / result["tinysaver"]["eval"]["relative_macs"],
                "tinysaver_oracle_at_esn_drop": {
                    "relative_macs": matched.relative_macs,
                    "drop": matched.accuracy_drop,
                    "threshold": matched.threshold,
                },
            }
            rows.append(row)
            print(summary_line(row), flush=True)

    config = probe.config
    output = {
        "benchmark": "ESN vs plain TinySaver, CIFAR-10 JPEG, saver ResNet-20, base ResNet-56",
        "splits": {"train": args.train_split, "calib": args.calib_split, "eval": args.eval_split},
        "objective": "max-drop on the calibration split; ESN: sequential per-exit search over drop-budget splits",
        "exit_stages": config.exit_stages,
        "saver_macs": config.saver_macs,
        "base_macs": config.base_macs,
        "training": {
            "epochs": args.epochs,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "batch_size": args.train_batch_size,
            "heads": args.heads,
            "seed": args.seed,
            "optimizer": "AdamW, cosine schedule, 5 % warm-up",
        },
        "accuracy": {
            role: {
                "saver": float((f.saver_logits.argmax(1) == f.labels).float().mean()),
                "base": float((f.base_logits.argmax(1) == f.labels).float().mean()),
                "images": len(f),
            }
            for role, f in features.items()
        },
        "rows": rows,
        "runtime_seconds": {
            # Near zero when the features came from the cache of an earlier run.
            "features_or_cache_load": round(features_seconds, 1),
            "total": round(time.perf_counter() - started, 1),
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    output[PROVENANCE_KEY] = provenance(argv=["python", *sys.argv])
    write_json_atomic(args.out, output)
    print(markdown_table(rows))
    print(f"wrote {args.out}")
    return 0


def summary_line(row: dict) -> str:
    esn, plain = row["esn"]["eval"], row["tinysaver"]["eval"]
    return (
        f"d={row['width']:<4} L={row['layers']} drop<={row['max_drop']}: ESN rel. MACs {esn['relative_macs']:.4f} "
        f"(drop {esn['accuracy_drop']:.2f}) vs TinySaver {plain['relative_macs']:.4f} (drop {plain['accuracy_drop']:.2f}) -> "
        f"{row['relative_macs_esn_over_tinysaver']:.3f}x"
    )


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| d | L | allowed drop | ESN rel. MACs | ESN drop | TinySaver rel. MACs | TinySaver drop | ESN / TinySaver "
        "| TinySaver at ESN's drop (oracle) | ESN exit rates (saver, exit 1, exit 2, base) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        esn, plain = row["esn"]["eval"], row["tinysaver"]["eval"]
        rates = ", ".join(f"{rate:.3f}" for rate in esn["exit_rates"])
        lines.append(
            f"| {row['width']} | {row['layers']} | {row['max_drop']} | {esn['relative_macs']:.4f} | {esn['accuracy_drop']:.2f} "
            f"| {plain['relative_macs']:.4f} | {plain['accuracy_drop']:.2f} | {row['relative_macs_esn_over_tinysaver']:.3f} "
            f"| {row['tinysaver_oracle_at_esn_drop']['relative_macs']:.4f} | {rates} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
