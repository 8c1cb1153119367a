"""The TinySaver workflow on real data: record sub-models, calibrate a cascade's threshold, evaluate the real cascade.

Every model argument accepts a model instance, a zoo name (`hf_tinysaver.zoo.ZOO`), a local `save_pretrained` folder
or a Hub id; every dataset argument a zoo dataset name (`"cifar10"`, `"imagenet-val-1300"`), a local dataset folder,
a Hub dataset id or a loaded `datasets.Dataset`. Which one a string is, [`hf_tinysaver.sources.parse_source`] decides
(an existing local path wins over a zoo name, a zoo name over a Hub id).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibration.record import CalibrationRecord
from ..calibration.simulation import (
    DEFAULT_CERTIFICATE,
    CalibrationResult,
    CascadeSimulation,
    InfeasibleTargetError,
    format_drop,
)
from ..labels import dataset_labels, warn_label_order
from ..models.image_processing_tinysaver import TinySaverImageProcessor
from ..models.modeling_tinysaver import TinySaverForImageClassification
from ..provenance import PROVENANCE_KEY, model_provenance
from ..records import (
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    Records,
    distributed_state,
    find_column,
    pair_from_records,
    prepare_images,
    record,
    refreshing,
)
from ..sources import (
    dataset_name,
    load_dataset_split,
    load_model,
    parse_source,
    resolve_dataset_source,
    split_name,
)
from ..storage import (
    CALIBRATION_FILE,
    TRADEOFF_CSV_FILE,
    TRADEOFF_PLOT_FILE,
    atomic_folder,
    write_json_atomic,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

# Below this many calibration samples, `calibrate_cascade` warns that the threshold is unreliable.
FEW_CALIBRATION_SAMPLES = 100

OBJECTIVE_PARAMETERS = {
    "paper-no-loss": (),
    "max-drop": ("max_drop", "confidence_level", "certificate"),
    "exit-rate": ("exit_rate",),
    "budget": ("relative_macs",),
    "agreement": ("max_disagreement", "confidence_level"),
}


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
    shuffle_seed: int | None = None,
    label_map: Any = None,
) -> tuple[Records, Records]:
    """Records the cascade's saver and base, each with its own preprocessing, on one split (cached).

    Both records hold the labels in the cascade's label space (its `id2label`, the base's): the dataset's class
    names are compared with it, not with the saver's own, whose predictions go through `label_mapping`.
    `shuffle_seed` and `label_map` are as in [`record`].
    """
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
                shuffle_seed=shuffle_seed,
                label_map=label_map,
                id2label=cascade.config.id2label,
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
    allow_no_savings: bool = False,
    shuffle_seed: int | None = None,
    label_map: Any = None,
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
        allow_no_savings (`bool`, *optional*, defaults to `False`):
            Accept an operating point that costs as much as the base alone or more (relative MACs >= 1), e.g. the
            threshold 1.0 ("nothing exits") that a guarantee falls back to on too few samples. Without it such a
            point raises [`InfeasibleTargetError`].
        shuffle_seed (`int`, *optional*):
            Permute the whole named split with this seed before the slice is taken (see [`record`]); recorded in
            the calibration record. Use it on data stored sorted by label.
        label_map (*optional*):
            Dataset class -> model class for a dataset whose class names differ from the base's (see [`record`]).
        objective_parameters:
            `max_drop` (points), `exit_rate`, `relative_macs`, `max_disagreement`, `confidence_level`,
            `certificate` (max-drop with `confidence_level`: `"discordant-binomial"`, `"cp-difference"` or
            `"clopper-pearson"`; the certificate and the certified points go into the calibration record).

    Returns:
        The calibrated operating point and the simulation it was chosen on.

    Raises:
        InfeasibleTargetError: When the chosen point saves nothing (relative MACs >= 1) and `allow_no_savings` is
            not set; the message says why and what would help. The cascade's config is left unchanged.

    Warns (`UserWarning`) when the labelled split holds only part of the model's classes or its labels come sorted
    or grouped (see [`~hf_tinysaver.labels.label_order_warnings`]): such a split cannot stand for deployment.

    Example:

    ```python
    >>> from hf_tinysaver.workflows.cascade import build_cascade, calibrate_cascade

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
        cascade,
        dataset,
        split,
        batch_size=batch_size,
        assets=assets,
        cache_dir=cache_dir,
        progress=progress,
        shuffle_seed=shuffle_seed,
        label_map=label_map,
    )
    if distributed_state().is_main_process:
        warn_label_order(base_records.labels, len(cascade.config.id2label), split)
    if fit_temperature:
        from ..calibration.simulation import fit_temperature as fit

        if saver_records.labels is None:
            raise ValueError("Fitting the temperature needs labels; the split has none.")
        cascade.config.confidence_temperature = float(fit(saver_records.logits, saver_records.labels))
    simulation = simulation_for(cascade, saver_records, base_records)
    if simulation.n < FEW_CALIBRATION_SAMPLES:
        logger.warning(
            "Calibrating on only %d samples: the threshold is unreliable (its accuracy and exit rate on new data can "
            "differ by several points); calibrate on at least %d, ideally thousands.",
            simulation.n,
            FEW_CALIBRATION_SAMPLES,
        )
    result = simulation.calibrate(objective, **objective_parameters)
    if result.relative_macs >= 1.0 and not allow_no_savings:
        raise InfeasibleTargetError(_no_savings_message(simulation, result, objective_parameters))
    cascade.config.threshold = float(result.threshold)
    cascade.config.calibration = CalibrationRecord.create(
        {
            **result.to_dict(),
            "confidence": cascade.config.confidence,
            "confidence_temperature": cascade.config.confidence_temperature,
            "dataset": dataset_name(dataset),
            "dataset_origin": parse_source(dataset, "dataset").origin,
            "split": split,
            "shuffle_seed": shuffle_seed,
            "saver": cascade.config.saver_config._name_or_path or None,
            "base": cascade.config.base_config._name_or_path or None,
            "oracle_relative_macs": simulation.oracle_relative_macs(),
            **drift_reference(simulation, result.threshold),
            PROVENANCE_KEY: model_provenance(cascade),
        }
    ).to_dict()
    return result, simulation


def _images_for_savings(
    simulation: CascadeSimulation, max_drop: float, confidence_level: float, certificate: str
) -> int | None:
    """About how many calibration images the certificate needs before a point that saves compute passes.

    [`plan_calibration_size`] on this split as the pilot; None where it cannot answer (the pilot's own drop is
    too large, or the method is the original Clopper-Pearson guarantee, which the planner does not simulate).
    """
    from ..calibration.simulation import plan_calibration_size

    try:
        size = plan_calibration_size(simulation, max_drop, confidence_level, method=certificate, draws=1000)
    except ValueError:
        return None
    return size if size > simulation.n else None


def _no_savings_message(simulation: CascadeSimulation, result: CalibrationResult, parameters: dict) -> str:
    """Why the chosen point costs as much as the base or more, and what would help (one line)."""
    share = result.relative_saver_macs
    point = (
        f"The {result.objective} objective chose threshold {result.threshold:.6g} on these {result.n} samples: exit "
        f"rate {result.exit_rate:.4f}, so the cascade costs {result.relative_macs:.4f}x the base alone (saver "
        f"{share:.4f} + base on {100 * (1 - result.exit_rate):.1f} % of the samples) and saves nothing."
    )
    helps = []
    if share >= 1.0:
        why = f"The saver alone costs {share:.4f}x the base, so no threshold can save anything."
        helps.append("pick a saver with fewer MACs than the base")
    elif result.objective == "max-drop" and parameters.get("confidence_level") is not None:
        level, max_drop = parameters["confidence_level"], parameters["max_drop"]
        certificate = parameters.get("certificate") or DEFAULT_CERTIFICATE
        why = (
            f"With {result.n} samples the {certificate} certificate at confidence {level} cannot certify any "
            f"threshold that lets more than {100 * share:.1f} % of the samples exit (what pays for the saver) with "
            f"the drop within {max_drop} points."
        )
        needed = _images_for_savings(simulation, max_drop, level, certificate)
        more = f" (about {needed} if the observed rates hold; `tinysaver plan` tells more)" if needed else ""
        helps += [
            f"calibrate on more images{more}",
            "a lower confidence_level (--confidence-level)",
            "a larger max_drop (--max-drop)",
        ]
    elif result.objective in ("max-drop", "paper-no-loss", "agreement"):
        why = (
            f"Every threshold that lets more than {100 * share:.1f} % of the samples exit (what pays for the saver) "
            "misses the target: the saver is wrong too often where it is confident."
        )
        helps += [
            "a larger max_drop (--max-drop)"
            if result.objective != "agreement"
            else "a larger max_disagreement (--max-disagreement)",
            "calibrate on more images",
            "a more accurate saver",
        ]
        if parameters.get("confidence_level") is not None:
            helps.insert(1, "a lower confidence_level (--confidence-level)")
    else:
        why = f"The {result.objective} target itself leaves at most {100 * share:.1f} % of the samples exiting."
        helps.append(
            "a higher exit_rate (--exit-rate)" if result.objective == "exit-rate" else "a lower budget (--budget)"
        )
    return (
        f"{point} {why} What would help: {', '.join(helps)}; or pass allow_no_savings=True (--allow-no-savings) "
        "to keep this point anyway."
    )


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
    buffer = io.StringIO()
    csv.writer(buffer).writerows(lines)
    return write_text_atomic(path, buffer.getvalue())


def save_calibrated_cascade(
    cascade: TinySaverForImageClassification,
    result: CalibrationResult,
    simulation: CascadeSimulation,
    out: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Saves a cascade calibrated by [`calibrate_cascade`] with its calibration files, ready to push.

    Writes `save_pretrained` files, `calibration.json` (the calibration record of `cascade.config`), `tradeoff.csv`
    (every operating point of the curve) and, on a labelled split, `tradeoff.png` (the curve with the chosen point;
    whoever needs it, e.g. [`~hf_tinysaver.hub.push.push_cascade`], finds it under that name in the folder).
    Everything is written into a hidden folder beside `out` and swapped in as a whole when complete
    ([`~storage.atomic_folder`]): an interrupt leaves the complete old folder or the complete new one, and nothing of an
    old folder (stale shards, `pytorch_model.bin`, ...) stays beside the new files.

    Args:
        cascade: The calibrated cascade (unchanged: the record names no files).
        result: The operating point [`calibrate_cascade`] chose.
        simulation: The simulation it was chosen on.
        out: The folder to write (created if needed).
        overwrite: Replace `out` even when it holds files hf_tinysaver did not write. Without it such a folder is
            refused ([`~storage.OutputFolderError`]); an earlier cascade folder of this library is replaced.

    Returns:
        `out` as a `Path`.
    """
    from ..plotting import plot_tradeoff

    calibration = cascade.config.calibration
    saver_name = str(calibration.get("saver") or "saver")
    base_name = str(calibration.get("base") or "base")
    with atomic_folder(out, overwrite=overwrite, kind="cascade", option="out") as folder:
        if simulation.curve.accuracy is not None:
            plot_tradeoff(
                folder / TRADEOFF_PLOT_FILE,
                {saver_name: simulation.curve},
                base_accuracy=simulation.base_accuracy,
                base_name=base_name,
                operating_points={saver_name: result},
                title=f"{saver_name} -> {base_name} on {calibration.get('dataset')} {calibration.get('split')}",
            )
        cascade.save_pretrained(folder)
        write_curve_csv(folder / TRADEOFF_CSV_FILE, simulation)
        write_json_atomic(folder / CALIBRATION_FILE, calibration)
    return Path(out)


def evaluate_cascade(
    cascade: TinySaverForImageClassification,
    dataset: Any,
    split: str | None,
    batch_size: int = 64,
    assets: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    shuffle_seed: int | None = None,
    label_map: Any = None,
    return_simulation: bool = False,
    speedup_images: int = 0,
) -> dict[str, Any]:
    r"""
    Runs the real cascade (not a simulation) over a split and measures what it does.

    Launched with `accelerate launch` or `torchrun`, the processes share the batches and every process returns the
    same numbers as a single-process run. The base alone is recorded too (cached), for `base_accuracy`, and the
    saver, so that the exit rate and accuracy the recorded simulation predicts for this threshold are reported
    beside the measured ones (they must match exactly).

    The labels are read in the cascade's label space as in [`record`] (class names aligned, range checked);
    `shuffle_seed` permutes the whole named split before the slice is taken. With `speedup_images=N`, the main
    process also times the cascade against its base alone on the first N images at `batch_size`
    ([`~workflows.timing.measure_speedup`]; the cascade as it is, no inference optimisations).

    Returns:
        A dict with `accuracy`, `base_accuracy`, `exit_rate`, `agreement`, `relative_macs` (MACs actually spent / base
        MACs), `costs_more_than_base` (`relative_macs >= 1`: the cascade saves nothing on this split),
        `images_per_second` (cascade forward passes), `n`, `threshold`, `max_drop` (the calibration's target, if any),
        `target_missed` (the held-out drop is above it), `saver_alone` (every image exits), the simulated figures and
        `provenance` (versions, device, hardware, dtype, threads and command: [`~hf_tinysaver.provenance.provenance`]).
        With `speedup_images`, also `speedup`, `streamed_speedup`, `mac_predicted_speedup` and `speedup_timing` (how
        they were timed). With `return_simulation=True`, `(results, simulation)`: the [`CascadeSimulation`] of the
        held-out records (for the held-out trade-off plot).
    """
    from accelerate.utils import gather_object
    from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS

    config = cascade.config
    if not config.saver_macs or not config.base_macs:
        raise ValueError("The cascade has no MACs recorded in its config; rebuild it with from_saver_and_base.")
    state = distributed_state()
    source = resolve_dataset_source(dataset, assets)
    data = load_dataset_split(source, split, shuffle_seed=shuffle_seed)
    split = split_name(data, split)
    image_column = find_column(data, None, IMAGE_COLUMNS, "image", required=True)
    label_column = find_column(data, None, LABEL_COLUMNS, "label", required=True)
    labels, _ = dataset_labels(
        data, label_column, config.id2label, label_map, where=f"the split {split!r}", model_description="the cascade"
    )
    if labels is None:
        raise ValueError(f"Every label of the split {split!r} is -1 (no label); evaluating needs a labelled split.")
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
        refreshing(bar),
    ):
        for index in own:
            stop = min((index + 1) * batch_size, len(data))
            inputs = prepare_images(processor, data, image_column, index * batch_size, stop, split)
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

    saver_records, base_records = record_sub_models(
        cascade,
        source,
        split,
        batch_size=batch_size,
        assets=assets,
        cache_dir=cache_dir,
        progress=progress,
        shuffle_seed=shuffle_seed,
        label_map=label_map,
    )
    metric = load_cascade_metric()
    scores = metric.compute(
        predictions=predictions, references=labels, exited=exited, base_predictions=base_records.predictions
    )
    simulation = simulation_for(cascade, saver_records, base_records)
    simulated = simulation.evaluate(config.threshold)
    relative_saver_macs = config.saver_macs / config.base_macs
    calibration = config.calibration or {}
    # The calibration's target applies to the threshold it chose, not to one the caller set instead.
    max_drop = calibration.get("max_drop") if calibration.get("threshold") == config.threshold else None
    drop_points = 100 * (scores["base_accuracy"] - scores["accuracy"])
    results = {
        "accuracy": scores["accuracy"],
        "base_accuracy": scores["base_accuracy"],
        "saver_accuracy": float(np.mean(saver_records.predictions == labels))
        if config.label_mapping is None
        else None,
        "accuracy_drop_points": drop_points,
        "max_drop": max_drop,
        # Held-out drop above the calibration's target (points; a float-noise margin keeps 0.5 from missing 0.5).
        "target_missed": bool(max_drop is not None and drop_points > float(max_drop) + 1e-9),
        "saver_alone": bool(scores["exit_rate"] == 1.0),
        "exit_rate": scores["exit_rate"],
        "agreement": scores["agreement"],
        "relative_macs": relative_saver_macs + 1 - scores["exit_rate"],
        "costs_more_than_base": bool(relative_saver_macs + 1 - scores["exit_rate"] >= 1.0),
        "images_per_second": len(data) / slowest_process_seconds if slowest_process_seconds > 0 else math.inf,
        "n": scores["n"],
        "threshold": config.threshold,
        "saver_macs": config.saver_macs,
        "base_macs": config.base_macs,
        "dataset": dataset_name(dataset),
        "dataset_origin": parse_source(dataset, "dataset").origin,
        "split": split,
        "shuffle_seed": shuffle_seed,
        "processes": state.num_processes,
        "batch_size": batch_size,
        "simulated_exit_rate": simulated.exit_rate,
        "simulated_accuracy": simulated.accuracy,
        "simulation_matches_forward": bool(
            math.isclose(simulated.exit_rate, scores["exit_rate"], abs_tol=0)
            and simulated.accuracy is not None
            and math.isclose(simulated.accuracy, scores["accuracy"], abs_tol=0)
        ),
        PROVENANCE_KEY: model_provenance(cascade),
    }
    if speedup_images and state.is_main_process:
        from .timing import measure_speedup

        timing = measure_speedup(
            cascade,
            data.select(range(min(speedup_images, len(data))))[image_column],
            batch_size,
            progress=(lambda line: print(line, flush=True)) if progress else None,
        )
        results |= {
            "speedup": timing["realised_speedup"],
            "streamed_speedup": timing["streamed_speedup"],
            "mac_predicted_speedup": timing["mac_predicted_speedup"],
            "speedup_timing": {"images": timing["n"], "batch_size": timing["batch_size"], "rounds": 3},
        }
    if return_simulation:
        return results, simulation
    return results


def describe_evaluation(results: dict[str, Any]) -> list[str]:
    """What an [`evaluate_cascade`] result means, in plain lines: accuracy and drop (the library's one wording,
    [`~calibration.simulation.format_drop`]), then a warning each when the held-out drop missed the calibration's
    target, when every image exits (the saver alone answers) and when the cascade saves nothing."""
    lines = [
        f"accuracy {100 * results['accuracy']:.2f} % vs base alone {100 * results['base_accuracy']:.2f} % "
        f"({format_drop(results['accuracy_drop_points'])}), exit rate {100 * results['exit_rate']:.1f} %, relative "
        f"MACs {results['relative_macs']:.4f}, n={results['n']}"
    ]
    if results.get("target_missed"):
        lines.append(
            f"warning: the held-out drop ({results['accuracy_drop_points']:.2f} points) missed the calibration's "
            f"target of {results['max_drop']:g} points on this split: the in-sample threshold lets too much exit here "
            "(calibrate on more images, or with --confidence-level for a guarantee)."
        )
    if results.get("saver_alone"):
        lines.append(
            "note: every image exits at the saver, so the base never runs: on this split the saver alone answers "
            f"(relative MACs {results['relative_macs']:.4f} = the saver's own cost)."
        )
    if results.get("costs_more_than_base"):
        lines.append(
            f"warning: this cascade costs {results['relative_macs']:.4f}x its base alone (exit rate "
            f"{results['exit_rate']:.4f}, saver share {results['saver_macs'] / results['base_macs']:.4f}): it "
            "saves nothing on this split; recalibrate it (see `tinysaver calibrate`) or use the base alone."
        )
    return lines


def plot_held_out_tradeoff(
    path: str | os.PathLike,
    cascade: TinySaverForImageClassification,
    simulation: CascadeSimulation,
    results: dict[str, Any],
) -> Path:
    """Draws the held-out trade-off of an [`evaluate_cascade`] run (PNG, atomically).

    The curve is the held-out simulation's (every threshold, from the held-out records `evaluate_cascade` made), the
    cascade's own threshold is marked on it with what the real forward measured there, and the calibration's point
    (from `config.calibration`, when the cascade was calibrated) is drawn beside it, with the base alone and the
    oracle bound on the held-out split.
    """
    from ..plotting import plot_tradeoff

    calibration = CalibrationRecord.from_dict(cascade.config.calibration)
    saver = str(calibration.saver or cascade.config.saver_config._name_or_path or "saver")
    base = str(calibration.base or cascade.config.base_config._name_or_path or "base")
    split = results.get("split")
    calibration_points = {}
    if calibration.threshold is not None and calibration.accuracy is not None:
        calibration_points[f"calibration point ({calibration.split or 'calibration split'})"] = calibration
    return plot_tradeoff(
        path,
        {saver: simulation.curve},
        base_accuracy=results["base_accuracy"],
        base_name=base,
        operating_points={saver: simulation.evaluate(cascade.config.threshold)},
        calibration_points=calibration_points,
        curve_label=f"held-out {split}" if split else "held-out",
        title=f"{saver} -> {base} on {results.get('dataset')} {split} (held-out)",
    )


def load_cascade_metric():
    """The `evaluate` metric shipped with hf_tinysaver (accuracy, base accuracy, exit rate, agreement), offline."""
    import evaluate

    return evaluate.load(str(Path(__file__).parents[1] / "metrics" / "cascade_accuracy.py"))


__all__ = [
    "OBJECTIVE_PARAMETERS",
    "build_cascade",
    "calibrate_cascade",
    "describe_evaluation",
    "evaluate_cascade",
    "load_cascade_metric",
    "plot_held_out_tradeoff",
    "record_sub_models",
    "save_calibrated_cascade",
    "simulation_for",
    "write_curve_csv",
]
