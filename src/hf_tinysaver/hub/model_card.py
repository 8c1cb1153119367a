"""Model cards for TinySaver cascades: a card-data object built from the cascade's config, rendered through a template.

The template lives in the package (`templates/model_card_template.md`) so that it ships with the wheel. Sections
for which the cascade has no data (no calibration record, no plot, no MAC counts) are left out, never filled with
placeholders.
"""

from __future__ import annotations

import math
import os
import platform
import re
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, ModelCard, ModelCardData, constants
from huggingface_hub.repocard_data import EvalResult, eval_results_to_model_index
from huggingface_hub.utils import yaml_dump

from ..calibration.record import CalibrationRecord
from ..models.configuration_tinysaver import TINYSAVER_VERSION, TinySaverConfig
from ..storage import write_text_atomic

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card_template.md"
DEFAULT_TAGS = ("tinysaver", "custom_code", "image-classification", "early-exit")
PAPER_URL = "https://arxiv.org/abs/2403.17726"
HUB_URL = "https://huggingface.co"

# Front-matter keys, in the order they are written.
YAML_FIELDS = ("license", "library_name", "pipeline_tag", "tags", "base_model", "datasets", "metrics", "model-index")

_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_DATASET_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

# How restrictive each Hub license id is, for choosing the stricter of the saver's and the base's licenses: public
# domain < permissive < permissive with notice/patent terms < weak copyleft < strong copyleft < use-restricted
# (non-commercial, no-derivatives, responsible-AI licenses) < custom terms. Unknown ids count as custom terms.
_LICENSE_STRICTNESS = {
    **dict.fromkeys(("cc0-1.0", "unlicense", "wtfpl", "pddl"), 0),
    **dict.fromkeys(("mit", "isc", "bsd-2-clause", "bsd", "zlib", "bsl-1.0", "ncsa", "postgresql"), 1),
    **dict.fromkeys(("bsd-3-clause", "bsd-3-clause-clear", "afl-3.0", "artistic-2.0", "ecl-2.0", "ofl-1.1"), 2),
    **dict.fromkeys(
        (
            "apache-2.0",
            "cc-by-2.0",
            "cc-by-2.5",
            "cc-by-3.0",
            "cc-by-4.0",
            "odc-by",
            "cdla-permissive-1.0",
            "cdla-permissive-2.0",
            "c-uda",
        ),
        3,
    ),
    **dict.fromkeys(
        (
            "lgpl",
            "lgpl-2.1",
            "lgpl-3.0",
            "lgpl-lr",
            "mpl-2.0",
            "epl-1.0",
            "epl-2.0",
            "cc-by-sa-3.0",
            "cc-by-sa-4.0",
            "odbl",
            "cdla-sharing-1.0",
            "eupl-1.1",
            "eupl-1.2",
        ),
        4,
    ),
    **dict.fromkeys(("gpl", "gpl-2.0", "gpl-3.0", "osl-3.0", "agpl-3.0", "gfdl"), 5),
    **dict.fromkeys(
        (
            "cc-by-nc-2.0",
            "cc-by-nc-3.0",
            "cc-by-nc-4.0",
            "cc-by-nd-4.0",
            "cc-by-nc-nd-3.0",
            "cc-by-nc-nd-4.0",
            "cc-by-nc-sa-2.0",
            "cc-by-nc-sa-3.0",
            "cc-by-nc-sa-4.0",
            "openrail",
            "openrail++",
            "bigscience-openrail-m",
            "creativeml-openrail-m",
            "bigscience-bloom-rail-1.0",
            "bigcode-openrail-m",
            "afl-3.0-nc",
            "deepfloyd-if-license",
            "llama2",
            "llama3",
            "llama3.1",
            "llama3.2",
            "llama3.3",
            "gemma",
            "apple-ascl",
            "intel-research",
        ),
        6,
    ),
}
_CUSTOM_LICENSE_STRICTNESS = 7

CITATION = """@article{wang2024tinysaver,
  title   = {Tiny Models are the Computational Saver for Large Models},
  author  = {Wang, Qingyuan and Cardiff, Barry and Frapp{\\'e}, Antoine and Larras, Benoit and John, Deepu},
  journal = {arXiv preprint arXiv:2403.17726},
  year    = {2024}
}"""


def stricter_license(*licenses: str | None) -> str | None:
    """Returns the most restrictive of the given Hub license ids, ignoring unknown (`None`) ones.

    Example:

    ```python
    >>> from hf_tinysaver.hub.model_card import stricter_license

    >>> stricter_license("mit", "apache-2.0")
    'apache-2.0'
    >>> stricter_license("bsd-2-clause", None)
    'bsd-2-clause'
    ```
    """
    known = sorted({license_id.lower() for license_id in licenses if license_id})
    if not known:
        return None
    return max(known, key=lambda license_id: _LICENSE_STRICTNESS.get(license_id, _CUSTOM_LICENSE_STRICTNESS))


def hub_model_id(name_or_path: str | None) -> str | None:
    """`name_or_path` if it reads as a Hub model id (`namespace/name`) and is not a local folder, else `None`."""
    if not name_or_path or not _HUB_ID_PATTERN.match(name_or_path) or os.path.exists(name_or_path):
        return None
    return name_or_path


def hub_dataset_id(name_or_path: str | None) -> str | None:
    """`name_or_path` if it reads as a Hub dataset id (`name` or `namespace/name`) and is not a local path."""
    if not name_or_path or not _DATASET_ID_PATTERN.match(name_or_path) or os.path.exists(name_or_path):
        return None
    return name_or_path


def _hub_card_license(repo_id: str) -> str | None:
    """The license in a Hub model's card metadata, or `None` when offline, unreachable or not stated."""
    if constants.HF_HUB_OFFLINE:
        return None
    from huggingface_hub import HfApi

    try:
        card_data = HfApi().model_info(repo_id, timeout=10).card_data
    except Exception:  # a missing or private repo, or no network, all mean "unknown"
        return None
    license_id = card_data.get("license") if card_data is not None else None
    return license_id if isinstance(license_id, str) else None


def _local_dataset_pretty_name(path: str | None) -> str | None:
    readme = Path(path) / "README.md" if path else None
    if readme is None or not readme.is_file():
        return None
    try:
        pretty_name = DatasetCard.load(readme, ignore_metadata_errors=True).data.get("pretty_name")
    except Exception:
        return None
    return pretty_name if isinstance(pretty_name, str) else None


# Readable names of the zoo's datasets (the `pretty_name` of their README), so that a card names them the same on
# every machine, with or without the assets folder.
_ZOO_DATASET_NAMES = {
    "cifar10": "CIFAR-10 (JPEG copy)",
    "imagenet-val-1300": "ImageNet-1k validation, 1,300-image subset",
}


def describe_dataset(dataset: str | None, origin: str | None = None) -> dict[str, Any]:
    """How the card names a dataset argument: `hub_id` only for a real Hub dataset id, never for local data.

    A local folder, or a zoo dataset name (`"cifar10"`: the zoo's local JPEG copy, not the Hub's `cifar10`), is
    named by its `pretty_name` (from its README) and its folder name, and gets no Hub id. `origin` is what the
    calibration or evaluation recorded the argument to be (`"local"`, `"zoo"`, `"hub"` or `"object"`, see
    [`~hf_tinysaver.sources.parse_source`]); it wins over guessing, so that a local path that does not exist on the
    machine that pushes (`data/my-cifar`) is not taken for a Hub id.

    Returns:
        A dict with `hub_id` (or `None`), `name` (readable), `type` (the `model-index` dataset type: the Hub id or
        the folder name) and `local` (`True` for local data).

    Example:

    ```python
    >>> from hf_tinysaver.hub.model_card import describe_dataset

    >>> describe_dataset("uoft-cs/cifar10")["hub_id"]
    'uoft-cs/cifar10'
    >>> described = describe_dataset("cifar10")  # the zoo's local copy
    >>> described["hub_id"], described["local"]
    (None, True)
    ```
    """
    if not dataset:
        return {"hub_id": None, "name": None, "type": None, "local": False}
    from ..zoo.data import ZOO_DATASETS

    path = dataset if os.path.exists(dataset) else None
    if origin in ("local", "object") and path is None:
        folder = os.path.basename(dataset.rstrip("/\\")) or dataset
        return {"hub_id": None, "name": folder, "type": folder, "local": True}
    if path is None and dataset in ZOO_DATASETS and origin in (None, "zoo"):
        folder = os.path.basename(ZOO_DATASETS[dataset])
        return {"hub_id": None, "name": _ZOO_DATASET_NAMES.get(dataset, folder), "type": folder, "local": True}
    if path is not None:
        folder = os.path.basename(os.path.abspath(path).rstrip("/\\"))
        return {"hub_id": None, "name": _local_dataset_pretty_name(path) or folder, "type": folder, "local": True}
    hub_id = hub_dataset_id(dataset)
    return {"hub_id": hub_id, "name": hub_id or dataset, "type": hub_id or dataset, "local": hub_id is None}


def _zoo_entry(*names: Any):
    """The zoo entry named by the first of `names` that is a zoo model name (or a path ending in one), else `None`."""
    from ..zoo.registry import ZOO_MODELS

    for name in names:
        if isinstance(name, str) and name:
            for candidate in (name, os.path.basename(name.rstrip("/\\"))):
                if candidate in ZOO_MODELS:
                    return ZOO_MODELS[candidate]
    return None


def _sub_model_name(sub_config: Any, hub_id: str | None, recorded_name: str | None) -> str | None:
    if recorded_name:
        return recorded_name
    if hub_id:
        return hub_id
    if sub_config is None:
        return None
    name_or_path = getattr(sub_config, "_name_or_path", "") or ""
    if name_or_path and os.path.basename(name_or_path.rstrip("/\\")):
        return os.path.basename(name_or_path.rstrip("/\\"))
    architecture = getattr(sub_config, "architecture", None)  # timm wrapper configs name the timm model here
    if isinstance(architecture, str):
        return architecture
    architectures = getattr(sub_config, "architectures", None)
    if architectures:
        return architectures[0]
    return getattr(sub_config, "model_type", None)


def _library_versions() -> dict[str, str]:
    versions = {"Python": platform.python_version(), "hf_tinysaver": TINYSAVER_VERSION}
    for label, distribution in (
        ("Transformers", "transformers"),
        ("PyTorch", "torch"),
        ("huggingface_hub", "huggingface_hub"),
        ("timm", "timm"),
        ("safetensors", "safetensors"),
    ):
        try:
            versions[label] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _percent(fraction: float, decimals: int = 2) -> str:
    return f"{100 * fraction:.{decimals}f} %"


def _macs(value: int) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}MACs"
    return f"{value} MACs"


def _markdown_table(rows: list[tuple[str, str]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|:--|--:|"]
    lines += [f"| {label} | {value} |" for label, value in rows]
    return "\n".join(lines)


@dataclass
class TinySaverModelCardData(ModelCardData):
    r"""
    What the model card of a TinySaver cascade says: front matter for the Hub and the values the template prints.

    Build it from a cascade config with [`~TinySaverModelCardData.from_config`]; every field can be overridden.
    Fields left to `None` are omitted from the card.

    Args:
        model_id (`str`, *optional*):
            The cascade's Hub repo id, used in the usage snippet.
        model_name (`str`, *optional*):
            Title of the card and name in the `model-index`; defaults to "TinySaver: {saver} -> {base} on {dataset}".
        license (`str`, *optional*):
            Hub license id of the cascade; defaults to the stricter of `saver_license` and `base_license`.
        saver_id (`str`, *optional*):
            Hub id of the saver model (listed in `base_model`).
        base_id (`str`, *optional*):
            Hub id of the base model (listed in `base_model`).
        saver_name (`str`, *optional*):
            Readable name of the saver.
        base_name (`str`, *optional*):
            Readable name of the base model.
        saver_license (`str`, *optional*):
            Hub license id of the saver.
        base_license (`str`, *optional*):
            Hub license id of the base model.
        dataset_id (`str`, *optional*):
            Hub id of the calibration dataset (listed in `datasets`).
        dataset_name (`str`, *optional*):
            Readable name of the calibration dataset.
        dataset_type (`str`, *optional*):
            Identifier of the calibration dataset in the `model-index` when it has no Hub id (e.g. its folder name).
        dataset_local (`bool`, *optional*, defaults to `False`):
            Whether the calibration data is a local folder (the card then says so and lists no Hub dataset id).
        saver_source_url (`str`, *optional*):
            Where the saver's weights are published (linked from the card); the zoo knows it for its models.
        base_source_url (`str`, *optional*):
            Where the base model's weights are published.
        saver_notice (`str`, *optional*):
            The notice the saver's license requires redistributions to carry (copyright line and terms).
        base_notice (`str`, *optional*):
            The notice the base model's license requires.
        threshold (`float`, *optional*):
            Deployed exit threshold.
        confidence (`str`, *optional*):
            Confidence score of the saver (`"max_prob"`, `"margin"` or `"entropy"`).
        num_labels (`int`, *optional*):
            Number of classes.
        saver_macs (`int`, *optional*):
            Multiply-accumulates of the saver for one image.
        base_macs (`int`, *optional*):
            Multiply-accumulates of the base model for one image.
        calibration (`dict`, *optional*):
            The calibration record (`objective`, `threshold`, `exit_rate`, `accuracy`, `base_accuracy`,
            `saver_accuracy`, `relative_macs`, `n`, `dataset`, `split`, `max_drop`); accuracies and rates are
            fractions, `max_drop` is in accuracy points.
        evaluation (`dict`, *optional*):
            What `tinysaver evaluate --save-to-folder` measured on held-out data (`evaluation.json`: `accuracy`,
            `base_accuracy`, `accuracy_drop_points`, `exit_rate`, `relative_macs`, `images_per_second`, `n`,
            `dataset`, `split`, `provenance`, and `speedup` where one was measured). Shown in the card and, in
            place of the in-sample calibration accuracy, in the `model-index`.
        plot_file (`str`, *optional*):
            File name, in the repo, of the accuracy/compute trade-off plot shown in the card.
        tags (`list[str]`, *optional*):
            Hub tags; defaults to `tinysaver`, `custom_code`, `image-classification` and `early-exit`.

    Example:

    ```python
    >>> from transformers import ViTConfig
    >>> from hf_tinysaver import TinySaverConfig
    >>> from hf_tinysaver.hub.model_card import TinySaverModelCardData

    >>> saver, base = ViTConfig(num_labels=10), ViTConfig(num_labels=10)
    >>> base._name_or_path = "google/vit-base-patch16-224"
    >>> config = TinySaverConfig(saver_config=saver, base_config=base, threshold=0.9)
    >>> card_data = TinySaverModelCardData.from_config(config, model_id="me/vit-cascade")
    >>> card_data.to_front_matter()["base_model"]
    ['google/vit-base-patch16-224']
    ```
    """

    model_id: str | None = None
    model_name: str | None = None
    license: str | None = None
    saver_id: str | None = None
    base_id: str | None = None
    saver_name: str | None = None
    base_name: str | None = None
    saver_license: str | None = None
    base_license: str | None = None
    dataset_id: str | None = None
    dataset_name: str | None = None
    dataset_type: str | None = None
    dataset_local: bool = False
    saver_source_url: str | None = None
    base_source_url: str | None = None
    saver_notice: str | None = None
    base_notice: str | None = None
    threshold: float | None = None
    confidence: str | None = None
    num_labels: int | None = None
    saver_macs: int | None = None
    base_macs: int | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    plot_file: str | None = None
    tags: list[str] = field(default_factory=lambda: list(DEFAULT_TAGS))
    library_name: str = field(default="transformers", init=False)
    pipeline_tag: str = field(default="image-classification", init=False)
    versions: dict[str, str] = field(default_factory=_library_versions, init=False)

    def __post_init__(self) -> None:
        self.license = self.license or stricter_license(self.saver_license, self.base_license)
        self.tags = list(dict.fromkeys(self.tags))
        if self.model_id is not None and not _HUB_ID_PATTERN.match(self.model_id):
            raise ValueError(f"model_id must be a Hub repo id like 'namespace/name', got {self.model_id!r}.")

    @classmethod
    def from_config(
        cls, config: TinySaverConfig, *, lookup_licenses: bool = True, **overrides
    ) -> TinySaverModelCardData:
        """Collects what the card needs from a cascade config and its calibration record.

        Sub-model Hub ids come from `calibration["saver"]` / `["base"]` or the sub-configs' `_name_or_path` when they
        read as `namespace/name` and are not local folders. Sub-model licenses come from `calibration["saver_license"]`
        / `["base_license"]`, a `license` attribute of the sub-config, or (with `lookup_licenses`) the license in the
        sub-model's Hub card (from the local cache, or the Hub unless offline).

        Args:
            config: The cascade's config.
            lookup_licenses: Whether to read sub-model licenses from their Hub cards.
            **overrides: Values for any field of this class, taking precedence over what the config gives.

        Returns:
            The card data.
        """
        recorded_calibration = dict(config.calibration or {})
        # Read through the one record type, so records of earlier versions (older key names) render the same.
        calibration = CalibrationRecord.from_dict(recorded_calibration).to_dict() if recorded_calibration else {}
        values: dict[str, Any] = {
            "threshold": config.threshold,
            "confidence": config.confidence,
            "num_labels": config.num_labels,
            "saver_macs": config.saver_macs,
            "base_macs": config.base_macs,
            "calibration": calibration,
        }
        for role, sub_config in (("saver", config.saver_config), ("base", config.base_config)):
            recorded = calibration.get(role) if isinstance(calibration.get(role), str) else None
            hub_id = hub_model_id(recorded) or hub_model_id(getattr(sub_config, "_name_or_path", None))
            values[f"{role}_id"] = hub_id
            values[f"{role}_name"] = _sub_model_name(sub_config, hub_id, recorded)
            zoo_entry = _zoo_entry(recorded, getattr(sub_config, "_name_or_path", None))
            if zoo_entry is not None:
                values[f"{role}_source_url"] = zoo_entry.source_url
                values[f"{role}_notice"] = zoo_entry.notice
            elif hub_id is not None:
                values[f"{role}_source_url"] = f"{HUB_URL}/{hub_id}"
            license_id = (
                overrides.get(f"{role}_license")
                or calibration.get(f"{role}_license")
                or getattr(sub_config, "license", None)
                or (zoo_entry.license if zoo_entry is not None else None)
            )
            if license_id is None and hub_id is not None and lookup_licenses:
                license_id = _hub_card_license(hub_id)
            values[f"{role}_license"] = license_id
        dataset = calibration.get("dataset") if isinstance(calibration.get("dataset"), str) else None
        origin = calibration.get("dataset_origin") if isinstance(calibration.get("dataset_origin"), str) else None
        described = describe_dataset(dataset, origin)
        values["dataset_id"] = described["hub_id"]
        values["dataset_local"] = described["local"]
        if described["hub_id"] is None and dataset:
            values["dataset_type"] = described["type"]
            values["dataset_name"] = described["name"]
        # The plot comes as `plot_file` (push_cascade passes the folder's tradeoff.png); cascades saved by earlier
        # versions named it in their calibration record instead.
        plot = recorded_calibration.get("plot")
        values["plot_file"] = os.path.basename(plot) if isinstance(plot, str) and plot else None
        unknown = set(overrides) - {item.name for item in fields(cls) if item.init}
        if unknown:
            raise TypeError(f"Unknown model card fields: {sorted(unknown)}.")
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    # ------------------------------------------------------------------------------------------- derived values

    @property
    def relative_saver_macs(self) -> float | None:
        if _is_number(self.saver_macs) and _is_number(self.base_macs) and self.base_macs > 0:
            return self.saver_macs / self.base_macs
        return None

    @property
    def title(self) -> str:
        if self.model_name:
            return self.model_name
        title = "TinySaver cascade"
        if self.saver_name and self.base_name:
            title = f"TinySaver: {self.saver_name} -> {self.base_name}"
        dataset = self.dataset_name or self.dataset_id
        return f"{title} on {dataset}" if dataset else title

    def _evaluation_dataset(self) -> dict[str, Any]:
        """How the card names the held-out data: the evaluation's own dataset, else the calibration's."""
        dataset, origin = self.evaluation.get("dataset"), self.evaluation.get("dataset_origin")
        if isinstance(dataset, str) and dataset:
            return describe_dataset(dataset, origin if isinstance(origin, str) else None)
        return {
            "hub_id": self.dataset_id,
            "name": self.dataset_name or self.dataset_id,
            "type": self.dataset_id or self.dataset_type,
            "local": self.dataset_local,
        }

    @property
    def hardware(self) -> str | None:
        """The hardware the evaluation's speed was measured on (GPU name, or CPU model and threads)."""
        provenance = self.evaluation.get("provenance")
        hardware = provenance.get("hardware") if isinstance(provenance, dict) else None
        return hardware if isinstance(hardware, str) and hardware else None

    def _evaluation_metrics(self) -> list[tuple[str, str, float, dict[str, Any] | None]]:
        """`(type, name, value, args)` of each held-out figure the evaluation holds."""
        evaluation = self.evaluation
        hardware = {"hardware": self.hardware} if self.hardware else None
        where = "on the calibration images" if self.evaluation_overlaps_calibration else "held-out"
        metrics = []
        for key, metric_type, name, args in (
            ("accuracy", "accuracy", f"Accuracy of the cascade ({where})", None),
            ("base_accuracy", "accuracy", f"Accuracy of the base model alone ({where})", None),
            ("accuracy_drop_points", "accuracy_drop", "Accuracy drop vs. the base model (points)", None),
            ("exit_rate", "exit_rate", "Exit rate (images answered by the saver)", None),
            ("relative_macs", "relative_macs", "Relative MACs (cascade / base model)", None),
            ("speedup", "speedup", "Measured speedup over the base model alone", hardware),
            ("images_per_second", "throughput", "Images per second of the cascade", hardware),
        ):
            if _is_number(evaluation.get(key)):
                metrics.append((metric_type, name, float(evaluation[key]), args))
        return metrics

    def _eval_results(self) -> list[EvalResult]:
        if self.evaluation:
            dataset = self._evaluation_dataset()
            if not dataset["type"]:
                return []
            split = self.evaluation.get("split")
            return [
                EvalResult(
                    task_type="image-classification",
                    task_name="Image Classification",
                    dataset_type=dataset["type"],
                    dataset_name=dataset["name"],
                    dataset_split=split if isinstance(split, str) else None,
                    metric_type=metric_type,
                    metric_name=name,
                    metric_value=value,
                    metric_args=args,
                )
                for metric_type, name, value, args in self._evaluation_metrics()
            ]
        accuracy = self.calibration.get("accuracy")
        dataset = self.dataset_id or self.dataset_name
        if not _is_number(accuracy) or not dataset:
            return []
        return [
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=self.dataset_id or self.dataset_type or dataset,
                dataset_name=self.dataset_name or dataset,
                dataset_split=self.calibration.get("split"),
                metric_type="accuracy",
                metric_name="Accuracy of the cascade (in-sample, on the calibration images)",
                metric_value=float(accuracy),
            )
        ]

    def to_front_matter(self) -> dict[str, Any]:
        """The card's YAML metadata, with the keys of `YAML_FIELDS` that have a value."""
        eval_results = self._eval_results()
        front_matter = {
            "license": self.license,
            "library_name": self.library_name,
            "pipeline_tag": self.pipeline_tag,
            "tags": list(dict.fromkeys(self.tags)) or None,
            "base_model": [model_id for model_id in (self.saver_id, self.base_id) if model_id] or None,
            "datasets": [self.dataset_id] if self.dataset_id else None,
            "metrics": ["accuracy"] if eval_results else None,
            "model-index": eval_results_to_model_index(self.title, eval_results) if eval_results else None,
        }
        return {key: front_matter[key] for key in YAML_FIELDS if front_matter[key] is not None}

    def _calibration_rows(self) -> list[tuple[str, str]]:
        record = self.calibration
        rows: list[tuple[str, str]] = []
        if record.get("objective"):
            objective = f"`{record['objective']}`"
            if _is_number(record.get("max_drop")):
                objective += f" (allowed accuracy drop: {record['max_drop']:g} points)"
            rows.append(("Objective", objective))
        if _is_number(record.get("threshold")):
            rows.append(("Threshold (exit when confidence > threshold)", f"{record['threshold']:.6g}"))
        if isinstance(record.get("exit_thresholds"), list) and all(map(_is_number, record["exit_thresholds"])):
            thresholds = ", ".join(f"{value:.6g}" for value in record["exit_thresholds"])
            rows.append(("Thresholds of the later exits (ESN)", thresholds))
        if _is_number(record.get("exit_rate")):
            rows.append(("Exit rate (images answered by the saver)", _percent(record["exit_rate"], 1)))
        accuracy, base_accuracy = record.get("accuracy"), record.get("base_accuracy")
        if _is_number(accuracy):
            rows.append(("Accuracy of the cascade", _percent(accuracy)))
        if _is_number(base_accuracy):
            rows.append(("Accuracy of the base model alone", _percent(base_accuracy)))
        if _is_number(accuracy) and _is_number(base_accuracy):
            rows.append(("Accuracy change vs. the base model", f"{100 * (accuracy - base_accuracy):+.2f} points"))
        if _is_number(record.get("saver_accuracy")):
            rows.append(("Accuracy of the saver alone", _percent(record["saver_accuracy"])))
        if _is_number(record.get("agreement")):
            rows.append(("Agreement with the base model's predictions", _percent(record["agreement"])))
        if _is_number(record.get("confidence_level")):
            rows.append(("Confidence level of the accuracy guarantee", f"{record['confidence_level']:g}"))
        certificate = record.get("certificate")
        if isinstance(certificate, dict) and _is_number(certificate.get("bound")):
            rows.append(
                (
                    "Certificate",
                    f"drop at most {certificate['bound']:.3f} points (target {certificate['target']:g}) with "
                    f"probability {certificate['level']:g}; `{certificate['method']}`, n={int(certificate['n']):,}",
                )
            )
        if isinstance(record.get("certified_points"), list):
            rows.append(("Certified operating points (`set_operating_point`)", str(len(record["certified_points"]))))
        if _is_number(record.get("relative_macs")):
            relative = record["relative_macs"]
            rows.append(("Relative MACs (cascade / base model)", f"{relative:.3f} ({100 * (relative - 1):+.1f} %)"))
        if _is_number(record.get("n")):
            rows.append(("Calibration images", f"{int(record['n']):,}"))
        if self.dataset_id or self.dataset_name:
            rows.append(("Dataset", self._dataset_markdown()))
        if record.get("split"):
            rows.append(("Split", f"`{record['split']}`"))
        return rows

    def _evaluation_rows(self) -> list[tuple[str, str]]:
        evaluation = self.evaluation
        rows: list[tuple[str, str]] = []
        accuracy, base_accuracy = evaluation.get("accuracy"), evaluation.get("base_accuracy")
        if _is_number(accuracy):
            rows.append(("Accuracy of the cascade", _percent(accuracy)))
        if _is_number(base_accuracy):
            rows.append(("Accuracy of the base model alone", _percent(base_accuracy)))
        if _is_number(evaluation.get("accuracy_drop_points")):
            rows.append(("Accuracy drop vs. the base model", f"{evaluation['accuracy_drop_points']:.2f} points"))
        if _is_number(evaluation.get("saver_accuracy")):
            rows.append(("Accuracy of the saver alone", _percent(evaluation["saver_accuracy"])))
        if _is_number(evaluation.get("exit_rate")):
            rows.append(("Exit rate (images answered by the saver)", _percent(evaluation["exit_rate"], 1)))
        if _is_number(evaluation.get("relative_macs")):
            relative = evaluation["relative_macs"]
            rows.append(("Relative MACs (cascade / base model)", f"{relative:.3f} ({100 * (relative - 1):+.1f} %)"))
        on_hardware = f" on {self.hardware}" if self.hardware else ""
        if _is_number(evaluation.get("speedup")):
            rows.append(("Measured speedup over the base model alone", f"{evaluation['speedup']:.2f}x{on_hardware}"))
        if _is_number(evaluation.get("images_per_second")):
            batch = f", batch size {evaluation['batch_size']}" if _is_number(evaluation.get("batch_size")) else ""
            rows.append(
                ("Throughput of the cascade", f"{evaluation['images_per_second']:.1f} images/s{on_hardware}{batch}")
            )
        if _is_number(evaluation.get("threshold")):
            rows.append(("Threshold evaluated", f"{evaluation['threshold']:.6g}"))
        if _is_number(evaluation.get("n")):
            rows.append(("Evaluation images", f"{int(evaluation['n']):,}"))
        dataset = self._evaluation_dataset()
        if dataset["name"]:
            rows.append(("Dataset", self._dataset_link(dataset)))
        if evaluation.get("split"):
            rows.append(("Split", f"`{evaluation['split']}`"))
        provenance = evaluation.get("provenance")
        if isinstance(provenance, dict) and provenance.get("command"):
            rows.append(("Command", f"`{provenance['command']}`".replace("|", "\\|")))
        return rows

    @property
    def evaluation_overlaps_calibration(self) -> bool:
        """Whether the evaluation ran on the calibration split itself (then it is not held out)."""
        return bool(
            self.evaluation
            and self.evaluation.get("split")
            and self.evaluation.get("split") == self.calibration.get("split")
            and self.evaluation.get("dataset") == self.calibration.get("dataset")
        )

    def _limitations(self) -> list[str]:
        items = []
        if self.num_labels:
            items.append(
                f"The cascade predicts only the {self.num_labels} classes its two models share; images of any other "
                "class still receive one of them."
            )
        else:
            items.append("The cascade predicts only the classes its two models share.")
        dataset = self._dataset_markdown()
        split = f"the split `{self.calibration['split']}` of " if self.calibration.get("split") else ""
        if dataset:
            items.append(
                f"The threshold was calibrated on {split}{dataset}. The exit rate, accuracy and savings hold for "
                "images drawn from that distribution; on other data (other cameras, resolutions, classes in other "
                "proportions) the saver's confidence, and with it the exit rate and the accuracy, can differ. "
                "Recalibrate on your own data (`tinysaver calibrate`)."
            )
        certificate = self.calibration.get("certificate")
        if isinstance(certificate, dict) and _is_number(certificate.get("bound")):
            items.append(
                f"The certificate bounds the accuracy drop against the base model at {certificate['bound']:.3f} "
                f"points with probability {certificate['level']:g} over the draw of the calibration images, for new "
                "images exchangeable with them (same distribution, drawn independently). It says nothing about the "
                "base model's own accuracy, about other data, or about a threshold changed after calibration."
            )
        elif _is_number(self.calibration.get("confidence_level")):
            items.append(
                f"The accuracy guarantee holds with probability {self.calibration['confidence_level']:g} over the "
                "draw of the calibration images, for new images from the same distribution; it bounds the drop "
                "against the base model, not the base model's own accuracy."
            )
        elif self.calibration:
            items.append(
                "No statistical guarantee was asked for: the calibration figures are measured on the calibration "
                "images themselves (in-sample) and may be optimistic for new images."
            )
        else:
            items.append(
                "No calibration is recorded: nothing in this card says how often the saver answers, or how well."
            )
        if self.evaluation_overlaps_calibration:
            items.append("The evaluation below ran on the calibration split itself, so it is not held out.")
        elif not self.evaluation:
            items.append(
                "No held-out evaluation is recorded; run `tinysaver evaluate --save-to-folder` on unseen data."
            )
        if self.hardware and (_is_number(self.evaluation.get("images_per_second")) or self.evaluation.get("speedup")):
            items.append(
                f"Speed was measured on {self.hardware}; on other hardware, batch sizes or dtypes the speedup "
                "differs, and it can be below the MAC savings."
            )
        return items

    @staticmethod
    def _model_markdown(hub_id: str | None, name: str | None, source_url: str | None = None) -> str | None:
        if hub_id:
            return f"[{hub_id}]({HUB_URL}/{hub_id})"
        if name and source_url:
            return f"[`{name}`]({source_url})"
        return f"`{name}`" if name else None

    @staticmethod
    def _dataset_link(dataset: dict[str, Any]) -> str | None:
        if dataset.get("hub_id"):
            return f"[{dataset['name'] or dataset['hub_id']}]({HUB_URL}/datasets/{dataset['hub_id']})"
        if dataset.get("local") and dataset.get("name"):
            folder = f" (folder `{dataset['type']}`)" if dataset.get("type") else ""
            return f"a local copy of {dataset['name']}{folder}"
        return dataset.get("name")

    def _dataset_markdown(self) -> str | None:
        return self._dataset_link(
            {
                "hub_id": self.dataset_id,
                "name": self.dataset_name or self.dataset_id,
                "type": self.dataset_type,
                "local": self.dataset_local or (self.dataset_id is None and bool(self.dataset_name)),
            }
        )

    def _notices(self) -> list[dict[str, str]]:
        notices = []
        for role, name, license_id, notice, source_url in (
            ("Saver", self.saver_name, self.saver_license, self.saver_notice, self.saver_source_url),
            ("Base model", self.base_name, self.base_license, self.base_notice, self.base_source_url),
        ):
            if notice or source_url:
                notices.append(
                    {
                        "role": role,
                        "name": name or role.lower(),
                        "license": license_id or "unknown",
                        "notice": notice or "",
                        "source_url": source_url or "",
                    }
                )
        return notices

    def to_dict(self) -> dict[str, Any]:
        """The values the template renders (front matter included), `None` for what is unknown."""
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        values.update(self.to_front_matter())
        relative_saver_macs = self.relative_saver_macs
        calibrated_threshold = self.calibration.get("threshold")
        values.update(
            title=self.title,
            paper_url=PAPER_URL,
            citation=CITATION,
            saver_markdown=self._model_markdown(self.saver_id, self.saver_name, self.saver_source_url),
            base_markdown=self._model_markdown(self.base_id, self.base_name, self.base_source_url),
            dataset_markdown=self._dataset_markdown(),
            threshold_text=f"{self.threshold:.6g}" if _is_number(self.threshold) else None,
            saver_macs_text=_macs(self.saver_macs) if _is_number(self.saver_macs) else None,
            base_macs_text=_macs(self.base_macs) if _is_number(self.base_macs) else None,
            relative_saver_macs_text=f"{relative_saver_macs:.3f}" if relative_saver_macs is not None else None,
            calibration_table=_markdown_table(self._calibration_rows(), ("Calibration", "Value"))
            if self._calibration_rows()
            else None,
            calibrated_threshold_differs=_is_number(calibrated_threshold)
            and _is_number(self.threshold)
            and not math.isclose(calibrated_threshold, self.threshold, rel_tol=1e-9, abs_tol=1e-12),
            calibrated_threshold_text=f"{calibrated_threshold:.6g}" if _is_number(calibrated_threshold) else None,
            evaluation_table=_markdown_table(self._evaluation_rows(), ("Held-out evaluation", "Value"))
            if self.evaluation and self._evaluation_rows()
            else None,
            evaluation_overlaps_calibration=self.evaluation_overlaps_calibration,
            limitations=self._limitations(),
            notices=self._notices(),
            licenses_differ=bool(
                self.saver_license and self.base_license and self.saver_license.lower() != self.base_license.lower()
            ),
        )
        return values

    def to_yaml(self, line_break: str | None = None, original_order: list[str] | None = None) -> str:
        return yaml_dump(self.to_front_matter(), sort_keys=False, line_break=line_break).strip()


def save_model_card(card: ModelCard, path: str | os.PathLike) -> Path:
    """Writes a rendered card to `path` atomically (a reader never sees a half-written file).

    Returns:
        The path written.
    """
    return write_text_atomic(path, str(card))


def generate_model_card(
    config: TinySaverConfig, card_data: TinySaverModelCardData | None = None, **card_fields
) -> ModelCard:
    """Renders the model card of a cascade through the packaged template.

    Args:
        config: The cascade's config (ignored for the card's content when `card_data` is given).
        card_data: Card data to render as is; built with `TinySaverModelCardData.from_config(config, **card_fields)`
            when omitted.
        **card_fields: Overrides for `TinySaverModelCardData.from_config`, e.g. `model_id="me/my-cascade"`.

    Returns:
        A `huggingface_hub.ModelCard`; `card.save("README.md")` writes it, `str(card)` gives its text.

    Example:

    ```python
    >>> from transformers import ViTConfig
    >>> from hf_tinysaver import TinySaverConfig
    >>> from hf_tinysaver.hub.model_card import generate_model_card

    >>> config = TinySaverConfig(saver_config=ViTConfig(num_labels=10), base_config=ViTConfig(num_labels=10))
    >>> card = generate_model_card(config, model_id="me/vit-cascade")
    >>> card.data.library_name, card.data.pipeline_tag
    ('transformers', 'image-classification')
    ```
    """
    if card_data is None:
        card_data = TinySaverModelCardData.from_config(config, **card_fields)
    elif card_fields:
        raise TypeError("Pass either `card_data` or card fields, not both.")
    return ModelCard.from_template(card_data, template_path=str(TEMPLATE_PATH))


__all__ = [
    "CITATION",
    "DEFAULT_TAGS",
    "TEMPLATE_PATH",
    "TinySaverModelCardData",
    "describe_dataset",
    "generate_model_card",
    "hub_dataset_id",
    "hub_model_id",
    "save_model_card",
    "stricter_license",
]
