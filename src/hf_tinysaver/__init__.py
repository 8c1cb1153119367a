"""hf_tinysaver: TinySaver cascades for Hugging Face image classifiers.

A tiny *saver* classifier answers the images it is confident about; only the others reach the large *base* model
(Wang et al., "Tiny Models are the Computational Saver for Large Models", arXiv 2403.17726).

The names below load on first use (PEP 562), so that `import hf_tinysaver` and `tinysaver --help` stay fast: torch
and transformers are imported only when a name that needs them is. The Auto-class registrations run with
`hf_tinysaver.models`, which every model and config class loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .calibration.simulation import (
        CalibrationResult,
        CascadeSimulation,
        InfeasibleTargetError,
        fit_temperature,
    )
    from .models.confidence import CONFIDENCE_METRICS, compute_confidence
    from .models.configuration_cifar_resnet import CIFAR10_LABELS, CifarResNetConfig
    from .models.configuration_tinysaver import TinySaverConfig
    from .models.configuration_tinysaver_esn import TinySaverESNConfig
    from .models.image_processing_tinysaver import (
        TinySaverImageProcessor,
        normalize_preprocessing,
        preprocessing_from_image_processor,
        preprocessing_from_timm,
    )
    from .models.modeling_cifar_resnet import CifarResNetForImageClassification
    from .models.modeling_tinysaver import (
        TinySaverForImageClassification,
        TinySaverImageClassifierOutput,
        retain_freed_memory,
    )
    from .models.modeling_tinysaver_esn import TinySaverESNForImageClassification, TinySaverESNImageClassifierOutput
    from .records import Records, pair_from_records, record

    __version__: str

# Public name -> the module that defines it.
_LAZY_NAMES = {
    "CalibrationResult": "calibration.simulation",
    "CascadeSimulation": "calibration.simulation",
    "InfeasibleTargetError": "calibration.simulation",
    "fit_temperature": "calibration.simulation",
    "CONFIDENCE_METRICS": "models.confidence",
    "compute_confidence": "models.confidence",
    "CIFAR10_LABELS": "models.configuration_cifar_resnet",
    "CifarResNetConfig": "models.configuration_cifar_resnet",
    "TinySaverConfig": "models.configuration_tinysaver",
    "TinySaverESNConfig": "models.configuration_tinysaver_esn",
    "TinySaverImageProcessor": "models.image_processing_tinysaver",
    "normalize_preprocessing": "models.image_processing_tinysaver",
    "preprocessing_from_image_processor": "models.image_processing_tinysaver",
    "preprocessing_from_timm": "models.image_processing_tinysaver",
    "CifarResNetForImageClassification": "models.modeling_cifar_resnet",
    "TinySaverForImageClassification": "models.modeling_tinysaver",
    "TinySaverImageClassifierOutput": "models.modeling_tinysaver",
    "retain_freed_memory": "models.modeling_tinysaver",
    "TinySaverESNForImageClassification": "models.modeling_tinysaver_esn",
    "TinySaverESNImageClassifierOutput": "models.modeling_tinysaver_esn",
    "Records": "records",
    "pair_from_records": "records",
    "record": "records",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from .models.configuration_tinysaver import TINYSAVER_VERSION

        value = TINYSAVER_VERSION
    elif name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "CIFAR10_LABELS",
    "CONFIDENCE_METRICS",
    "CalibrationResult",
    "CascadeSimulation",
    "CifarResNetConfig",
    "CifarResNetForImageClassification",
    "InfeasibleTargetError",
    "Records",
    "TinySaverConfig",
    "TinySaverESNConfig",
    "TinySaverESNForImageClassification",
    "TinySaverESNImageClassifierOutput",
    "TinySaverForImageClassification",
    "TinySaverImageClassifierOutput",
    "TinySaverImageProcessor",
    "compute_confidence",
    "fit_temperature",
    "normalize_preprocessing",
    "pair_from_records",
    "preprocessing_from_image_processor",
    "preprocessing_from_timm",
    "record",
    "retain_freed_memory",
    "__version__",
]
