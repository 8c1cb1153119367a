"""CIFAR ResNet (He et al. 2016, sec. 4.2) as a transformers model, matching the widely used pretrained weights
(stem `conv1`/`bn1`, stages `layer1..layer3` of BasicBlocks, option-A shortcuts, head `linear`).

Copied next to saved models as remote code: imports only torch, transformers and flat siblings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from .configuration_cifar_resnet import CifarResNetConfig


class CifarBasicBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus a parameter-free shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = stride != 1 or in_planes != planes
        self.pad = (planes - in_planes) // 2 if self.downsample else 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # In place where autograd allows it (as torchvision's ResNets do): one activation less to allocate per op.
        out = F.relu_(self.bn1(self.conv1(hidden_states)))
        out = self.bn2(self.conv2(out))
        shortcut = hidden_states
        if self.downsample:
            # Option A: subsample spatially and zero-pad the new channels on both sides.
            shortcut = F.pad(hidden_states[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu_(out.add_(shortcut))


class CifarResNetPreTrainedModel(PreTrainedModel):
    config_class = CifarResNetConfig
    config: CifarResNetConfig
    base_model_prefix = "resnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            if module.running_mean is not None:
                nn.init.zeros_(module.running_mean)
                nn.init.ones_(module.running_var)
                module.num_batches_tracked.zero_()


class CifarResNetForImageClassification(CifarResNetPreTrainedModel):
    r"""
    CIFAR ResNet classifier. The parameter names match the public pretrained CIFAR-10 checkpoints (without their
    `module.` prefix), so their state dicts load as they are.

    Example:

    ```python
    >>> import torch
    >>> from hf_tinysaver import CifarResNetConfig, CifarResNetForImageClassification

    >>> model = CifarResNetForImageClassification(CifarResNetConfig(depth=20)).eval()
    >>> model(torch.randn(2, 3, 32, 32)).logits.shape
    torch.Size([2, 10])
    ```
    """

    def __init__(self, config: CifarResNetConfig):
        super().__init__(config)
        widths = config.widths
        self.conv1 = nn.Conv2d(config.num_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for stage_index, planes in enumerate(widths):
            blocks = []
            for block_index in range(config.blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(CifarBasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[-1], config.num_labels)
        self.post_init()

    @property
    def stages(self) -> list[nn.Module]:
        """The three residual stages, in order (used to tap intermediate features)."""
        return [self.layer1, self.layer2, self.layer3]

    def forward_stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.relu_(self.bn1(self.conv1(pixel_values)))

    def forward_head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states.mean(dim=(2, 3)))

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        hidden_states = self.forward_stem(pixel_values)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for stage in self.stages:
            hidden_states = stage(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        logits = self.forward_head(hidden_states)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels)
        if not return_dict:
            output = (logits, all_hidden_states) if output_hidden_states else (logits,)
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=all_hidden_states)


__all__ = ["CifarResNetForImageClassification", "CifarResNetPreTrainedModel", "CifarBasicBlock"]
