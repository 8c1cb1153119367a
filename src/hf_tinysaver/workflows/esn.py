"""Training, calibrating and evaluating Exit Sequence Networks from cached features of the frozen models.

The saver and the base never change while an ESN trains, so what the ESN reads (the saver's logits and pre-logits
feature, the pooled output of each tapped base stage, the base's logits) is computed once per dataset split and
cached on disk. Training, threshold search and evaluation then run on those small tensors in seconds.

Exit decisions here use exactly the code path of [`TinySaverESNForImageClassification`]'s stage-by-stage forward
(tokens embedded one exit at a time, each exit computed from the tokens so far), so thresholds chosen on records
carry over to the deployed model.

Example (the steps [`train_and_calibrate_esn`], and so the `tinysaver esn-train` command, runs):

```python
>>> from hf_tinysaver import TinySaverESNForImageClassification
>>> from hf_tinysaver.calibration.multi_exit import search_exit_thresholds
>>> from hf_tinysaver.workflows.esn import cached_exit_features, exit_records, train_exit_sequence
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
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibration.multi_exit import ExitRecords, evaluate_exits, search_exit_thresholds
from ..calibration.record import CalibrationRecord
from ..calibration.simulation import InfeasibleTargetError
from ..labels import dataset_labels, warn_label_order
from ..models.confidence import compute_confidence
from ..models.image_processing_tinysaver import normalize_preprocessing
from ..models.modeling_tinysaver_esn import TinySaverESNForImageClassification, esn_loss
from ..provenance import PROVENANCE_KEY, model_provenance
from ..records import dataset_fingerprint, default_cache_dir, model_fingerprint, prepare_images
from ..sources import dataset_name, load_dataset_split, load_model
from ..storage import atomic_folder, check_output_folder, write_file_atomic

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


def _normalized(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    return normalize_preprocessing(spec) if spec is not None else None


def _features_key(model: TinySaverESNForImageClassification, data_fingerprint: str) -> str:
    description = {
        "format": FEATURES_FORMAT_VERSION,
        "data": data_fingerprint,
        "saver": model_fingerprint(model.saver),
        "base": model_fingerprint(model.base),
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
        cache_dir: Where to keep the features; defaults to `default_cache_dir("esn")` (`$TINYSAVER_CACHE/esn`).
        batch_size: Images per forward pass when computing.
        image_column: Name of the image column.
        label_column: Name of the label column.
        progress: Show a progress bar while computing.

    Returns:
        The split's [`ExitFeatures`], loaded or computed and stored.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir("esn")
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


def labelled_exit_features(
    model: TinySaverESNForImageClassification,
    dataset: Any,
    split: str,
    shuffle_seed: int | None = None,
    label_map: Any = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    image_column: str = "image",
    label_column: str = "label",
    progress: bool = False,
    say: Callable[[str], None] | None = None,
) -> ExitFeatures:
    """Loads a split, checks its labels against the model's classes and returns its (cached) features.

    Args:
        model: The ESN cascade.
        dataset: A zoo dataset name, a local folder, a Hub dataset id or a `datasets.Dataset` (loaded by
            [`~hf_tinysaver.sources.load_dataset_split`]).
        split: The split with optional slicing, e.g. `"test[:50%]"`.
        shuffle_seed: Permute each whole named split with this seed before slicing.
        label_map: Dataset class -> model class (see [`~hf_tinysaver.labels.dataset_labels`]).
        cache_dir: The feature cache (default `$TINYSAVER_CACHE/esn`).
        batch_size: Images per forward pass of the frozen models.
        image_column: Name of the image column.
        label_column: Name of the label column.
        progress: Show a progress bar while computing.
        say: Called with a line of progress text.

    Returns:
        The split's [`ExitFeatures`], whose labels are the model's class ids.

    Raises:
        ValueError: The split has no labels (the ESN needs labelled splits), or its labels do not fit the model.
    """
    data = load_dataset_split(dataset, split, shuffle_seed=shuffle_seed)
    if say is not None:
        say(f"features of {dataset_name(dataset)} {split} ({len(data)} images)")
    labels, _ = dataset_labels(data, label_column, model.config.id2label, label_map, where=f"the split {split!r}")
    if labels is None:
        raise ValueError(f"Every label of the split {split!r} is -1 (no label); the ESN needs labelled splits.")
    features = cached_exit_features(
        model,
        data,
        cache_dir=cache_dir,
        batch_size=batch_size,
        image_column=image_column,
        label_column=label_column,
        progress=progress,
    )
    # The cache holds the dataset's own labels; the ESN trains and calibrates on the model's class ids.
    features.labels = torch.as_tensor(labels, dtype=torch.long)
    return features


def calibrate_and_evaluate(
    model: TinySaverESNForImageClassification,
    calib_features,
    eval_features,
    max_drop: float,
    budget_steps: int = 10,
    allow_no_savings: bool = False,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sets the model's thresholds from the calibration features and measures ESN and plain TinySaver.

    Args:
        model: The trained ESN cascade; its `threshold`, `exit_thresholds` and `calibration` (a
            [`~hf_tinysaver.calibration.record.CalibrationRecord`] as a dict) are set in place.
        calib_features: Calibration-split features ([`labelled_exit_features`]).
        eval_features: Held-out features, or `None`.
        max_drop: Allowed accuracy drop (percentage points).
        budget_steps: Resolution of the drop budget split between exits.
        allow_no_savings: Keep thresholds whose ESN cascade costs as much as the base alone or more; without it
            they raise `InfeasibleTargetError` (and the model is left unchanged).
        source: Where the calibration data and models came from, for the record: any of `dataset`, `split`,
            `shuffle_seed`, `saver`, `base`.

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
        raise InfeasibleTargetError(
            f"The best ESN thresholds for a {max_drop}-point drop on these {calibrated['n']} calibration "
            f"images cost {calibrated['relative_macs']:.4f}x the base alone (exit rates {calibrated['exit_rates']}) "
            "and save nothing: no exit is accurate enough where it is confident. What would help: a larger "
            "--max-drop, more training epochs or calibration images, a more accurate saver; or pass "
            "--allow-no-savings (allow_no_savings=True) to keep these thresholds anyway."
        )
    config.threshold = esn_search.thresholds[0]
    config.exit_thresholds = esn_search.thresholds[1:]
    config.calibration = CalibrationRecord.create(
        {
            "provenance": model_provenance(model),
            "objective": "max-drop",
            "max_drop": max_drop,
            "threshold": config.threshold,
            "exit_thresholds": config.exit_thresholds,
            "exit_rate": calibrated["exit_rates"][0],
            "exit_rates": calibrated["exit_rates"],
            "accuracy": calibrated["accuracy"],
            "base_accuracy": calibrated["base_accuracy"],
            "accuracy_drop": calibrated["accuracy_drop"],
            "relative_macs": calibrated["relative_macs"],
            "relative_saver_macs": config.saver_macs / config.base_macs,
            "n": calibrated["n"],
            "confidence": config.confidence,
            "confidence_temperature": config.confidence_temperature,
            **(source or {}),
            "allowed_drops": esn_search.allowed_drops,
            "search": "sequential (first exit first) per drop-budget split; fewest MACs",
        }
    ).to_dict()
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


def train_and_calibrate_esn(
    saver: Any,
    base: Any,
    dataset: Any,
    train_split: str = "train",
    calib_split: str = "test[:50%]",
    eval_split: str | None = "test[50%:]",
    exit_stages: list[str] | None = None,
    confidence: str = "max_prob",
    width: int = 128,
    layers: int = 1,
    heads: int = 4,
    mlp_ratio: float = 4.0,
    epochs: int = 20,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.05,
    batch_size: int = 256,
    feature_batch_size: int = 256,
    seed: int = 0,
    max_drop: float = 0.5,
    budget_steps: int = 10,
    allow_no_savings: bool = False,
    shuffle_seed: int | None = None,
    label_map: Any = None,
    cache_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    label_column: str = "label",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    progress: bool = False,
    say: Callable[[str], None] | None = None,
) -> tuple[TinySaverESNForImageClassification, dict[str, Any]]:
    """What `tinysaver esn-train` does: builds the ESN cascade, trains it on cached features, calibrates its
    thresholds, evaluates it held out, and saves (and pushes) it.

    Args:
        saver, base: Models as [`~hf_tinysaver.sources.load_model`] accepts them (instances, zoo names, folders, Hub
            ids).
        dataset: The dataset all splits come from (see [`labelled_exit_features`]).
        train_split, calib_split, eval_split: The splits the ESN trains on, the thresholds are chosen on, and the
            reported numbers come from (`eval_split` None or empty: no held-out evaluation).
        exit_stages: Base stages followed by an exit (default: every stage but the last).
        confidence: The confidence metric.
        width, layers, heads, mlp_ratio: The ESN's shape.
        epochs, learning_rate, weight_decay, batch_size, seed: Training (see [`train_exit_sequence`]).
        feature_batch_size: Batch size of the frozen models.
        max_drop, budget_steps, allow_no_savings: Calibration (see [`calibrate_and_evaluate`]).
        shuffle_seed, label_map, cache_dir, image_column, label_column: Data (see [`labelled_exit_features`]).
        out: Folder to save the calibrated model to (checked before any work; written atomically).
        overwrite: Replace `out` even when it holds files hf_tinysaver did not write.
        push_to_hub: Also push the model to this repo id.
        progress: Show progress bars.
        say: Called with lines of progress text.

    Returns:
        The calibrated model and the results (thresholds, calibration and held-out figures of the ESN and of the
        plain cascade, and the run's settings).
    """
    from ..models.modeling_tinysaver import find_preprocessing

    if out:
        check_output_folder(out, overwrite=overwrite, kind="esn", option="--out")
    say = say or (lambda *_: None)
    torch.manual_seed(seed)
    # Loaded here so that a name that is no zoo name, folder or Hub id gets the library's one-line error.
    saver_model, base_model = load_model(saver), load_model(base)
    model = TinySaverESNForImageClassification.from_saver_and_base(
        saver_model,
        base_model,
        saver_preprocessing=find_preprocessing(saver_model, saver, role="saver"),
        base_preprocessing=find_preprocessing(base_model, base, role="base"),
        esn_width=width,
        esn_layers=layers,
        esn_num_heads=heads,
        esn_mlp_ratio=mlp_ratio,
        exit_stages=exit_stages,
        confidence=confidence,
    )
    say(f"exit stages {model.config.exit_stages}; relative MACs per answer point {model.config.relative_exit_macs}")

    def features_of(split: str) -> ExitFeatures:
        return labelled_exit_features(
            model,
            dataset,
            split,
            shuffle_seed=shuffle_seed,
            label_map=label_map,
            cache_dir=cache_dir,
            batch_size=feature_batch_size,
            image_column=image_column,
            label_column=label_column,
            progress=progress,
            say=say,
        )

    train_features = features_of(train_split)
    calib_features = features_of(calib_split)
    warn_label_order(calib_features.labels.numpy(), len(model.config.id2label), calib_split)
    eval_features = features_of(eval_split) if eval_split else None

    losses = train_exit_sequence(
        model,
        train_features,
        epochs=epochs,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
        on_epoch_end=lambda epoch, loss: say(f"epoch {epoch + 1}/{epochs} loss {loss:.4f}"),
    )
    source = {
        "dataset": str(dataset),
        "split": calib_split,
        "shuffle_seed": shuffle_seed,
        "saver": str(saver),
        "base": str(base),
    }
    results = calibrate_and_evaluate(
        model, calib_features, eval_features, max_drop, budget_steps, allow_no_savings, source=source
    )
    results.update(
        {
            "saver": str(saver),
            "base": str(base),
            "dataset": str(dataset),
            "splits": {"train": train_split, "calib": calib_split, "eval": eval_split or None},
            "shuffle_seed": shuffle_seed,
            "esn_shape": {"width": width, "layers": layers, "heads": heads, "mlp_ratio": mlp_ratio},
            "training": {
                "epochs": epochs,
                "lr": learning_rate,
                "weight_decay": weight_decay,
                "batch_size": batch_size,
                "seed": seed,
                "final_loss": losses[-1] if losses else None,
            },
            PROVENANCE_KEY: model_provenance(model),
        }
    )
    if out:
        with atomic_folder(out, overwrite=overwrite, kind="esn", option="--out") as folder:
            model.save_pretrained(folder)
        results["out"] = str(out)
        say(f"saved to {out}")
    if push_to_hub:
        model.push_to_hub(push_to_hub)
        results["pushed_to"] = push_to_hub
    return model, results


__all__ = [
    "ExitFeatures",
    "calibrate_and_evaluate",
    "cached_exit_features",
    "exit_records",
    "extract_exit_features",
    "labelled_exit_features",
    "train_and_calibrate_esn",
    "train_exit_sequence",
]
