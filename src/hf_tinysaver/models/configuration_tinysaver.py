"""Configuration of a TinySaver cascade: a tiny saver classifier in front of a large base classifier.

This file is copied next to saved cascades as remote code: it imports only transformers and flat siblings.
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
import os
import warnings
from typing import Any

from transformers import CONFIG_MAPPING, PreTrainedConfig
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from .confidence import CONFIDENCE_METRICS

TINYSAVER_VERSION = "0.2.0"

# Sub-model configs whose code a loaded cascade's folder carries (e.g. the CIFAR ResNets, written there by
# `save_pretrained` only for cascades that hold one), by model type, as resolved from that folder.
SHIPPED_CONFIG_CLASSES: dict[str, type[PreTrainedConfig]] = {}
# The `from_pretrained` arguments that say where and how to fetch a sub-model's code.
CODE_LOADING_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only")

# Keys this version writes; keys outside this set (and outside PreTrainedConfig's own) come from a newer version.
_TINYSAVER_KEYS = {
    "saver_config",
    "base_config",
    "threshold",
    "confidence",
    "confidence_temperature",
    "label_mapping",
    "saver_preprocessing",
    "base_preprocessing",
    "saver_macs",
    "base_macs",
    "calibration",
    "tinysaver_version",
}


# Every confidence metric scores in [0, 1]: a threshold of 1 sends every image to the base, and any threshold below 0
# lets every image exit (calibration writes such a value, e.g. -0.5, when an image of confidence 0 must exit too).
THRESHOLD_RANGE = (-1.0, 1.0)


def validate_threshold(value: Any, name: str = "threshold") -> float:
    """Returns `value` as a float when it is a valid exit threshold, else raises a `ValueError` saying why.

    An image exits when its confidence, a score in [0, 1] for every metric, is strictly greater than the threshold.
    Valid thresholds are finite real numbers in [-1, 1] (1 sends every image to the base; below 0, every image
    exits); booleans, strings, NaN and infinities are refused.

    Args:
        value: The threshold to check (a Python, NumPy or 0-d tensor number).
        name: How the value is named in the error message, e.g. `"exit_thresholds[1]"` or `"--threshold"`.

    Returns:
        The threshold as a Python float.

    Example:

    ```python
    >>> from hf_tinysaver.models.configuration_tinysaver import validate_threshold

    >>> validate_threshold(0.9)
    0.9
    >>> validate_threshold(float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: threshold must be a finite number in [-1, 1] (an image exits when its confidence, in [0, 1], is greater: 1 sends every image to the base), got nan.
    ```
    """
    low, high = THRESHOLD_RANGE
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()  # NumPy scalars and 0-d tensors
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{name} must be a number in [{low:g}, {high:g}] (an image exits when its confidence, in [0, 1], is "
            f"greater), got {value!r} of type {type(value).__name__}."
        )
    threshold = float(value)
    if not math.isfinite(threshold) or not low <= threshold <= high:
        raise ValueError(
            f"{name} must be a finite number in [{low:g}, {high:g}] (an image exits when its confidence, in [0, 1], "
            f"is greater: 1 sends every image to the base), got {value!r}."
        )
    return threshold


def validate_label_mapping(label_mapping: Any) -> list[int] | None:
    """Returns `label_mapping` as a list of Python ints (or None), else raises a `ValueError` naming the bad entry.

    Args:
        label_mapping: Saver class `i` -> base class index `label_mapping[i]`; entries must be integers (Python,
            NumPy or 0-d integer tensors), not floats, booleans or strings.

    Returns:
        The mapping as a new list of ints, or None.
    """
    if label_mapping is None:
        return None
    if isinstance(label_mapping, (str, bytes, dict)) or not hasattr(label_mapping, "__iter__"):
        raise ValueError(
            f"label_mapping must be a list of base class indices (one per saver class), got {type(label_mapping).__name__}."
        )
    entries = []
    for position, entry in enumerate(label_mapping):
        try:
            if isinstance(entry, bool) or isinstance(entry, float):
                raise TypeError
            entries.append(operator.index(entry))
        except TypeError:
            raise ValueError(
                f"label_mapping entries must be integer base class indices, got {entry!r} "
                f"({type(entry).__name__}) at position {position}."
            ) from None
    return entries


def sub_config_from_dict(config_dict: dict[str, Any]) -> PreTrainedConfig:
    """Rebuilds a nested sub-model config from its serialised dict, keeping its class and label space.

    Args:
        config_dict: The dict written by `PreTrainedConfig.to_dict()`; must contain `model_type`.

    Returns:
        The config instance of the right class (e.g. `TimmWrapperConfig`, `ViTConfig`, `CifarResNetConfig`).
    """
    model_type = config_dict.get("model_type")
    if model_type is None:
        raise ValueError(
            "A nested sub-model config has no `model_type`; save the sub-model with `save_pretrained` or pass the "
            "config object itself."
        )
    if model_type in CONFIG_MAPPING:
        config_class = CONFIG_MAPPING[model_type]
    elif model_type in SHIPPED_CONFIG_CLASSES:
        config_class = SHIPPED_CONFIG_CLASSES[model_type]
    else:
        raise ValueError(
            f"Unknown sub-model type {model_type!r}: upgrade transformers, import the library that defines it, or "
            "load the cascade with `from_pretrained(..., trust_remote_code=True)` from a folder that carries its code."
        )
    return config_class.from_dict(copy.deepcopy(config_dict))


def shipped_sub_config(
    config_dict: dict[str, Any], folder_or_repo: str | os.PathLike, **kwargs: Any
) -> PreTrainedConfig | None:
    """Builds a sub-model config whose class is shipped as code next to the cascade, not known to transformers.

    `save_pretrained` writes such sub-configs with an `auto_map` naming their files (`configuration_cifar_resnet`,
    `modeling_cifar_resnet`); the class is loaded from the cascade's own folder or repo, as `trust_remote_code=True`
    loads the cascade's classes, and remembered in `SHIPPED_CONFIG_CLASSES`. The config's `name_or_path` points there
    too, so [`build_classifier`] finds the model class the same way.

    Args:
        config_dict: The sub-model's serialised config.
        folder_or_repo: Where the cascade is loaded from.
        kwargs: How to fetch code from there (`revision`, `token`, `cache_dir`, ...).

    Returns:
        The config, or `None` when its type is known to transformers or it names no shipped code.
    """
    model_type = config_dict.get("model_type")
    reference = (config_dict.get("auto_map") or {}).get("AutoConfig")
    if model_type is None or model_type in CONFIG_MAPPING or reference is None:
        return None
    config_class = get_class_from_dynamic_module(reference, folder_or_repo, **kwargs)
    SHIPPED_CONFIG_CLASSES[model_type] = config_class
    config = config_class.from_dict(copy.deepcopy(config_dict))
    config.name_or_path = str(folder_or_repo)
    config._commit_hash = kwargs.get("revision")
    return config


class TinySaverConfig(PreTrainedConfig):
    r"""
    Configuration of a [`TinySaverForImageClassification`] cascade. A tiny *saver* classifier runs on every image;
    images on which its confidence exceeds `threshold` exit with the saver's prediction, the others are answered by
    the large *base* classifier alone (TinySaver, Wang et al., arXiv 2403.17726).

    Args:
        saver_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the saver (any image-classification config: `TimmWrapperConfig`, `ViTConfig`, ...).
        base_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the base model. The cascade's `id2label` is the base's.
        threshold (`float`, *optional*, defaults to 1.0):
            An image exits at the saver when its confidence is strictly greater than this value. Every confidence is
            in [0, 1], so 1.0 sends every image to the base; a finite number in [-1, 1] (see [`validate_threshold`]),
            checked on every assignment.
        confidence (`str`, *optional*, defaults to `"max_prob"`):
            Confidence score of the saver: `"max_prob"` (the paper's maximum softmax probability), `"margin"` (top-1
            minus top-2 probability) or `"entropy"` (1 minus the normalised entropy of the softmax).
        confidence_temperature (`float`, *optional*, defaults to 1.0):
            Saver logits are divided by this value before the confidence is computed (it never changes predictions).
            Not named `temperature`, which transformers reserves for generation.
        label_mapping (`list[int]`, *optional*):
            For savers with another label space: saver class `i` is base class `label_mapping[i]` (integers).
        saver_preprocessing (`dict`, *optional*):
            How an image is prepared for the saver (`input_size`, `resize`, `crop_pct`, `interpolation`, `mean`,
            `std`); see [`TinySaverImageProcessor`].
        base_preprocessing (`dict`, *optional*):
            The same for the base model.
        saver_macs (`int`, *optional*):
            Multiply-accumulates of the saver for one image at its own input size.
        base_macs (`int`, *optional*):
            Multiply-accumulates of the base for one image at its own input size.
        calibration (`dict`, *optional*):
            Free-form record of how `threshold` was chosen (objective, data, measured exit rate and accuracy).

    Example:

    ```python
    >>> from transformers import TimmWrapperConfig
    >>> from hf_tinysaver import TinySaverConfig

    >>> saver = TimmWrapperConfig(architecture="test_efficientnet", num_labels=10)
    >>> base = TimmWrapperConfig(architecture="test_vit", num_labels=10)
    >>> config = TinySaverConfig(saver_config=saver, base_config=base, threshold=0.9)
    >>> config.num_labels
    10
    ```
    """

    model_type = "tinysaver"

    def __init__(
        self,
        saver_config: PreTrainedConfig | dict[str, Any] | None = None,
        base_config: PreTrainedConfig | dict[str, Any] | None = None,
        threshold: float = 1.0,
        confidence: str = "max_prob",
        confidence_temperature: float = 1.0,
        label_mapping: list[int] | None = None,
        saver_preprocessing: dict[str, Any] | None = None,
        base_preprocessing: dict[str, Any] | None = None,
        saver_macs: int | None = None,
        base_macs: int | None = None,
        calibration: dict[str, Any] | None = None,
        tinysaver_version: str | None = None,
        **kwargs,
    ):
        if isinstance(saver_config, dict):
            saver_config = sub_config_from_dict(saver_config)
        if isinstance(base_config, dict):
            base_config = sub_config_from_dict(base_config)
        if confidence not in CONFIDENCE_METRICS:
            raise ValueError(f"confidence must be one of {CONFIDENCE_METRICS}, got {confidence!r}.")
        if not confidence_temperature > 0:
            raise ValueError(f"confidence_temperature must be positive, got {confidence_temperature}.")

        self.saver_config = saver_config
        self.base_config = base_config
        self.threshold = threshold
        self.confidence = confidence
        self.confidence_temperature = float(confidence_temperature)
        self.label_mapping = label_mapping
        self.saver_preprocessing = saver_preprocessing
        self.base_preprocessing = base_preprocessing
        self.saver_macs = saver_macs
        self.base_macs = base_macs
        self.calibration = calibration or {}
        self.tinysaver_version = TINYSAVER_VERSION
        self._warn_on_newer_keys(tinysaver_version, kwargs)

        if base_config is not None and "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["id2label"] = dict(base_config.id2label)
        super().__init__(**kwargs)

    @classmethod
    def get_config_dict(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        # Sub-models whose code lies next to the cascade (a CIFAR ResNet) get their config class from there: only
        # here is the folder or repo known.
        code_kwargs = {key: kwargs[key] for key in CODE_LOADING_KWARGS if kwargs.get(key) is not None}
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("_commit_hash"):
            code_kwargs["revision"] = config_dict["_commit_hash"]
        for key in ("saver_config", "base_config"):
            if isinstance(config_dict.get(key), dict):
                shipped = shipped_sub_config(config_dict[key], pretrained_model_name_or_path, **code_kwargs)
                if shipped is not None:
                    config_dict[key] = shipped
        return config_dict, kwargs

    def __setattr__(self, key: str, value: Any) -> None:
        # Checked on every assignment (`config.threshold = 0.9` too), so no invalid value reaches the forward pass.
        if key == "threshold":
            value = validate_threshold(value)
        elif key == "label_mapping":
            value = validate_label_mapping(value)
        super().__setattr__(key, value)

    @staticmethod
    def _warn_on_newer_keys(saved_version: str | None, kwargs: dict[str, Any]) -> None:
        known = (
            set(PreTrainedConfig().to_dict())
            | _TINYSAVER_KEYS
            | {"auto_map", "_name_or_path", "name_or_path", "num_labels"}
        )
        unknown = sorted(key for key in kwargs if key not in known and not key.startswith("_"))
        if unknown:
            origin = f"hf_tinysaver {saved_version}" if saved_version else "another version of hf_tinysaver"
            warnings.warn(
                f"This TinySaver config was written by {origin} and has keys this version ({TINYSAVER_VERSION}) "
                f"does not know: {unknown}. They are kept but ignored; upgrade hf_tinysaver to use them.",
                UserWarning,
                stacklevel=3,
            )

    @property
    def relative_saver_macs(self) -> float | None:
        """Saver MACs divided by base MACs (`s` in the paper), or `None` when either is unknown."""
        if not self.saver_macs or not self.base_macs:
            return None
        return self.saver_macs / self.base_macs

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key in ("saver_config", "base_config"):
            if isinstance(output.get(key), PreTrainedConfig):
                output[key] = output[key].to_dict()
        output["tinysaver_version"] = TINYSAVER_VERSION
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        # Nested configs and the version stamp are always written in full, so a cascade reloads on its own.
        output = super().to_diff_dict()
        full = self.to_dict()
        for key in ("saver_config", "base_config", "threshold", "confidence", "tinysaver_version"):
            output[key] = full[key]
        return output


__all__ = [
    "TinySaverConfig",
    "TINYSAVER_VERSION",
    "CONFIDENCE_METRICS",
    "THRESHOLD_RANGE",
    "shipped_sub_config",
    "sub_config_from_dict",
    "validate_label_mapping",
    "validate_threshold",
]
