"""Configuration of the CIFAR ResNet family (He et al. 2016, sec. 4.2): ResNet-20/32/44/56/110 for 32x32 images.

Copied next to saved models as remote code: imports only transformers.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class CifarResNetConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CifarResNetForImageClassification`]: a 3x3 stem of `widths[0]` channels, three stages of
    `blocks_per_stage` basic blocks (the first block of stages 2 and 3 halves the resolution), parameter-free
    "option A" shortcuts, global average pooling and a linear classifier.

    Args:
        depth (`int`, *optional*, defaults to 20):
            Network depth; must be `6 * n + 2` (20, 32, 44, 56, 110), giving `n` blocks per stage.
        widths (`list[int]`, *optional*, defaults to `[16, 32, 64]`):
            Channels of the three stages.
        num_channels (`int`, *optional*, defaults to 3):
            Input channels.
        image_size (`int`, *optional*, defaults to 32):
            Input height and width.

    Example:

    ```python
    >>> from hf_tinysaver import CifarResNetConfig

    >>> CifarResNetConfig(depth=56).blocks_per_stage
    9
    ```
    """

    model_type = "cifar_resnet"

    def __init__(
        self,
        depth: int = 20,
        widths: list[int] | None = None,
        num_channels: int = 3,
        image_size: int = 32,
        **kwargs,
    ):
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6 * n + 2 (20, 32, 44, 56, 110), got {depth}.")
        self.depth = depth
        self.widths = list(widths) if widths is not None else [16, 32, 64]
        if len(self.widths) != 3:
            raise ValueError(f"widths must list the channels of 3 stages, got {self.widths}.")
        self.num_channels = num_channels
        self.image_size = image_size
        if "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["id2label"] = dict(enumerate(CIFAR10_LABELS))
        super().__init__(**kwargs)

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6


__all__ = ["CifarResNetConfig", "CIFAR10_LABELS"]
