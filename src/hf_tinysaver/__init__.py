"""hf_tinysaver: TinySaver cascades for Hugging Face image classifiers.

A tiny *saver* classifier answers the images it is confident about; only the others reach the large *base* model
(Wang et al., "Tiny Models are the Computational Saver for Large Models", arXiv 2403.17726).
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

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

# Loading without remote code once hf_tinysaver is imported...
AutoConfig.register(TinySaverConfig.model_type, TinySaverConfig, exist_ok=True)
AutoModelForImageClassification.register(TinySaverConfig, TinySaverForImageClassification, exist_ok=True)
AutoImageProcessor.register(
    TinySaverConfig, image_processor_classes={"torchvision": TinySaverImageProcessor}, exist_ok=True
)
AutoConfig.register(CifarResNetConfig.model_type, CifarResNetConfig, exist_ok=True)
AutoModelForImageClassification.register(CifarResNetConfig, CifarResNetForImageClassification, exist_ok=True)
AutoConfig.register(TinySaverESNConfig.model_type, TinySaverESNConfig, exist_ok=True)
AutoModelForImageClassification.register(TinySaverESNConfig, TinySaverESNForImageClassification, exist_ok=True)
AutoImageProcessor.register(TinySaverESNConfig, TinySaverImageProcessor, exist_ok=True)
# ...and with it (`trust_remote_code=True`) where it is not installed: saved folders carry `auto_map` and the code.
TinySaverConfig.register_for_auto_class()
TinySaverForImageClassification.register_for_auto_class("AutoModelForImageClassification")
TinySaverImageProcessor.register_for_auto_class("AutoImageProcessor")
CifarResNetConfig.register_for_auto_class()
CifarResNetForImageClassification.register_for_auto_class("AutoModelForImageClassification")
TinySaverESNConfig.register_for_auto_class()
TinySaverESNForImageClassification.register_for_auto_class("AutoModelForImageClassification")

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
