"""Inference optimisations of image classifiers: batch norms folded into the convolutions before them, channels-last
checks, and a glibc allocator setting that keeps freed activation memory for reuse.

Used by `TinySaverForImageClassification.optimize_for_inference`. Copied next to saved cascades as remote code:
imports only torch and the standard library.
"""

from __future__ import annotations

import ctypes
import platform

import torch
from torch import nn


class BatchNormFoldedConv2d(nn.Conv2d):
    """A `Conv2d` with the `BatchNorm2d` that follows it folded in, for inference.

    Its own parameters, and so its state-dict keys, stay as they were; in eval mode it convolves with a folded weight
    and bias (non-persistent buffers). These are recomputed when the convolution's weight has moved (`.to()`) or
    when any of the tensors they come from has been modified in place since (`load_state_dict`, training steps,
    batch-norm statistics updates); edits through `.data` bypass that tracking, so call
    `optimize_for_inference()` again after those. In training mode it is a plain `Conv2d` and the batch norm runs
    again.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(input)
        state = self.__dict__
        if (
            self._parameters["weight"].data_ptr() != state["folded_weight_pointer"]
            or [tensor._version for tensor in state["folded_sources"]] != state["folded_versions"]
        ):
            self.refold()
        return self._conv_forward(input, self._buffers["folded_weight"], self._buffers["folded_bias"])

    @torch.no_grad()
    def refold(self) -> None:
        """Recomputes the folded weight and bias from the convolution's and the batch norm's current tensors."""
        batch_norm = self.__dict__["folded_batch_norm"]
        weight = self.weight.double()
        scale = torch.rsqrt(batch_norm.running_var.double() + batch_norm.eps)
        if batch_norm.weight is not None:
            scale = scale * batch_norm.weight.double()
        bias = self.bias.double() if self.bias is not None else torch.zeros_like(scale)
        bias = (bias - batch_norm.running_mean.double()) * scale
        if batch_norm.bias is not None:
            bias = bias + batch_norm.bias.double()
        memory_format = torch.channels_last if is_channels_last(self.weight) else torch.contiguous_format
        folded_weight = (weight * scale.view(-1, 1, 1, 1)).to(self.weight.dtype)
        self.register_buffer("folded_weight", folded_weight.contiguous(memory_format=memory_format), persistent=False)
        self.register_buffer("folded_bias", bias.to(self.weight.dtype), persistent=False)
        sources = (self.weight, self.bias, batch_norm.weight, batch_norm.bias)
        sources += (batch_norm.running_mean, batch_norm.running_var)
        sources = tuple(tensor for tensor in sources if tensor is not None)
        self.__dict__["folded_sources"] = sources
        self.__dict__["folded_versions"] = [tensor._version for tensor in sources]
        self.__dict__["folded_weight_pointer"] = self.weight.data_ptr()


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A `BatchNorm2d` folded into the convolution before it: the identity in eval mode, itself in training mode."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) if self.training else input


def folded_batch_norm_class(batch_norm: nn.Module) -> type[nn.Module] | None:
    """The class a foldable batch norm becomes, or None when its forward does more than we can account for."""
    if type(batch_norm) is nn.BatchNorm2d:
        return FoldedBatchNorm2d
    if type(batch_norm).__name__ == "BatchNormAct2d" and type(batch_norm).__module__.startswith("timm."):
        # timm's fused norm + activation: keep the dropout and activation that follow the normalisation.
        if type(batch_norm) not in FOLDED_TIMM_BATCH_NORM_ACT:
            FOLDED_TIMM_BATCH_NORM_ACT[type(batch_norm)] = make_folded_batch_norm_act(type(batch_norm))
        return FOLDED_TIMM_BATCH_NORM_ACT[type(batch_norm)]
    return None


def make_folded_batch_norm_act(batch_norm_act: type[nn.Module]) -> type[nn.Module]:
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return batch_norm_act.forward(self, input) if self.training else self.act(self.drop(input))

    return type(f"Folded{batch_norm_act.__name__}", (batch_norm_act,), {"forward": forward})


FOLDED_TIMM_BATCH_NORM_ACT: dict[type, type] = {}


def is_channels_last(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


@torch.no_grad()
def fold_batch_norms(model: nn.Module, example_input: torch.Tensor) -> int:
    """Folds every eval-mode batch norm that directly normalises a convolution's output into that convolution.

    Which batch norm follows which convolution is found by running `example_input` through the model with hooks: a
    pair qualifies when the batch norm's input is the very tensor the convolution returned, each ran once, and the
    batch norm uses running statistics. Afterwards the model's logits on `example_input` are compared with the
    original ones, and the folding is undone if they differ by more than float rounding (a convolution output also
    used elsewhere, say).

    Args:
        model: An image classifier in eval mode, called as `model(pixel_values=...)`.
        example_input: A small batch of the model's input shape.

    Returns:
        The number of batch norms folded.
    """
    conv_outputs, calls, pairs = {}, {}, []

    def record_conv(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        conv_outputs[id(output)] = (output, module)

    def record_batch_norm(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        produced = conv_outputs.get(id(args[0]))
        if produced is not None and produced[0] is args[0]:
            pairs.append((produced[1], module))

    handles = []
    for module in model.modules():
        if type(module) is nn.Conv2d:
            handles.append(module.register_forward_hook(record_conv))
        elif folded_batch_norm_class(module) is not None and module.running_var is not None:
            handles.append(module.register_forward_hook(record_batch_norm))
    try:
        expected = model(pixel_values=example_input).logits
    finally:
        for handle in handles:
            handle.remove()
    pairs = [(conv, norm) for conv, norm in pairs if calls[conv] == 1 and calls[norm] == 1]
    if not pairs:
        return 0
    originals = [(conv, type(conv), norm, type(norm)) for conv, norm in pairs]
    for conv, norm in pairs:
        conv.__class__ = BatchNormFoldedConv2d
        conv.__dict__["folded_batch_norm"] = norm
        conv.refold()
        norm.__class__ = folded_batch_norm_class(norm)
    actual = model(pixel_values=example_input).logits
    tolerance = 1e-3 * max(1.0, float(expected.abs().max()))
    if not torch.allclose(actual, expected, rtol=0, atol=tolerance):
        for conv, conv_class, norm, norm_class in originals:
            conv.__class__, norm.__class__ = conv_class, norm_class
            del conv.folded_weight, conv.folded_bias
            for key in ("folded_batch_norm", "folded_sources", "folded_versions", "folded_weight_pointer"):
                del conv.__dict__[key]
        return 0
    return len(pairs)


# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# The largest mmap threshold glibc accepts on 64-bit systems (half its 64 MiB heap size).
GLIBC_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024


def retain_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of returning it to the system.

    By default glibc returns freed memory at the top of its heap once more than twice the largest recent allocation
    is free, and serves large blocks with fresh `mmap`s. PyTorch's CPU activations are such blocks, freed at the end
    of every forward pass, so each pass page-faults its working set in again: about 70,000 (batch 16) to 270,000
    (batch 64) page faults per thousand CIFAR images here, a third to a half of the CIFAR ResNets' run time. With
    allocations up to 32 MiB served from the heap and up to `trim_threshold` bytes of free heap kept, later passes
    reuse the same pages. The process keeps its peak memory instead of shrinking back; setting
    `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` in the environment, or running under jemalloc or tcmalloc,
    has the same effect.

    Process-wide and lasting; a no-op (returning `False`) where the C library is not glibc.

    Args:
        trim_threshold: Bytes of free memory at the top of the heap that glibc may keep.

    Returns:
        Whether glibc accepted the settings.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_threshold_set = libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MAX_MMAP_THRESHOLD)
    trim_threshold_set = libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold))
    return bool(mmap_threshold_set and trim_threshold_set)


__all__ = [
    "BatchNormFoldedConv2d",
    "FoldedBatchNorm2d",
    "fold_batch_norms",
    "folded_batch_norm_class",
    "is_channels_last",
    "make_folded_batch_norm_act",
    "retain_freed_memory",
]
