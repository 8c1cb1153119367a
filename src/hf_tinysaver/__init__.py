"""hf_tinysaver: TinySaver cascades for Hugging Face image classifiers.

A tiny *saver* classifier answers the images it is confident about; only the others reach the large *base* model
(Wang et al., "Tiny Models are the Computational Saver for Large Models", arXiv 2403.17726).

Importing the library registers its model classes with the transformers Auto classes (see `hf_tinysaver.models`).
"""

from .calibration.simulation import (
    CalibrationResult,
    CascadeSimulation,
    InfeasibleTargetError,
    fit_temperature,
)
from .models.confidence import CONFIDENCE_METRICS, compute_confidence
from .models.configuration_cifar_resnet import CIFAR10_LABELS, CifarResNetConfig
from .models.configuration_tinysaver import TINYSAVER_VERSION, TinySaverConfig
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

__version__ = TINYSAVER_VERSION

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
