"""The benchmark tasks shared by `search.py` and `tradeoff.py`: which zoo models and which halves of which data."""

from __future__ import annotations

from hf_tinysaver.workflows.demo import DEMO_TASKS
from hf_tinysaver.zoo import ZOO_MODELS

MOBILENETS = [name for name in DEMO_TASKS["imagenet"]["candidates"] if name.startswith("mobilenet-")]


def _benchmark_task(name: str, saver: str | None, saver_pool: list[str] | None, batch_size: int) -> dict:
    # Models, data and halves are the demo's (one definition); the benchmarks add the trade-off pair and batch size.
    demo = DEMO_TASKS[name]
    return {
        "dataset": demo["dataset"],
        "base": demo["base"],
        "candidates": list(demo["candidates"]),
        # The trade-off pair; None means: the best of `saver_pool` by the search's ranking on the calibration half.
        "saver": saver,
        "saver_pool": saver_pool,
        "calibration_split": demo["calibration_split"],
        "held_out_split": demo["evaluation_split"],
        "batch_size": batch_size,
    }


TASKS = {
    "cifar10": _benchmark_task("cifar10", saver="cifar10-resnet20", saver_pool=None, batch_size=250),
    "imagenet": _benchmark_task("imagenet", saver=None, saver_pool=MOBILENETS, batch_size=50),
}


def zoo_models_of(dataset: str) -> list[str]:
    """Every zoo model that classifies this zoo dataset (the static alternatives of a cascade on it)."""
    return [name for name, entry in ZOO_MODELS.items() if entry.dataset == dataset]
