"""The ESN's view of its base: a classifier cut into stem, stages and head, so that a batch can stop after any stage,
and the pooled features (the saver's pre-logits, each stage's output) that the exits read.

Copied next to saved ESN models as remote code: imports only torch, timm and the standard library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

SUPPORTED_BASES = (
    "hf_tinysaver's CIFAR ResNets (any model exposing `forward_stem`, `stages` and `forward_head`)",
    "timm ResNet, EfficientNet (incl. EfficientNet-Lite), MobileNetV3 and ConvNeXt wrapped in "
    "TimmWrapperForImageClassification",
    "transformers ResNetForImageClassification",
)


def pool_feature(hidden_states: torch.Tensor) -> torch.Tensor:
    """Global average pool of a stage output: `(B, C, H, W)` over space, `(B, N, C)` over tokens, `(B, C)` as is."""
    if hidden_states.ndim == 4:
        return hidden_states.mean(dim=(2, 3))
    if hidden_states.ndim == 3:
        return hidden_states.mean(dim=1)
    if hidden_states.ndim == 2:
        return hidden_states
    raise ValueError(f"Cannot pool a feature of shape {tuple(hidden_states.shape)} into one vector per image.")


class StagedClassifier:
    """A classifier cut into stem, stages and head, so that a batch can stop after any stage and go on later.

    A plain object, not an `nn.Module`: it resolves the model's own modules by name on every call and holds no
    parameters, so the model's state dict and device moves are unaffected.

    Args:
        model: The classifier.
        stem: `stem(model, pixel_values)` -> the input of the first stage.
        stage_names: Module paths of the stages inside `model`, in order.
        head: `head(model, hidden_states)` -> logits, from the last stage's output.
    """

    def __init__(
        self,
        model: nn.Module,
        stem: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        stage_names: list[str],
        head: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    ):
        self.model = model
        self._stem = stem
        self.stage_names = list(stage_names)
        self._head = head

    def __len__(self) -> int:
        return len(self.stage_names)

    def stage(self, index: int) -> nn.Module:
        return self.model.get_submodule(self.stage_names[index])

    def run_stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._stem(self.model, pixel_values)

    def run_stage(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.stage(index)(hidden_states)

    def run_head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._head(self.model, hidden_states)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs the whole classifier; returns the logits and every stage's output."""
        hidden_states = self.run_stem(pixel_values)
        stage_outputs = []
        for index in range(len(self)):
            hidden_states = self.run_stage(index, hidden_states)
            stage_outputs.append(hidden_states)
        return self.run_head(hidden_states), stage_outputs


def _module_path(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}.")


def _timm_input(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    # TimmWrapperForImageClassification casts its input the same way before calling the timm model.
    return pixel_values.to(model.device, model.dtype)


def _timm_staging(model: nn.Module) -> StagedClassifier | None:
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.resnet import ResNet

    timm_model = model.timm_model
    if isinstance(timm_model, ResNet):

        def stem(model, x):
            t = model.timm_model
            return t.maxpool(t.act1(t.bn1(t.conv1(_timm_input(model, x)))))

        names = [f"timm_model.layer{index}" for index in range(1, 5)]
        return StagedClassifier(model, stem, names, lambda model, h: model.timm_model.forward_head(h))
    if isinstance(timm_model, (EfficientNet, MobileNetV3)):

        def stem(model, x):
            return model.timm_model.bn1(model.timm_model.conv_stem(_timm_input(model, x)))

        if isinstance(timm_model, EfficientNet):

            def head(model, h):
                t = model.timm_model
                return t.forward_head(t.bn2(t.conv_head(h)))

        else:

            def head(model, h):
                return model.timm_model.forward_head(h)

        names = [f"timm_model.blocks.{index}" for index in range(len(timm_model.blocks))]
        return StagedClassifier(model, stem, names, head)
    if isinstance(timm_model, ConvNeXt):
        names = [f"timm_model.stages.{index}" for index in range(len(timm_model.stages))]
        return StagedClassifier(
            model,
            lambda model, x: model.timm_model.stem(_timm_input(model, x)),
            names,
            lambda model, h: model.timm_model.forward_head(model.timm_model.norm_pre(h)),
        )
    return None


def staged_classifier(model: nn.Module) -> StagedClassifier:
    """Cuts a supported base classifier into stem, stages and head.

    Args:
        model: A CIFAR ResNet of this library (or any model with `forward_stem`, `stages`, `forward_head`), a
            supported timm model wrapped in `TimmWrapperForImageClassification`, or a transformers
            `ResNetForImageClassification`.

    Returns:
        A [`StagedClassifier`] over the model.
    """
    if all(hasattr(model, name) for name in ("forward_stem", "stages", "forward_head")):
        names = [_module_path(model, stage) for stage in model.stages]
        return StagedClassifier(
            model, lambda model, x: model.forward_stem(x), names, lambda model, h: model.forward_head(h)
        )
    staged = None
    if hasattr(model, "timm_model"):
        staged = _timm_staging(model)
    elif getattr(getattr(model, "config", None), "model_type", None) == "resnet" and hasattr(model, "resnet"):
        names = [f"resnet.encoder.stages.{index}" for index in range(len(model.resnet.encoder.stages))]
        staged = StagedClassifier(
            model,
            lambda model, x: model.resnet.embedder(x),
            names,
            lambda model, h: model.classifier(model.resnet.pooler(h)),
        )
    if staged is None:
        architecture = type(getattr(model, "timm_model", model)).__name__
        raise ValueError(
            f"The ESN cannot run the base {architecture} stage by stage. Supported bases: "
            + "; ".join(SUPPORTED_BASES)
            + ". Use one of those as the base, or the plain TinySaverForImageClassification cascade."
        )
    return staged


def classifier_module(model: nn.Module) -> nn.Module:
    """The final classification layer of an image classifier; its input is the pre-logits feature."""
    if hasattr(model, "timm_model"):
        module = model.timm_model.get_classifier()
    else:
        module = next(
            (getattr(model, name) for name in ("classifier", "linear", "fc", "head") if hasattr(model, name)), None
        )
    if not isinstance(module, nn.Module) or isinstance(module, nn.Identity):
        raise ValueError(
            f"Cannot find the classification layer of {type(model).__name__} (looked for `classifier`, `linear`, "
            "`fc`, `head`); the ESN reads the saver's pre-logits feature from its input."
        )
    return module


def run_with_pre_logits(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a classifier and returns its logits and its pooled pre-logits feature (the classifier's input)."""
    captured = []

    def capture(module, args):
        captured.append(args[0])

    handle = classifier_module(model).register_forward_pre_hook(capture)
    try:
        logits = model(pixel_values=pixel_values).logits
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(
            f"The classification layer of {type(model).__name__} ran {len(captured)} times in one forward; the ESN "
            "needs a model whose classifier runs once."
        )
    return logits, pool_feature(captured[0])


def exit_stage_positions(staged: StagedClassifier, exit_stages: list[str]) -> list[int]:
    """Positions of `exit_stages` among the base's stages; they must be in order and exclude the last stage."""
    positions = []
    for name in exit_stages:
        if name not in staged.stage_names:
            raise ValueError(f"{name!r} is not a stage of the base; its stages are {staged.stage_names}.")
        positions.append(staged.stage_names.index(name))
    if positions != sorted(set(positions)):
        raise ValueError(
            f"exit_stages must be distinct and in the base's order {staged.stage_names}, got {exit_stages}."
        )
    if positions and positions[-1] == len(staged) - 1:
        raise ValueError(
            f"The last stage {staged.stage_names[-1]!r} cannot carry an ESN exit: the base's own classifier answers "
            "there. Tap earlier stages only."
        )
    return positions


def probe_input(model: nn.Module, preprocessing: dict[str, Any], batch_size: int = 1) -> torch.Tensor:
    """A seeded random batch of the model's input size, on its device and in its dtype, to trace or check it with.

    Args:
        model: The classifier (its first parameter gives the device and dtype).
        preprocessing: Its preprocessing spec; `input_size` is read.
        batch_size: Images in the batch.

    Returns:
        The `(batch_size, channels, height, width)` tensor.
    """
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(batch_size, *[int(v) for v in preprocessing["input_size"]], generator=generator)
    return probe.to(parameter.device, parameter.dtype)


def check_staged_forward(staged: StagedClassifier, probe: torch.Tensor) -> list[torch.Tensor]:
    """Checks that running the model stage by stage reproduces its own logits on `probe`.

    Args:
        staged: The model cut into stages.
        probe: An input batch, e.g. from [`probe_input`].

    Returns:
        Every stage's output on `probe`.

    Raises:
        ValueError: When the logits differ (an unsupported variant of a supported architecture).
    """
    staged_logits, stage_outputs = staged.forward(probe)
    full_logits = staged.model(pixel_values=probe).logits
    if staged_logits.shape != full_logits.shape or not torch.allclose(
        staged_logits, full_logits, atol=1e-4, rtol=1e-4
    ):
        raise ValueError(
            f"Running the base ({type(getattr(staged.model, 'timm_model', staged.model)).__name__}) stage by stage "
            "does not reproduce its own logits, so this variant of the architecture is not supported by the ESN. "
            f"Supported bases: {'; '.join(SUPPORTED_BASES)}."
        )
    return stage_outputs


__all__ = [
    "SUPPORTED_BASES",
    "StagedClassifier",
    "check_staged_forward",
    "classifier_module",
    "exit_stage_positions",
    "pool_feature",
    "probe_input",
    "run_with_pre_logits",
    "staged_classifier",
]
