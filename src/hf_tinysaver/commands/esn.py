"""`tinysaver esn-train`: train an Exit Sequence Network on a frozen saver and base, calibrate it, save it.

Example:

```bash
tinysaver esn-train --saver cifar10-resnet20 --base cifar10-resnet56 --dataset cifar10 \\
    --train-split train --calib-split "test[:50%]" --eval-split "test[50%:]" \\
    --width 128 --layers 1 --epochs 20 --max-drop 0.5 --out esn-resnet20-resnet56 --results-file esn.json
```
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from ..labels import dataset_labels, warn_label_order
from ..models.modeling_tinysaver_esn import TinySaverESNForImageClassification
from ..storage import atomic_folder, check_output_folder, write_json_atomic
from ..workflows.esn import (
    cached_exit_features,
    evaluate_exits,
    exit_records,
    search_exit_thresholds,
    train_exit_sequence,
)


def load_split(dataset: str, split: str, shuffle_seed: int | None = None):
    """A dataset split from a local folder, a zoo name or the Hub (offline: the local cache).

    With `shuffle_seed`, the whole named split is permuted with that seed before the slice is taken.
    """
    import datasets

    if shuffle_seed is not None:
        from ..workflows.cascade import load_dataset_split

        return load_dataset_split(dataset, split, shuffle_seed=shuffle_seed)
    if os.path.isdir(dataset):
        return datasets.load_dataset(dataset, split=split)
    try:
        from hf_tinysaver.zoo import ZOO_DATASETS, load_zoo_dataset
    except ImportError:
        ZOO_DATASETS = {}
    if dataset in ZOO_DATASETS:
        return load_zoo_dataset(dataset, split)
    return datasets.load_dataset(dataset, split=split)


def run(args: argparse.Namespace) -> int:
    if args.out:
        check_output_folder(args.out, overwrite=args.overwrite, kind="esn", option="--out")
    torch.manual_seed(args.seed)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    exit_stages = [name.strip() for name in args.exit_stages.split(",")] if args.exit_stages else None
    from ..models.modeling_tinysaver import find_preprocessing
    from ..workflows.cascade import load_model

    # Loaded here so that a name that is no zoo name, folder or Hub id gets the library's one-line error.
    saver, base = load_model(args.saver), load_model(args.base)
    model = TinySaverESNForImageClassification.from_saver_and_base(
        saver,
        base,
        saver_preprocessing=find_preprocessing(saver, args.saver, role="saver"),
        base_preprocessing=find_preprocessing(base, args.base, role="base"),
        esn_width=args.width,
        esn_layers=args.layers,
        esn_num_heads=args.heads,
        esn_mlp_ratio=args.mlp_ratio,
        exit_stages=exit_stages,
        confidence=args.confidence,
    )
    say(f"exit stages {model.config.exit_stages}; relative MACs per answer point {model.config.relative_exit_macs}")

    def features_of(split: str):
        dataset = load_split(args.dataset, split, args.shuffle_seed)
        say(f"features of {args.dataset} {split} ({len(dataset)} images)")
        labels, _ = dataset_labels(
            dataset, args.label_column, model.config.id2label, args.label_map, where=f"the split {split!r}"
        )
        if labels is None:
            raise ValueError(f"Every label of the split {split!r} is -1 (no label); the ESN needs labelled splits.")
        features = cached_exit_features(
            model,
            dataset,
            cache_dir=args.cache_dir,
            batch_size=args.batch_size,
            image_column=args.image_column,
            label_column=args.label_column,
            progress=not args.quiet,
        )
        # The cache holds the dataset's own labels; the ESN trains and calibrates on the model's class ids.
        features.labels = torch.as_tensor(labels, dtype=torch.long)
        return features

    train_features = features_of(args.train_split)
    calib_features = features_of(args.calib_split)
    warn_label_order(calib_features.labels.numpy(), len(model.config.id2label), args.calib_split)
    eval_features = features_of(args.eval_split) if args.eval_split else None

    losses = train_exit_sequence(
        model,
        train_features,
        epochs=args.epochs,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.train_batch_size,
        seed=args.seed,
        on_epoch_end=lambda epoch, loss: say(f"epoch {epoch + 1}/{args.epochs} loss {loss:.4f}"),
    )
    results = calibrate_and_evaluate(
        model, calib_features, eval_features, args.max_drop, args.budget_steps, args.allow_no_savings
    )
    results.update(
        {
            "saver": str(args.saver),
            "base": str(args.base),
            "dataset": str(args.dataset),
            "splits": {"train": args.train_split, "calib": args.calib_split, "eval": args.eval_split or None},
            "shuffle_seed": args.shuffle_seed,
            "esn_shape": {
                "width": args.width,
                "layers": args.layers,
                "heads": args.heads,
                "mlp_ratio": args.mlp_ratio,
            },
            "training": {
                "epochs": args.epochs,
                "lr": args.lr,
                "weight_decay": args.weight_decay,
                "batch_size": args.train_batch_size,
                "seed": args.seed,
                "final_loss": losses[-1] if losses else None,
            },
        }
    )
    model.config.calibration.update(
        {
            "dataset": str(args.dataset),
            "split": args.calib_split,
            "shuffle_seed": args.shuffle_seed,
            "saver": str(args.saver),
            "base": str(args.base),
        }
    )
    if args.out:
        with atomic_folder(args.out, overwrite=args.overwrite, kind="esn", option="--out") as folder:
            model.save_pretrained(folder)
        results["out"] = str(args.out)
        say(f"saved to {args.out}")
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
        results["pushed_to"] = args.push_to_hub
    if args.results_file:
        write_json_atomic(args.results_file, results)
    print(json.dumps(results, indent=2))
    return 0


def calibrate_and_evaluate(
    model: TinySaverESNForImageClassification,
    calib_features,
    eval_features,
    max_drop: float,
    budget_steps: int = 10,
    allow_no_savings: bool = False,
) -> dict[str, Any]:
    """Sets the model's thresholds from the calibration features and measures ESN and plain TinySaver.

    Args:
        model: The trained ESN cascade; its `threshold`, `exit_thresholds` and `calibration` are set in place.
        calib_features: Calibration-split features.
        eval_features: Held-out features, or `None`.
        max_drop: Allowed accuracy drop (percentage points).
        budget_steps: Resolution of the drop budget split between exits.
        allow_no_savings: Keep thresholds whose ESN cascade costs as much as the base alone or more; without it
            they raise `InfeasibleTargetError` (and the model is left unchanged).

    Returns:
        A dict with the thresholds and, for `esn` and the plain `tinysaver` cascade (same saver, same objective),
        the calibration and held-out [`evaluate_exits`] results.
    """
    config = model.config
    plain_macs = [config.saver_macs, config.saver_macs + config.base_macs]
    calib_records = exit_records(model, calib_features)
    esn_search = search_exit_thresholds(calib_records, config.exit_macs, config.base_macs, max_drop, budget_steps)
    plain_search = search_exit_thresholds(calib_records.saver_only(), plain_macs, config.base_macs, max_drop)
    calibrated = esn_search.calibration
    if calibrated["relative_macs"] >= 1.0 and not allow_no_savings:
        from ..calibration.simulation import InfeasibleTargetError

        raise InfeasibleTargetError(
            f"The best ESN thresholds for a {max_drop}-point drop on these {calibrated['num_images']} calibration "
            f"images cost {calibrated['relative_macs']:.4f}x the base alone (exit rates {calibrated['exit_rates']}) "
            "and save nothing: no exit is accurate enough where it is confident. What would help: a larger "
            "--max-drop, more training epochs or calibration images, a more accurate saver; or pass "
            "--allow-no-savings (allow_no_savings=True) to keep these thresholds anyway."
        )
    config.threshold = esn_search.thresholds[0]
    config.exit_thresholds = esn_search.thresholds[1:]
    # The keys the plain cascade's calibration record uses (read by the model card), plus the ESN's own.
    config.calibration = {
        "objective": "max-drop",
        "max_drop": max_drop,
        "threshold": config.threshold,
        "exit_rate": calibrated["exit_rates"][0],
        "accuracy": calibrated["accuracy"],
        "base_accuracy": calibrated["base_accuracy"],
        "relative_macs": calibrated["relative_macs"],
        "n": calibrated["num_images"],
        "exit_thresholds": config.exit_thresholds,
        "exit_rates": calibrated["exit_rates"],
        "allowed_drops": esn_search.allowed_drops,
        "search": "sequential (first exit first) per drop-budget split; fewest MACs",
    }
    results: dict[str, Any] = {
        "max_drop": max_drop,
        "relative_exit_macs": config.relative_exit_macs,
        "esn": {
            "thresholds": esn_search.thresholds,
            "allowed_drops": esn_search.allowed_drops,
            "calibration": esn_search.calibration,
        },
        "tinysaver": {"thresholds": plain_search.thresholds, "calibration": plain_search.calibration},
    }
    if eval_features is not None:
        eval_records = exit_records(model, eval_features)
        results["esn"]["eval"] = evaluate_exits(
            eval_records, esn_search.thresholds, config.exit_macs, config.base_macs
        )
        results["tinysaver"]["eval"] = evaluate_exits(
            eval_records.saver_only(), plain_search.thresholds, plain_macs, config.base_macs
        )
    return results


__all__ = ["calibrate_and_evaluate", "load_split", "run"]
