"""The benchmark tasks shared by `search.py` and `tradeoff.py`: which zoo models and which halves of which data."""

from __future__ import annotations

from hf_tinysaver.zoo import ZOO_MODELS

MOBILENETS = ["mobilenet-v1-0.25-128", "mobilenet-v1-0.5-160", "mobilenet-v1-0.75-192", "mobilenet-v2-1.0-224"]

TASKS = {
    "cifar10": {
        "dataset": "cifar10",
        "base": "cifar10-resnet56",
        "candidates": ["cifar10-resnet20", "cifar10-resnet32", "cifar10-resnet44"],
        # The trade-off pair; None means: the best of `saver_pool` by the search's ranking on the calibration half.
        "saver": "cifar10-resnet20",
        "saver_pool": None,
        "calibration_split": "test[:50%]",
        "held_out_split": "test[50%:]",
        "batch_size": 250,
    },
    "imagenet": {
        "dataset": "imagenet-val-1300",
        "base": "efficientnet-lite2",
        "candidates": [*MOBILENETS, "efficientnet-lite0", "efficientnet-lite1"],
        "saver": None,
        "saver_pool": MOBILENETS,
        "calibration_split": "validation[:50%]",
        "held_out_split": "validation[50%:]",
        "batch_size": 50,
    },
}


def zoo_models_of(dataset: str) -> list[str]:
    """Every zoo model that classifies this zoo dataset (the static alternatives of a cascade on it)."""
    return [name for name, entry in ZOO_MODELS.items() if entry.dataset == dataset]
