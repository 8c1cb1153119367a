"""The TinySaver workflow on real data: record sub-models, calibrate a cascade's threshold, evaluate the real cascade.

Every model argument accepts a model instance, a zoo name (`hf_tinysaver.zoo.ZOO`), a local `save_pretrained` folder
or a Hub id; every dataset argument a zoo dataset name (`"cifar10"`, `"imagenet-val-1300"`), a local dataset folder,
a Hub dataset id or a loaded `datasets.Dataset`.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .calibration import CalibrationResult, CascadeSimulation
from .configuration_tinysaver import TINYSAVER_VERSION
from .image_processing_tinysaver import TinySaverImageProcessor
from .modeling_tinysaver import TinySaverForImageClassification
from .records import (
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    Records,
    _find_column,
    _resolve_dataset,
    distributed_state,
    pair_from_records,
    record,
)

OBJECTIVE_PARAMETERS = {
    "paper-no-loss": (),
    "max-drop": ("max_drop", "confidence_level"),
    "exit-rate": ("exit_rate",),
    "budget": ("relative_macs",),
    "agreement": ("max_disagreement", "confidence_level"),
}


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Writes JSON to a temporary file beside `path`, then renames it over `path` (never a half-written file)."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def resolve_dataset_source(dataset: Any, assets: str | os.PathLike | None = None) -> Any:
    """Turns a zoo dataset name into its local folder; other sources are returned unchanged.

    Args:
        dataset: A zoo dataset name, a local folder, a Hub dataset id or a loaded `datasets.Dataset`.
        assets: The assets folder for zoo datasets (default: `TINYSAVER_ASSETS`, then `../shared`).

    Returns:
        What `datasets.load_dataset` (or [`record`]) accepts.
    """
    from .zoo import ZOO_DATASETS
    from .zoo.assets import asset_path, resolve_assets

    if isinstance(dataset, str) and dataset in ZOO_DATASETS and not os.path.exists(dataset):
        return str(asset_path(resolve_assets(assets), ZOO_DATASETS[dataset]))
    return dataset


def load_dataset_split(dataset: Any, split: str | None, assets: str | os.PathLike | None = None):
    """Loads one split (with `datasets` slicing, e.g. `"test[50%:]"`) of a zoo, local or Hub dataset."""
    return _resolve_dataset(resolve_dataset_source(dataset, assets), split, fingerprint_files=False)[0]


def dataset_name(dataset: Any) -> str:
    """A readable name of a dataset argument for results files."""
    if isinstance(dataset, (str, os.PathLike)):
        return str(dataset)
    info = getattr(dataset, "info", None)
    return (getattr(info, "dataset_name", None) if info else None) or type(dataset).__name__


def load_model(model: Any, assets: str | os.PathLike | None = None):
    """Loads a classifier from a zoo name, a local folder or a Hub id (instances pass through)."""
    from .modeling_tinysaver import load_classifier
    from .zoo import ZOO, load_zoo_model

    if isinstance(model, str) and model in ZOO and not os.path.exists(model):
        return load_zoo_model(model, assets=assets)
    return load_classifier(model)


def build_cascade(saver: Any, base: Any, assets: str | os.PathLike | None = None, **kwargs):
    """`TinySaverForImageClassification.from_saver_and_base` with zoo names resolved against `assets`."""
    cascade = TinySaverForImageClassification.from_saver_and_base(
        load_model(saver, assets), load_model(base, assets), **kwargs
    )
    for role, source in (("saver", saver), ("base", base)):
        if isinstance(source, (str, os.PathLike)):
            getattr(cascade.config, f"{role}_config")._name_or_path = str(source)
    return cascade.eval()


def record_sub_models(
    cascade: TinySaverForImageClassification,
    dataset: Any,
    split: str | None,
    batch_size: int = 64,
    assets: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[Records, Records]:
    """Records the cascade's saver and base, each with its own preprocessing, on one split (cached)."""
    source = resolve_dataset_source(dataset, assets)
    outputs = []
    for role in ("saver", "base"):
        preprocessing = getattr(cascade.config, f"{role}_preprocessing")
        outputs.append(
            record(
                getattr(cascade, role),
                TinySaverImageProcessor(preprocessing=preprocessing),
                source,
                split=split,
                batch_size=batch_size,
                cache_dir=cache_dir,
                use_cache=use_cache,
                preprocessing=preprocessing,
                model_name=getattr(cascade.config, f"{role}_config")._name_or_path or role,
                progress=progress,
            )
        )
    return outputs[0], outputs[1]


def simulation_for(cascade: TinySaverForImageClassification, saver_records: Records, base_records: Records):
    """The [`CascadeSimulation`] of this cascade's confidence rule on recorded outputs."""
    config = cascade.config
    if not config.saver_macs or not config.base_macs:
        raise ValueError("The cascade has no MACs recorded; pass saver_macs= and base_macs= to from_saver_and_base.")
    return pair_from_records(
        saver_records,
        base_records,
        relative_saver_macs=config.saver_macs / config.base_macs,
        confidence_metric=config.confidence,
        temperature=config.confidence_temperature,
        label_mapping=config.label_mapping,
    )


def calibrate_cascade(
    cascade: TinySaverForImageClassification,
    dataset: Any,
    split: str | None,
    objective: str = "max-drop",
    fit_temperature: bool = False,
    batch_size: int = 64,
    assets: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **objective_parameters,
) -> tuple[CalibrationResult, CascadeSimulation]:
    r"""
    Chooses the cascade's threshold on a labelled (or, for `agreement`, `exit-rate` and `budget`, any) split and
    writes it, with the full calibration record, into `cascade.config`.

    Args:
        cascade ([`TinySaverForImageClassification`]):
            The cascade; its `threshold` and `calibration` are updated in place.
        dataset:
            Zoo dataset name, local folder, Hub id or `datasets.Dataset`.
        split (`str`):
            The calibration split, e.g. `"test[:50%]"`.
        objective (`str`, *optional*, defaults to `"max-drop"`):
            `"paper-no-loss"`, `"max-drop"`, `"exit-rate"`, `"budget"` or `"agreement"`.
        fit_temperature (`bool`, *optional*, defaults to `False`):
            Fit the saver's confidence temperature on this split first (needs labels).
        objective_parameters:
            `max_drop` (points), `exit_rate`, `relative_macs`, `max_disagreement`, `confidence_level`.

    Returns:
        The calibrated operating point and the simulation it was chosen on.

    Example:

    ```python
    >>> from hf_tinysaver.workflow import build_cascade, calibrate_cascade

    >>> cascade = build_cascade("cifar10-resnet20", "cifar10-resnet56")
    >>> result, _ = calibrate_cascade(cascade, "cifar10", "test[:5%]", objective="max-drop", max_drop=0.5, progress=False)
    >>> cascade.config.threshold == result.threshold
    True
    ```
    """
    if objective not in OBJECTIVE_PARAMETERS:
        raise ValueError(f"Unknown objective {objective!r}; choose one of {sorted(OBJECTIVE_PARAMETERS)}.")
    objective_parameters = {k: v for k, v in objective_parameters.items() if v is not None}
    saver_records, base_records = record_sub_models(
        cascade, dataset, split, batch_size=batch_size, assets=assets, cache_dir=cache_dir, progress=progress
    )
    if fit_temperature:
        from .calibration import fit_temperature as fit

        if saver_records.labels is None:
            raise ValueError("Fitting the temperature needs labels; the split has none.")
        cascade.config.confidence_temperature = float(fit(saver_records.logits, saver_records.labels))
    simulation = simulation_for(cascade, saver_records, base_records)
    result = simulation.calibrate(objective, **objective_parameters)
    cascade.config.threshold = float(result.threshold)
    cascade.config.calibration = {
        **result.to_dict(),
        "confidence": cascade.config.confidence,
        "confidence_temperature": cascade.config.confidence_temperature,
        "dataset": dataset_name(dataset),
        "split": split,
        "saver": cascade.config.saver_config._name_or_path or None,
        "base": cascade.config.base_config._name_or_path or None,
        "oracle_relative_macs": simulation.oracle_relative_macs(),
        **drift_reference(simulation, result.threshold),
        "date": datetime.date.today().isoformat(),
        "hf_tinysaver_version": TINYSAVER_VERSION,
    }
    return result, simulation


# Nominal levels of the saver-confidence quantiles kept in the calibration record for drift monitoring.
CONFIDENCE_QUANTILE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def drift_reference(simulation: CascadeSimulation, threshold: float) -> dict[str, Any]:
    """The calibration facts a deployed [`~hf_tinysaver.monitor.DriftGuard`] compares its stream against.

    Args:
        simulation: The calibration split's simulation.
        threshold: The calibrated threshold (`confidence > threshold` exits).

    Returns:
        `confidence_quantiles` (the saver-confidence deciles and the exact fraction of calibration images at or below
        each, a few numbers whatever the split's size), `exited` (calibration images that exit) and
        `exited_disagreement` (the fraction of those on which saver and base predict differently; `None` when none
        exit).
    """
    confidence = simulation.confidence
    values = np.quantile(confidence, CONFIDENCE_QUANTILE_LEVELS, method="inverted_cdf")
    exited = confidence > threshold
    exited_count = int(np.count_nonzero(exited))
    disagreements = int(np.count_nonzero(simulation.saver_predictions[exited] != simulation.base_predictions[exited]))
    return {
        "confidence_quantiles": {
            "levels": list(CONFIDENCE_QUANTILE_LEVELS),
            "values": [float(value) for value in values],
            "fractions_at_or_below": [float(np.mean(confidence <= value)) for value in values],
        },
        "exited": exited_count,
        "exited_disagreement": disagreements / exited_count if exited_count else None,
    }


def write_curve_csv(path: str | os.PathLike, simulation: CascadeSimulation) -> Path:
    """Writes every operating point of the trade-off curve (threshold, exit rate, accuracy, MACs) as CSV."""
    curve = simulation.curve
    accuracy = curve.accuracy if curve.accuracy is not None else np.full(len(curve), np.nan)
    lines = [["threshold", "exit_rate", "accuracy", "relative_macs", "agreement"]]
    for row in zip(curve.thresholds, curve.exit_rate, accuracy, curve.relative_macs, curve.agreement, strict=True):
        lines.append([repr(float(v)) for v in row])
    with tempfile.NamedTemporaryFile("w", newline="", delete=False, dir=Path(path).parent, suffix=".tmp") as file:
        csv.writer(file).writerows(lines)
    os.replace(file.name, path)
    return Path(path)


def save_calibrated_cascade(
    cascade: TinySaverForImageClassification,
    result: CalibrationResult,
    simulation: CascadeSimulation,
    out: str | os.PathLike,
) -> Path:
    """Saves a cascade calibrated by [`calibrate_cascade`] with its calibration files, ready to push.

    Writes `save_pretrained` files, `calibration.json` (the calibration record of `cascade.config`), `tradeoff.csv`
    (every operating point of the curve) and, on a labelled split, `tradeoff.png` (the curve with the chosen point).

    Args:
        cascade: The calibrated cascade; `cascade.config.calibration` gains `"plot"` when the plot is written.
        result: The operating point [`calibrate_cascade`] chose.
        simulation: The simulation it was chosen on.
        out: The folder to write (created if needed).

    Returns:
        `out` as a `Path`.
    """
    from .plotting import plot_tradeoff

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    calibration = cascade.config.calibration
    saver_name = str(calibration.get("saver") or "saver")
    base_name = str(calibration.get("base") or "base")
    if simulation.curve.accuracy is not None:
        plot_tradeoff(
            out / "tradeoff.png",
            {saver_name: simulation.curve},
            base_accuracy=simulation.base_accuracy,
            base_name=base_name,
            operating_points={saver_name: result},
            title=f"{saver_name} -> {base_name} on {calibration.get('dataset')} {calibration.get('split')}",
        )
        calibration["plot"] = "tradeoff.png"
    cascade.save_pretrained(out)
    write_curve_csv(out / "tradeoff.csv", simulation)
    write_json_atomic(out / "calibration.json", calibration)
    return out


def evaluate_cascade(
    cascade: TinySaverForImageClassification,
    dataset: Any,
    split: str | None,
    batch_size: int = 64,
    assets: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    r"""
    Runs the real cascade (not a simulation) over a split and measures what it does.

    Launched with `accelerate launch` or `torchrun`, the processes share the batches and every process returns the
    same numbers as a single-process run. The base alone is recorded too (cached), for `base_accuracy`, and the
    saver, so that the exit rate and accuracy the recorded simulation predicts for this threshold are reported
    beside the measured ones (they must match exactly).

    Returns:
        A dict with `accuracy`, `base_accuracy`, `exit_rate`, `agreement`, `relative_macs` (MACs actually spent / base
        MACs), `images_per_second` (cascade forward passes), `n`, `threshold` and the simulated figures.
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    config = cascade.config
    if not config.saver_macs or not config.base_macs:
        raise ValueError("The cascade has no MACs recorded in its config; rebuild it with from_saver_and_base.")
    state = distributed_state()
    source = resolve_dataset_source(dataset, assets)
    data, _, split = _resolve_dataset(source, split, fingerprint_files=False)
    image_column = _find_column(data, None, IMAGE_COLUMNS, "image", required=True)
    label_column = _find_column(data, None, LABEL_COLUMNS, "label", required=True)
    cascade.eval()
    processor = cascade.get_image_processor()
    num_batches = math.ceil(len(data) / batch_size)
    own = [index for index in range(num_batches) if index % state.num_processes == state.process_index]
    outputs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    forward_seconds = 0.0
    with (
        torch.inference_mode(),
        tqdm(
            total=len(data), unit="img", desc="Evaluating cascade", disable=not (progress and state.is_main_process)
        ) as bar,
    ):
        for index in own:
            images = data[index * batch_size : (index + 1) * batch_size][image_column]
            inputs = processor(images=images, return_tensors="pt")
            start = time.perf_counter()
            result = cascade(**inputs)
            forward_seconds += time.perf_counter() - start
            outputs[index] = (result.logits.argmax(-1).numpy(), result.exited.numpy())
            bar.update(len(result.exited) * state.num_processes)
    gathered = gather_object([(outputs, forward_seconds)]) if state.num_processes > 1 else [(outputs, forward_seconds)]
    by_batch = {index: value for part, _ in gathered for index, value in part.items()}
    predictions = np.concatenate([by_batch[i][0] for i in range(num_batches)])
    exited = np.concatenate([by_batch[i][1] for i in range(num_batches)])
    slowest_process_seconds = max(seconds for _, seconds in gathered)
    labels = np.asarray(data[label_column], dtype=np.int64)

    saver_records, base_records = record_sub_models(
        cascade, source, split, batch_size=batch_size, assets=assets, cache_dir=cache_dir, progress=progress
    )
    metric = load_cascade_metric()
    scores = metric.compute(
        predictions=predictions, references=labels, exited=exited, base_predictions=base_records.predictions
    )
    simulated = simulation_for(cascade, saver_records, base_records).evaluate(config.threshold)
    relative_saver_macs = config.saver_macs / config.base_macs
    return {
        "accuracy": scores["accuracy"],
        "base_accuracy": scores["base_accuracy"],
        "saver_accuracy": float(np.mean(saver_records.predictions == labels))
        if config.label_mapping is None
        else None,
        "accuracy_drop_points": 100 * (scores["base_accuracy"] - scores["accuracy"]),
        "exit_rate": scores["exit_rate"],
        "agreement": scores["agreement"],
        "relative_macs": relative_saver_macs + 1 - scores["exit_rate"],
        "images_per_second": len(data) / slowest_process_seconds if slowest_process_seconds > 0 else math.inf,
        "n": scores["n"],
        "threshold": config.threshold,
        "saver_macs": config.saver_macs,
        "base_macs": config.base_macs,
        "dataset": dataset_name(dataset),
        "split": split,
        "processes": state.num_processes,
        "batch_size": batch_size,
        "simulated_exit_rate": simulated.exit_rate,
        "simulated_accuracy": simulated.accuracy,
        "simulation_matches_forward": bool(
            math.isclose(simulated.exit_rate, scores["exit_rate"], abs_tol=0)
            and simulated.accuracy is not None
            and math.isclose(simulated.accuracy, scores["accuracy"], abs_tol=0)
        ),
    }


def load_cascade_metric():
    """The `evaluate` metric shipped with hf_tinysaver (accuracy, base accuracy, exit rate, agreement), offline."""
    import evaluate

    return evaluate.load(str(Path(__file__).parent / "metrics" / "cascade_accuracy.py"))


__all__ = [
    "OBJECTIVE_PARAMETERS",
    "build_cascade",
    "calibrate_cascade",
    "dataset_name",
    "evaluate_cascade",
    "load_cascade_metric",
    "load_dataset_split",
    "load_model",
    "record_sub_models",
    "resolve_dataset_source",
    "save_calibrated_cascade",
    "simulation_for",
    "write_curve_csv",
    "write_json_atomic",
    "write_text_atomic",
]
