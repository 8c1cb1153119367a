"""Tiny random classifiers for fast tests: timm `test_*` architectures via TimmWrapper and tiny transformers ones."""

from __future__ import annotations

import torch
from transformers import (
    ResNetConfig,
    ResNetForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from hf_tinysaver import preprocessing_from_image_processor

NUM_LABELS = 10
LABELS = {i: f"class_{i}" for i in range(NUM_LABELS)}


def randomize(model: torch.nn.Module, seed: int, logit_scale: float = 3.0) -> None:
    """Gives every weight a fan-in scaled random value.

    The default init of wrapped timm test models collapses the features to ~0, so every image would get the same
    logits; with these weights confidences vary per image and exits are mixed, as with real models.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim > 1:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("weight"):
                parameter.fill_(1.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        if classifier is not None:
            classifier.weight.mul_(logit_scale)


def timm_classifier(architecture: str = "test_efficientnet", seed: int = 0, labels=LABELS, **model_args):
    torch.manual_seed(seed)
    config = TimmWrapperConfig(
        architecture=architecture, num_labels=len(labels), id2label=dict(labels), model_args=model_args or None
    )
    model = TimmWrapperForImageClassification(config)
    randomize(model.timm_model, seed)
    return model.eval()


def tiny_vit(image_size: int = 32, seed: int = 1, labels=LABELS):
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        id2label=dict(labels),
    )
    return ViTForImageClassification(config).eval()


def tiny_vit_processor(image_size: int = 32) -> ViTImageProcessor:
    return ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def tiny_vit_preprocessing(image_size: int = 32) -> dict:
    return preprocessing_from_image_processor(tiny_vit_processor(image_size))


def tiny_resnet(seed: int = 2, labels=LABELS):
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        id2label=dict(labels),
    )
    return ResNetForImageClassification(config).eval()
