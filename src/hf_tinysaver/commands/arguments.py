"""Argument definitions shared by the `tinysaver` subcommands, and the argparse `type`s that check numbers.

Nothing here imports torch or transformers at module level: building the parser (`tinysaver --help`) stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

CONFIDENCE_CHOICES = ("max_prob", "margin", "entropy")
MODEL_HELP = "Zoo name, local model folder or Hub id."


def number_type(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    meaning: str = "",
) -> Callable[[str], float]:
    """An argparse `type` that accepts only finite numbers within the bounds (no `inf`, `nan`).

    Args:
        low: Lower bound, or None.
        high: Upper bound, or None.
        low_open: Whether `low` itself is excluded.
        high_open: Whether `high` itself is excluded.
        meaning: What the number is, appended to the message.

    Returns:
        The parser, which raises `argparse.ArgumentTypeError` (argparse's usage error, exit code 2) with the rule.
    """

    def parse(text: str) -> float:
        from ..calibration.checks import check_number, number_rule  # on use: building the parser stays light

        try:
            return check_number("value", float(text), low, high, low_open, high_open)
        except ValueError:
            rule = number_rule(low, high, low_open, high_open)
            wanted = rule if rule == "a finite number" else f"a finite number {rule}"
            wanted += f" ({meaning})" if meaning else ""
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None

    return parse


def threshold_type(text: str) -> float:
    """An argparse `type` for an exit threshold, checked by the cascade config's own `validate_threshold`."""
    from ..models.configuration_tinysaver import validate_threshold

    try:
        value = float(text)
    except ValueError:
        value = text
    try:
        return validate_threshold(value, name="the threshold")
    except ValueError as error:
        message = str(error).replace(f"got {value!r} of type str", f"got {text!r}")
        raise argparse.ArgumentTypeError(message.replace(f"got {value!r}", f"got {text!r}")) from None


MAX_DROP_TYPE = number_type(0.0, 100.0, meaning="allowed top-1 drop in points, e.g. 0.5")
FRACTION_TYPE = number_type(0.0, 1.0, meaning="a fraction of the images")
CONFIDENCE_LEVEL_TYPE = number_type(0.0, 1.0, low_open=True, high_open=True, meaning="a probability, e.g. 0.95")


def data_options(args: argparse.Namespace) -> dict:
    """What the arguments of [`add_data_arguments`] mean to the workflow functions (`record_sub_models`,
    `calibrate_cascade`, `evaluate_cascade`, `search_savers`), as keyword arguments: one place to pass them on."""
    return {
        "batch_size": args.batch_size,
        "assets": args.assets,
        "cache_dir": args.cache_dir,
        "progress": args.progress,
        "shuffle_seed": args.shuffle_seed,
        "label_map": args.label_map,
    }


def add_data_arguments(parser: argparse.ArgumentParser, default_split: str | None = None) -> None:
    """The data, batching, cache and progress flags of `record`, `calibrate`, `evaluate`, `plan` and `search`."""
    parser.add_argument(
        "--dataset",
        "-d",
        required=True,
        help="Zoo dataset (cifar10, imagenet-val-1300), local dataset folder or Hub id.",
    )
    parser.add_argument(
        "--split",
        default=default_split,
        required=default_split is None,
        help="Split with slicing, e.g. 'test[:50%%]'.",
    )
    parser.add_argument(
        "--shuffle-seed",
        type=int,
        default=None,
        metavar="N",
        help="Apply a fixed random permutation (seed N) to the whole named split before --split's slice is taken, "
        "e.g. for data stored sorted by label; 'test[:50%%]' and 'test[50%%:]' under one seed stay disjoint.",
    )
    parser.add_argument(
        "--label-map",
        default=None,
        metavar="JSON",
        help="Dataset class -> model class, by index or name, as JSON text or a JSON file (e.g. "
        '\'{"plane": "airplane"}\'), for a dataset whose class names differ from the model\'s id2label.',
    )
    add_batch_size_argument(parser)
    parser.add_argument(
        "--assets", default=None, help="Folder with the real weights and datasets (default: ../shared)."
    )
    parser.add_argument("--cache-dir", default=None, help="Records cache (default: $TINYSAVER_CACHE or ~/.cache).")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="Hide progress bars.")


def add_batch_size_argument(parser, default: int = 64, help: str = "Images per forward pass.") -> None:
    """`-b/--batch-size`: the forward batch size, the same flag in every subcommand."""
    parser.add_argument("--batch-size", "-b", type=int, default=default, help=help)


def add_saver_and_base_arguments(parser) -> None:
    """`--saver/-s` and `--base` (which has no short flag: `-b` is the batch size)."""
    parser.add_argument("--saver", "-s", required=True, help=MODEL_HELP)
    parser.add_argument("--base", required=True, help=MODEL_HELP)


def add_confidence_argument(parser, help: str | None = None) -> None:
    """`--confidence`: the saver's confidence metric."""
    parser.add_argument("--confidence", default="max_prob", choices=CONFIDENCE_CHOICES, help=help)


def add_overwrite_argument(parser) -> None:
    """`--overwrite`: lets `--out` replace, as a whole, a folder holding files the library did not write."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace --out as a whole even when it holds files hf_tinysaver did not write (they are deleted).",
    )


__all__ = [
    "CONFIDENCE_CHOICES",
    "CONFIDENCE_LEVEL_TYPE",
    "FRACTION_TYPE",
    "MAX_DROP_TYPE",
    "MODEL_HELP",
    "add_batch_size_argument",
    "add_confidence_argument",
    "add_data_arguments",
    "add_overwrite_argument",
    "add_saver_and_base_arguments",
    "data_options",
    "number_type",
    "threshold_type",
]
