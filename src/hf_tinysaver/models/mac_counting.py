"""Multiply-accumulate (MAC) counts of image classifiers, as the cost measure of TinySaver cascades.

MACs are counted by running one image through the model under `torch.utils.flop_counter.FlopCounterMode`, which
counts the FLOPs of matrix multiplications, convolutions and attention (1 MAC = 2 FLOPs). Element-wise operations
(normalisation, activations, pooling) are not counted, as in the published figures of timm and the papers.

Copied next to saved cascades as remote code: imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts the fused attention kernels of CUDA but not the CPU one that `scaled_dot_product_attention` uses on
# CPU, which would leave out every attention matmul of a ViT counted on CPU.
_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def infer_input_size(model: nn.Module) -> tuple[int, int, int]:
    """Finds the `(channels, height, width)` a model expects from its config or its timm data config.

    Looked up in order: `config.preprocessing["input_size"]` (zoo and TinySaver models), the timm `pretrained_cfg`
    (timm models and `TimmWrapper` models), `config.image_size` with `config.num_channels` (transformers models).

    Args:
        model: The model.

    Returns:
        The input size as a tuple of three ints.
    """
    config = getattr(model, "config", None)
    preprocessing = getattr(config, "preprocessing", None)
    if isinstance(preprocessing, dict) and preprocessing.get("input_size"):
        return tuple(int(v) for v in preprocessing["input_size"])
    timm_model = getattr(model, "timm_model", model)
    pretrained_cfg = getattr(timm_model, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, dict) and pretrained_cfg.get("input_size"):
        return tuple(int(v) for v in pretrained_cfg["input_size"])
    image_size = getattr(config, "image_size", None)
    if image_size is not None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        return int(getattr(config, "num_channels", 3)), int(height), int(width)
    raise ValueError(
        f"Cannot tell the input size of {type(model).__name__}; pass `input_size=(channels, height, width)`."
    )


def count_macs(model: nn.Module, input_size: Sequence[int] | None = None) -> int:
    """Counts the multiply-accumulates of one forward pass on a single image.

    Works for transformers models (whose `forward` takes `pixel_values`, `TimmWrapper` models included) and plain
    `nn.Module`s (timm models). Attention is counted on CPU as well (the CPU fused attention kernel is given the
    same formula torch uses for the CUDA kernels).

    Args:
        model: The classifier. It is run once in eval mode without gradients; its train/eval mode is restored.
        input_size: `(channels, height, width)` of one input image. Defaults to the size the model's config or
            timm data config declares (see [`infer_input_size`]).

    Returns:
        MACs per image (FLOPs / 2), as an int.

    Example:

    ```python
    >>> import timm
    >>> from hf_tinysaver.models.mac_counting import count_macs

    >>> model = timm.create_model("resnet18", pretrained=False)
    >>> round(count_macs(model, input_size=(3, 224, 224)) / 1e9, 2)
    1.81
    ```
    """
    if input_size is None:
        input_size = infer_input_size(model)
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) != 3:
        raise ValueError(f"input_size must be (channels, height, width), got {input_size}.")
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    pixel_values = torch.zeros((1, *input_size), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        return count_macs_of(model, pixel_values)
    finally:
        model.train(was_training)


def count_macs_of(function: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Counts the multiply-accumulates of one call `function(*args, **kwargs)`, without gradients.

    The counter behind [`count_macs`], for parts of a model (a stem, one stage, a head) or any other computation;
    attention is counted on CPU as well.

    Args:
        function: What to call, e.g. a module or a bound method.
        args: Its positional arguments.
        kwargs: Its keyword arguments.

    Returns:
        MACs of the call (FLOPs / 2), as an int.

    Example:

    ```python
    >>> import torch
    >>> from hf_tinysaver.models.mac_counting import count_macs_of

    >>> count_macs_of(torch.nn.Linear(8, 4), torch.zeros(2, 8))
    64
    ```
    """
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with torch.no_grad(), counter:
        function(*args, **kwargs)
    return int(counter.get_total_flops()) // 2


def macs_summary(macs: int) -> str:
    """Formats a MAC count for people: `"41.2 M"`, `"1.82 G"`."""
    if macs >= 10**9:
        return f"{macs / 1e9:.2f} G"
    return f"{macs / 1e6:.1f} M"


__all__ = ["count_macs", "count_macs_of", "infer_input_size", "macs_summary"]
