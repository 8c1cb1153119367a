"""Everything `save_pretrained` copies into a cascade's folder: flat files importing only torch, transformers, timm,
numpy and each other.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from .configuration_cifar_resnet import CifarResNetConfig
from .configuration_tinysaver import TinySaverConfig
from .configuration_tinysaver_esn import TinySaverESNConfig
from .image_processing_tinysaver import TinySaverImageProcessor
from .modeling_cifar_resnet import CifarResNetForImageClassification
from .modeling_tinysaver import TinySaverForImageClassification
from .modeling_tinysaver_esn import TinySaverESNForImageClassification

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
