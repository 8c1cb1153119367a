"""CIFAR-10 ResNet-20/32/44/56 (He et al. 2016, weights by Y. Idelbayev) as `CifarResNetForImageClassification`."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.configuration_cifar_resnet import CifarResNetConfig
from ..models.image_processing_tinysaver import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, normalize_preprocessing
from ..models.modeling_cifar_resnet import CifarResNetForImageClassification

CIFAR_RESNET_FILES = {
    20: "models/cifar10-resnet/resnet20-12fca82f.th",
    32: "models/cifar10-resnet/resnet32-d509ac18.th",
    44: "models/cifar10-resnet/resnet44-014dd654.th",
    56: "models/cifar10-resnet/resnet56-4bfd9763.th",
}

# The checkpoints were trained on 32x32 CIFAR images normalised with the ImageNet mean and std, without resizing.
CIFAR_RESNET_PREPROCESSING = normalize_preprocessing(
    {
        "input_size": [3, 32, 32],
        "resize": "fixed",
        "interpolation": "bilinear",
        "mean": list(IMAGENET_DEFAULT_MEAN),
        "std": list(IMAGENET_DEFAULT_STD),
    }
)


def convert_cifar_resnet(checkpoint_path: str | Path, depth: int) -> CifarResNetForImageClassification:
    """Loads a pretrained CIFAR ResNet checkpoint (`{"state_dict": ...}` saved from `DataParallel`).

    Args:
        checkpoint_path: The `.th` file.
        depth: Its depth (20, 32, 44 or 56).

    Returns:
        The model in eval mode, every parameter and buffer taken from the checkpoint.
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state_dict = {key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()}
    config = CifarResNetConfig(depth=depth)
    config.label2id = {name: index for index, name in config.id2label.items()}
    model = CifarResNetForImageClassification(config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


__all__ = ["CIFAR_RESNET_FILES", "CIFAR_RESNET_PREPROCESSING", "convert_cifar_resnet"]
