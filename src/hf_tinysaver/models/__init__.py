"""The model classes: the files `save_pretrained` copies into a cascade's folder (flat modules importing only torch,
transformers, timm, numpy and each other), and this package file, which is not copied.

Importing any of the model modules runs this file first, which connects the classes to transformers and to the rest
of the library:

- Auto registrations: `AutoConfig` / `AutoModelForImageClassification` / `AutoImageProcessor` load saved folders
  without remote code once any model or config class of the library is in use, and `register_for_auto_class` makes `save_pretrained` write
  `auto_map` and the code, so folders also load with `trust_remote_code=True` where hf_tinysaver is not installed.
- Library hooks of [`TinySaverForImageClassification`]: `push_to_hub` with a generated model card
  (`hf_tinysaver.hub.push`) and names in `from_saver_and_base` resolved by `hf_tinysaver.sources` (zoo names too), imported only when used.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel

from .configuration_cifar_resnet import CifarResNetConfig
from .configuration_tinysaver import TinySaverConfig
from .configuration_tinysaver_esn import TinySaverESNConfig
from .image_processing_tinysaver import TinySaverImageProcessor
from .modeling_cifar_resnet import CifarResNetForImageClassification
from .modeling_tinysaver import TinySaverForImageClassification
from .modeling_tinysaver_esn import TinySaverESNForImageClassification


def push_with_model_card(model: TinySaverForImageClassification, repo_id: str, **kwargs: Any) -> Any:
    """The installed library's `hub_publisher`: [`hf_tinysaver.hub.push.push_cascade`] (model card and plot)."""
    from ..hub.push import push_cascade

    return push_cascade(model, repo_id, **kwargs)


def load_named_model(name: str) -> PreTrainedModel:
    """The installed library's `model_resolver`: [`hf_tinysaver.sources.load_model`], the one rule for what a name
    means (an existing local folder, then a zoo name, then a Hub id; an unknown name is an error that suggests one)."""
    from ..sources import load_model

    return load_model(name)


TinySaverForImageClassification.hub_publisher = push_with_model_card
TinySaverForImageClassification.model_resolver = load_named_model

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
    "CifarResNetConfig",
    "CifarResNetForImageClassification",
    "TinySaverConfig",
    "TinySaverESNConfig",
    "TinySaverESNForImageClassification",
    "TinySaverForImageClassification",
    "TinySaverImageProcessor",
    "load_named_model",
    "push_with_model_card",
]
