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
import sys

from .arguments import (
    MAX_DROP_TYPE,
    add_batch_size_argument,
    add_confidence_argument,
    add_overwrite_argument,
    add_saver_and_base_arguments,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "esn-train",
        help="Train, calibrate and save an Exit Sequence Network (multi-exit TinySaver).",
        description=(
            "Trains the ESN of a TinySaver cascade on cached features of the frozen saver and base, picks one "
            "threshold per exit on the calibration split for an allowed accuracy drop, reports held-out numbers "
            "and saves the model (remote code included)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    models = parser.add_argument_group("models")
    add_saver_and_base_arguments(models)
    models.add_argument(
        "--exit-stages",
        default=None,
        help="Comma-separated base stages (module paths) followed by an exit; default: every stage but the last.",
    )
    add_confidence_argument(models)

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="A local dataset folder, a Hub dataset id or a zoo name.")
    data.add_argument("--train-split", default="train", help="Split the ESN is trained on.")
    data.add_argument("--calib-split", default="test[:50%]", help="Split the thresholds are chosen on.")
    data.add_argument(
        "--eval-split", default="test[50%:]", help="Held-out split for the reported numbers ('' to skip)."
    )
    data.add_argument("--image-column", default="image")
    data.add_argument("--label-column", default="label")
    data.add_argument(
        "--shuffle-seed",
        type=int,
        default=None,
        metavar="N",
        help="Apply a fixed random permutation (seed N) to each whole named split before its slice is taken, e.g. "
        "for data stored sorted by label; 'test[:50%%]' and 'test[50%%:]' under one seed stay disjoint.",
    )
    data.add_argument(
        "--label-map",
        default=None,
        metavar="JSON",
        help="Dataset class -> model class, by index or name, as JSON text or a JSON file, for a dataset whose class "
        "names differ from the base's id2label.",
    )
    data.add_argument("--cache-dir", default=None, help="Feature cache (default: $TINYSAVER_CACHE/esn).")

    esn = parser.add_argument_group("ESN")
    esn.add_argument("--width", type=int, default=128, help="Token width d.")
    esn.add_argument("--layers", type=int, default=1, help="Causal transformer blocks L.")
    esn.add_argument("--heads", type=int, default=4, help="Attention heads per block.")
    esn.add_argument("--mlp-ratio", type=float, default=4.0, help="Feed-forward width / token width.")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=20)
    training.add_argument("--lr", type=float, default=1e-3, help="Peak AdamW learning rate.")
    training.add_argument("--weight-decay", type=float, default=0.05)
    training.add_argument("--train-batch-size", type=int, default=256, help="Training batch size of the ESN.")
    add_batch_size_argument(training, default=256, help="Images per forward pass of the frozen saver and base.")
    # The flag's name before -b/--batch-size took the meaning it has in every other command (kept for one release).
    training.add_argument(
        "--feature-batch-size", dest="batch_size", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    training.add_argument("--seed", type=int, default=0)

    calibration = parser.add_argument_group("calibration and output")
    calibration.add_argument(
        "--max-drop",
        type=MAX_DROP_TYPE,
        default=0.5,
        help="Allowed top-1 drop against the base, in percentage points.",
    )
    calibration.add_argument("--budget-steps", type=int, default=10, help="Grid of the drop budget split over exits.")
    calibration.add_argument(
        "--out",
        "-o",
        default=None,
        help="Folder to save the calibrated model to (written beside and swapped in when complete; checked before "
        "training). An existing folder is replaced only when it holds nothing but an earlier ESN, or with --overwrite.",
    )
    add_overwrite_argument(calibration)
    calibration.add_argument(
        "--allow-no-savings",
        action="store_true",
        help="Keep thresholds that cost as much as the base alone or more (an error else).",
    )
    calibration.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="Also push the model there.")
    calibration.add_argument("--results-file", default=None, help="Write the results as JSON to this file.")
    calibration.add_argument(
        "--no-progress", dest="progress", action="store_false", help="Hide progress bars and step messages."
    )
    # The flag's name before --no-progress, which every other command uses (kept for one release).
    calibration.add_argument("--quiet", dest="progress", action="store_false", help=argparse.SUPPRESS)
    parser.set_defaults(func=run_esn_train)


def run_esn_train(args: argparse.Namespace) -> int:
    # torch, the models and the ESN workflow load only when the command runs
    from ..storage import write_json_atomic
    from ..workflows.esn import train_and_calibrate_esn

    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.progress else (lambda *a: None)
    _, results = train_and_calibrate_esn(
        args.saver,
        args.base,
        args.dataset,
        train_split=args.train_split,
        calib_split=args.calib_split,
        eval_split=args.eval_split,
        exit_stages=[name.strip() for name in args.exit_stages.split(",")] if args.exit_stages else None,
        confidence=args.confidence,
        width=args.width,
        layers=args.layers,
        heads=args.heads,
        mlp_ratio=args.mlp_ratio,
        epochs=args.epochs,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.train_batch_size,
        feature_batch_size=args.batch_size,
        seed=args.seed,
        max_drop=args.max_drop,
        budget_steps=args.budget_steps,
        allow_no_savings=args.allow_no_savings,
        shuffle_seed=args.shuffle_seed,
        label_map=args.label_map,
        cache_dir=args.cache_dir,
        image_column=args.image_column,
        label_column=args.label_column,
        out=args.out,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
        progress=args.progress,
        say=say,
    )
    if args.results_file:
        write_json_atomic(args.results_file, results)
    print(json.dumps(results, indent=2))
    return 0


__all__ = ["add_parser", "run_esn_train"]
