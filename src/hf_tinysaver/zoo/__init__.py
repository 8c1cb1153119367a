"""Real pretrained classifiers turned into Hugging Face models: CIFAR-10 ResNets, ImageNet EfficientNet-Lite and
MobileNets, plus the datasets they are evaluated on.

Every zoo model is converted offline from its original weights into a `save_pretrained` folder (safetensors weights,
a config with label names, MACs per image and preprocessing spec, and a `TinySaverImageProcessor`), cached, and
loaded with the Auto classes like any Hub model.

Example:

```python
>>> from hf_tinysaver.zoo import ZOO, load_zoo_model

>>> "cifar10-resnet56" in ZOO
True
>>> model = load_zoo_model("cifar10-resnet56")
>>> round(model.config.macs / 1e6)
125
```
"""

from .assets import resolve_assets
from .data import ZOO_DATASETS, imagenet_label_names, load_zoo_dataset, zoo_dataset_folder
from .registry import (
    ZOO,
    ZOO_MODELS,
    ZooModel,
    build_zoo_model,
    cached_zoo_folder,
    export_zoo_model,
    get_zoo_entry,
    load_zoo_model,
)

__all__ = [
    "ZOO",
    "ZOO_DATASETS",
    "ZOO_MODELS",
    "ZooModel",
    "build_zoo_model",
    "cached_zoo_folder",
    "export_zoo_model",
    "get_zoo_entry",
    "imagenet_label_names",
    "load_zoo_dataset",
    "load_zoo_model",
    "resolve_assets",
    "zoo_dataset_folder",
]
