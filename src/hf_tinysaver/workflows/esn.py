"""Training, calibrating and evaluating Exit Sequence Networks from cached features of the frozen models.

The saver and the base never change while an ESN trains, so what the ESN reads (the saver's logits and pre-logits
feature, the pooled output of each tapped base stage, the base's logits) is computed once per dataset split and
cached on disk. Training, threshold search and evaluation then run on those small tensors in seconds.

Exit decisions here use exactly the code path of [`TinySaverESNForImageClassification`]'s stage-by-stage forward
(tokens embedded one exit at a time, each exit computed from the tokens so far), so thresholds chosen on records
carry over to the deployed model.

Example (the `tinysaver esn-train` command runs these steps):

```python
>>> from hf_tinysaver import TinySaverESNForImageClassification
>>> from hf_tinysaver.workflows.esn import cached_exit_features, exit_records, search_exit_thresholds, train_exit_sequence
>>> from hf_tinysaver.zoo import load_zoo_dataset

>>> model = TinySaverESNForImageClassification.from_saver_and_base(
...     "cifar10-resnet20", "cifar10-resnet56", esn_width=128, esn_layers=1
... )  # doctest: +SKIP
>>> train = cached_exit_features(model, load_zoo_dataset("cifar10", "train"))  # doctest: +SKIP
>>> train_exit_sequence(model, train, epochs=20)  # doctest: +SKIP
>>> calib = exit_records(model, cached_exit_features(model, load_zoo_dataset("cifar10", "test[:50%]")))  # doctest: +SKIP
>>> config = model.config  # doctest: +SKIP
>>> search = search_exit_thresholds(calib, config.exit_macs, config.base_macs, max_drop=0.5)  # doctest: +SKIP
>>> config.threshold, config.exit_thresholds = search.thresholds[0], search.thresholds[1:]  # doctest: +SKIP
```
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibration.simulation import CascadeSimulation
from ..models.confidence import compute_confidence
from ..models.image_processing_tinysaver import normalize_preprocessing
from ..models.modeling_tinysaver_esn import TinySaverESNForImageClassification, esn_loss
from ..records import prepare_images
from ..storage import write_file_atomic, write_json_atomic

FEATURES_FORMAT_VERSION = 1


@dataclass
class ExitFeatures:
    """What the ESN reads for each image of a dataset split, computed once from the frozen saver and base.

    Attributes:
        saver_logits: `(n, num_labels)` saver logits in the base's label space.
        saver_features: `(n, saver_dim)` the saver's pre-logits features (token 0).
        stage_features: One `(n, channels)` tensor per ESN exit: the pooled output of the tapped base stage.
        base_logits: `(n, num_labels)` the base's logits.
        labels: `(n,)` class indices.
    """

    saver_logits: torch.Tensor
    saver_features: torch.Tensor
    stage_features: list[torch.Tensor]
    base_logits: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, index: torch.Tensor | slice) -> ExitFeatures:
        return ExitFeatures(
            saver_logits=self.saver_logits[index],
            saver_features=self.saver_features[index],
            stage_features=[feature[index] for feature in self.stage_features],
            base_logits=self.base_logits[index],
            labels=self.labels[index],
        )

    def save(self, path: str | os.PathLike) -> None:
        """Writes the features atomically (a temporary file renamed into place)."""
        path = Path(path)
        state = {
            "format_version": FEATURES_FORMAT_VERSION,
            "saver_logits": self.saver_logits,
            "saver_features": self.saver_features,
            "stage_features": self.stage_features,
            "base_logits": self.base_logits,
            "labels": self.labels,
        }
        write_file_atomic(path, lambda handle: torch.save(state, handle))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExitFeatures:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format_version") != FEATURES_FORMAT_VERSION:
            raise ValueError(f"{path} holds ESN features in another format; delete it to recompute.")
        return cls(
            saver_logits=state["saver_logits"],
            saver_features=state["saver_features"],
            stage_features=list(state["stage_features"]),
            base_logits=state["base_logits"],
            labels=state["labels"],
        )


def default_cache_dir() -> Path:
    """`$TINYSAVER_CACHE/esn` when set, else `~/.cache/hf_tinysaver/esn`."""
    root = os.environ.get("TINYSAVER_CACHE")
    return Path(root) / "esn" if root else Path.home() / ".cache" / "hf_tinysaver" / "esn"


def dataset_fingerprint(dataset: Any, image_column: str = "image", label_column: str = "label") -> str:
    """A hash of the split's content (encoded image bytes and labels), not of its path: a rebuilt dataset changes it."""
    digest = hashlib.sha256()
    arrow = dataset.with_format("arrow")
    for batch in arrow.iter(batch_size=10_000):
        images = batch.column(image_column).combine_chunks()
        if hasattr(images, "field") and images.type.num_fields:
            for value in images.field("bytes"):
                digest.update(value.as_buffer() if value.is_valid else b"\0")
        else:
            digest.update(repr(images.to_pylist()).encode())
        digest.update(np.asarray(batch.column(label_column).to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
    digest.update(str(len(dataset)).encode())
    return digest.hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's parameters and buffers only: features do not depend on its config's bookkeeping keys."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _normalized(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    return normalize_preprocessing(spec) if spec is not None else None


def _features_key(model: TinySaverESNForImageClassification, data_fingerprint: str) -> str:
    description = {
        "format": FEATURES_FORMAT_VERSION,
        "data": data_fingerprint,
        "saver": weights_fingerprint(model.saver),
        "base": weights_fingerprint(model.base),
        "exit_stages": model.config.exit_stages,
        "label_mapping": model.config.label_mapping,
        # Normalised: the same preprocessing spelt with or without its defaults shares the cache.
        "saver_preprocessing": _normalized(model.config.saver_preprocessing),
        "base_preprocessing": _normalized(model.config.base_preprocessing),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:24]


@torch.no_grad()
def extract_exit_features(
    model: TinySaverESNForImageClassification,
    dataset: Any,
    batch_size: int = 256,
    image_column: str = "image",
    label_column: str = "label",
    progress: bool = False,
) -> ExitFeatures:
    """Runs the frozen saver and the whole base once over a dataset split and keeps what the ESN reads.

    Args:
        model: The ESN cascade (only its saver, base, exit stages and preprocessing are used).
        dataset: A `datasets.Dataset` with PIL images and integer labels.
        batch_size: Images per forward pass.
        image_column: Name of the image column.
        label_column: Name of the label column.
        progress: Show a progress bar.

    Returns:
        The split's [`ExitFeatures`].
    """
    processor = model.get_image_processor()
    model.eval()
    parts: dict[str, list] = {"saver_logits": [], "saver_features": [], "base_logits": [], "labels": []}
    stage_parts: list[list[torch.Tensor]] = [[] for _ in model.config.exit_stages]
    labels = torch.as_tensor(dataset[label_column], dtype=torch.long)  # a column read decodes no images
    starts = range(0, len(dataset), batch_size)
    if progress:
        from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS

        starts = tqdm(starts, desc="ESN features", unit="batch")
    device = next(model.parameters()).device
    split = str(dataset.split) if getattr(dataset, "split", None) is not None else None
    for start in starts:
        stop = min(start + batch_size, len(dataset))
        inputs = prepare_images(processor, dataset, image_column, start, stop, split)
        inputs = {name: value.to(device) for name, value in inputs.items()}
        features = model.compute_exit_features(**inputs)
        for name in ("saver_logits", "saver_features", "base_logits"):
            parts[name].append(features[name].float().cpu())
        for index, feature in enumerate(features["stage_features"]):
            stage_parts[index].append(feature.float().cpu())
        parts["labels"].append(labels[start:stop])
    return ExitFeatures(
        saver_logits=torch.cat(parts["saver_logits"]),
        saver_features=torch.cat(parts["saver_features"]),
        stage_features=[torch.cat(chunks) for chunks in stage_parts],
        base_logits=torch.cat(parts["base_logits"]),
        labels=torch.cat(parts["labels"]),
    )


def cached_exit_features(
    model: TinySaverESNForImageClassification,
    dataset: Any,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    image_column: str = "image",
    label_column: str = "label",
    progress: bool = False,
) -> ExitFeatures:
    """[`extract_exit_features`] with a disk cache keyed on the data's content and the frozen models' weights.

    The ESN's own weights are not part of the key: every ESN on the same saver, base and exit stages reuses it.

    Args:
        model: The ESN cascade.
        dataset: A `datasets.Dataset` split.
        cache_dir: Where to keep the features; defaults to [`default_cache_dir`].
        batch_size: Images per forward pass when computing.
        image_column: Name of the image column.
        label_column: Name of the label column.
        progress: Show a progress bar while computing.

    Returns:
        The split's [`ExitFeatures`], loaded or computed and stored.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"features-{_features_key(model, dataset_fingerprint(dataset, image_column, label_column))}.pt"
    if path.exists():
        return ExitFeatures.load(path)
    features = extract_exit_features(model, dataset, batch_size, image_column, label_column, progress)
    features.save(path)
    return features


def train_exit_sequence(
    model: TinySaverESNForImageClassification,
    features: ExitFeatures,
    epochs: int = 20,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.05,
    batch_size: int = 256,
    warmup_fraction: float = 0.05,
    seed: int = 0,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Trains the ESN (only) on cached features with AdamW and a cosine schedule.

    The objective is [`esn_loss`]: cross-entropy summed over the ESN exits, each image weighted by
    `2 * (1 - saver max probability)`. The saver and the base are frozen and untouched.

    Args:
        model: The ESN cascade; `model.esn` is trained in place.
        features: Training-split features from [`cached_exit_features`].
        epochs: Passes over the features.
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay (matrices only, not norms or biases).
        batch_size: Images per step.
        warmup_fraction: Fraction of the steps with a linear warm-up.
        seed: Seed of the initial shuffles.
        on_epoch_end: Called with `(epoch, mean loss)` after each epoch.

    Returns:
        The mean training loss of each epoch.
    """
    if len(features) == 0:
        raise ValueError("No training features: the training split is empty.")
    model.saver.requires_grad_(False)
    model.base.requires_grad_(False)
    esn = model.esn
    device = next(esn.parameters()).device
    decayed = [p for p in esn.parameters() if p.ndim >= 2]
    not_decayed = [p for p in esn.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": weight_decay}, {"params": not_decayed, "weight_decay": 0.0}],
        lr=learning_rate,
    )
    steps_per_epoch = math.ceil(len(features) / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    warmup_steps = int(warmup_fraction * total_steps)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    epoch_losses = []
    try:
        for epoch in range(epochs):
            order = torch.randperm(len(features), generator=generator)
            total, seen = 0.0, 0
            for start in range(0, len(features), batch_size):
                batch = features.subset(order[start : start + batch_size])
                saver_logits = batch.saver_logits.to(device)
                exit_logits = esn(
                    [batch.saver_features.to(device), *[f.to(device) for f in batch.stage_features]], saver_logits
                )
                loss = esn_loss(exit_logits, batch.labels.to(device), saver_logits)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
            epoch_losses.append(total / seen)
            if on_epoch_end is not None:
                on_epoch_end(epoch, epoch_losses[-1])
    finally:
        model.eval()
    return epoch_losses


@dataclass
class ExitRecords:
    """Per-image confidence and prediction at every answer point, for threshold search and evaluation.

    Attributes:
        confidences: `(n, E)` float64: the saver's confidence, then each ESN exit's (`E = P + 1` exits).
        predictions: `(n, E + 1)` int: the prediction at each exit, then the base's final prediction.
        labels: `(n,)` int class indices.
    """

    confidences: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        """`(n, E + 1)` bool: whether each answer point is right on each image."""
        return self.predictions == self.labels[:, None]

    def saver_only(self) -> ExitRecords:
        """The records of the plain TinySaver cascade: the saver, then the base."""
        return ExitRecords(self.confidences[:, :1], self.predictions[:, [0, -1]], self.labels)


@torch.no_grad()
def exit_records(
    model: TinySaverESNForImageClassification, features: ExitFeatures, batch_size: int = 4096
) -> ExitRecords:
    """Confidence and prediction of every exit on every image, computed as the stage-by-stage forward computes them.

    Args:
        model: The trained ESN cascade.
        features: Features of the split from [`cached_exit_features`].
        batch_size: Images per chunk.

    Returns:
        The split's [`ExitRecords`].
    """
    model.eval()
    esn = model.esn
    device = next(esn.parameters()).device
    metric = model.config.confidence
    confidences, predictions = [], []
    for start in range(0, len(features), batch_size):
        chunk = features.subset(slice(start, start + batch_size))
        saver_logits = chunk.saver_logits.to(device)
        chunk_confidences = [
            compute_confidence(saver_logits, metric, model.config.confidence_temperature).cpu().numpy()
        ]
        chunk_predictions = [saver_logits.argmax(dim=-1).cpu().numpy()]
        tokens = esn.embed(0, chunk.saver_features.to(device)).unsqueeze(1)
        for exit_number, stage_feature in enumerate(chunk.stage_features, start=1):
            tokens = torch.cat([tokens, esn.embed(exit_number, stage_feature.to(device)).unsqueeze(1)], dim=1)
            logits = esn.exit_logits(tokens, saver_logits)
            chunk_confidences.append(compute_confidence(logits, metric).cpu().numpy())
            chunk_predictions.append(logits.argmax(dim=-1).cpu().numpy())
        chunk_predictions.append(chunk.base_logits.argmax(dim=-1).numpy())
        confidences.append(np.stack(chunk_confidences, axis=1))
        predictions.append(np.stack(chunk_predictions, axis=1))
    return ExitRecords(
        confidences=np.concatenate(confidences).astype(np.float64),
        predictions=np.concatenate(predictions).astype(np.int64),
        labels=features.labels.numpy().astype(np.int64),
    )


def assign_exits(confidences: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Answer point of each image: the first exit whose confidence is strictly greater than its threshold, else `E`.

    Args:
        confidences: `(n, E)` confidences of the exits in order.
        thresholds: `E` thresholds.

    Returns:
        `(n,)` ints in `0..E` (`E` = the base's final answer).
    """
    passes = confidences > np.asarray(thresholds, dtype=np.float64)[None, :]
    passes = np.concatenate([passes, np.ones((passes.shape[0], 1), dtype=bool)], axis=1)
    return passes.argmax(axis=1)


def evaluate_exits(
    records: ExitRecords, thresholds: Sequence[float], exit_macs: Sequence[int], base_macs: int
) -> dict[str, Any]:
    """Accuracy, accuracy drop against the base, exit rates and relative MACs of a threshold setting.

    Args:
        records: Records of the split to evaluate.
        thresholds: One threshold per exit (the saver's first).
        exit_macs: Cumulative MACs of each answer point (each exit, then the final base answer).
        base_macs: MACs of the base alone, the unit of `relative_macs`.

    Returns:
        A dict with `accuracy`, `base_accuracy`, `drop` (percentage points), `exit_rates` (one per answer point),
        `relative_macs` (mean MACs per image / base MACs) and `num_images`.
    """
    num_points = records.predictions.shape[1]
    if len(thresholds) != num_points - 1 or len(exit_macs) != num_points:
        raise ValueError(
            f"Records have {num_points - 1} exits: give {num_points - 1} thresholds and {num_points} exit_macs."
        )
    exit_index = assign_exits(records.confidences, thresholds)
    correct = records.correct
    count = len(exit_index)
    right = int(correct[np.arange(count), exit_index].sum())
    base_right = int(correct[:, -1].sum())
    return {
        "accuracy": right / count,
        "base_accuracy": base_right / count,
        "drop": 100.0 * (base_right - right) / count,  # from counts: no float residue on a drop exactly at target
        "exit_rates": (np.bincount(exit_index, minlength=num_points) / len(exit_index)).tolist(),
        "relative_macs": float(np.asarray(exit_macs, dtype=np.float64)[exit_index].mean() / base_macs),
        "num_images": int(len(exit_index)),
    }


def sequential_thresholds(records: ExitRecords, allowed_drops: Sequence[float]) -> list[float]:
    """Thresholds chosen exit by exit, first exit first, with the `max-drop` objective of `hf_tinysaver.calibration.simulation`.

    Exit `e` takes the lowest threshold for which the accuracy of the whole cascade, with exits `0..e` set and every
    later image answered by the base, stays at least `base accuracy - allowed_drops[e]` points. Each step is the
    plain cascade's calibration ([`~calibration.CascadeSimulation`], `max-drop`) on the images still running, exit
    `e` in the saver's role and the base's final answer in the base's, given what the earlier exits already cost.

    Args:
        records: Calibration records.
        allowed_drops: Cumulative allowed accuracy drop (percentage points) after each exit; non-decreasing.

    Returns:
        One threshold per exit.
    """
    confidences, predictions, labels = records.confidences, records.predictions, records.labels
    count, num_exits = confidences.shape
    if len(allowed_drops) != num_exits:
        raise ValueError(f"Expected {num_exits} allowed drops, got {len(allowed_drops)}.")
    if np.any(np.diff(np.asarray(allowed_drops, dtype=np.float64)) < 0):
        raise ValueError(f"allowed_drops must be non-decreasing, got {list(allowed_drops)}.")
    correct = records.correct
    answered = np.zeros(count, dtype=bool)
    lost = 0  # right answers of the base that earlier exits turned wrong, net of the reverse
    thresholds = []
    for exit_number in range(num_exits):
        pending = ~answered
        pending_count = int(pending.sum())
        if pending_count == 0:
            thresholds.append(1.0)
            continue
        # Integer loss budget, rounded as `CascadeSimulation` rounds it; >= 0 as the budgets never shrink.
        allowed_loss = math.floor(round(allowed_drops[exit_number] / 100.0 * count, 9)) - lost
        simulation = CascadeSimulation(
            confidences[pending, exit_number],
            predictions[pending, exit_number],
            predictions[pending, -1],
            labels[pending],
        )
        threshold = simulation.calibrate("max-drop", max_drop=100.0 * allowed_loss / pending_count).threshold
        leaving = pending & (confidences[:, exit_number] > threshold)
        lost += int(correct[leaving, -1].sum()) - int(correct[leaving, exit_number].sum())
        answered |= leaving
        thresholds.append(threshold)
    return thresholds


@dataclass
class ThresholdSearchResult:
    """Outcome of [`search_exit_thresholds`] on the calibration split.

    Attributes:
        thresholds: One threshold per exit, the saver's first.
        allowed_drops: The cumulative drop budget each exit was given (points).
        calibration: [`evaluate_exits`] of `thresholds` on the calibration split.
        candidates: How many budget schedules were tried.
    """

    thresholds: list[float]
    allowed_drops: list[float]
    calibration: dict[str, Any]
    candidates: int = 1


def search_exit_thresholds(
    records: ExitRecords, exit_macs: Sequence[int], base_macs: int, max_drop: float, budget_steps: int = 10
) -> ThresholdSearchResult:
    """Per-exit thresholds with the fewest MACs whose calibration accuracy is within `max_drop` points of the base.

    Each candidate is a sequential search ([`sequential_thresholds`], first exit first) under a budget schedule: exit
    `e` may use a cumulative fraction of `max_drop` (fractions on a grid of `1 / budget_steps`, non-decreasing, the
    last exit always the whole drop). Letting the first exit spend the whole budget (the greedy schedule) is one of
    the candidates; the schedule with the fewest MACs on the calibration split wins (ties: the higher accuracy).

    Args:
        records: Calibration records ([`exit_records`]).
        exit_macs: Cumulative MACs of each answer point (`config.exit_macs`).
        base_macs: MACs of the base alone.
        max_drop: Allowed top-1 accuracy drop against the base, in percentage points.
        budget_steps: Resolution of the budget split between exits.

    Returns:
        A [`ThresholdSearchResult`].

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_tinysaver.workflows.esn import ExitRecords, search_exit_thresholds

    >>> rng = np.random.default_rng(0)
    >>> labels = rng.integers(0, 10, 1000)
    >>> confidences = rng.random((1000, 2))  # the saver's, then one ESN exit's
    >>> right = rng.random((1000, 3)) < [[0.7, 0.75, 0.8]]  # saver, ESN exit, base
    >>> records = ExitRecords(confidences, np.where(right, labels[:, None], (labels[:, None] + 1) % 10), labels)
    >>> result = search_exit_thresholds(records, exit_macs=[30, 70, 130], base_macs=100, max_drop=1.0)
    >>> len(result.thresholds), result.calibration["drop"] <= 1.0
    (2, True)
    ```
    """
    num_exits = records.confidences.shape[1]
    if max_drop < 0:
        raise ValueError(f"max_drop must be >= 0 percentage points, got {max_drop}.")
    best: tuple[tuple[float, float], list[float], list[float], dict] | None = None
    schedules = list(itertools.combinations_with_replacement(range(budget_steps + 1), num_exits - 1))
    for schedule in schedules:
        allowed = [max_drop * step / budget_steps for step in schedule] + [max_drop]
        thresholds = sequential_thresholds(records, allowed)
        result = evaluate_exits(records, thresholds, exit_macs, base_macs)
        key = (result["relative_macs"], -result["accuracy"])
        if best is None or key < best[0]:
            best = (key, thresholds, allowed, result)
    _, thresholds, allowed, result = best
    return ThresholdSearchResult(
        thresholds=thresholds, allowed_drops=allowed, calibration=result, candidates=len(schedules)
    )


__all__ = [
    "ExitFeatures",
    "ExitRecords",
    "ThresholdSearchResult",
    "assign_exits",
    "cached_exit_features",
    "dataset_fingerprint",
    "default_cache_dir",
    "evaluate_exits",
    "exit_records",
    "extract_exit_features",
    "search_exit_thresholds",
    "sequential_thresholds",
    "train_exit_sequence",
    "weights_fingerprint",
    "write_json_atomic",
]
