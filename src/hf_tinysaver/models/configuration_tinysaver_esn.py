"""Configuration of a TinySaver cascade with an Exit Sequence Network (ESN): light exits along the frozen base.

This file is copied next to saved models as remote code: it imports only transformers and flat siblings.
"""

from __future__ import annotations

from typing import Any

from .configuration_tinysaver import TinySaverConfig, validate_threshold

# Keys written by this config on top of TinySaverConfig's; always serialised in full.
_ESN_KEYS = (
    "esn_width",
    "esn_layers",
    "esn_num_heads",
    "esn_mlp_ratio",
    "exit_stages",
    "exit_thresholds",
    "saver_feature_dim",
    "stage_feature_dims",
    "exit_macs",
)


class TinySaverESNConfig(TinySaverConfig):
    r"""
    Configuration of a [`TinySaverESNForImageClassification`]: a TinySaver cascade (frozen saver and base) plus a
    small trainable Exit Sequence Network that adds exits after some of the base's stages (the ESN of TinySaver,
    Wang et al., arXiv 2403.17726).

    The answer points, in order, are: exit 0, the saver itself (threshold `threshold`); exits `1..P`, one after each
    base stage named in `exit_stages` (thresholds `exit_thresholds`); and finally the base's own classifier, which
    answers every image that did not exit before.

    Args:
        esn_width (`int`, *optional*, defaults to 128):
            Width `d` of the ESN tokens.
        esn_layers (`int`, *optional*, defaults to 1):
            Number `L` of causal transformer blocks over the tokens (0 gives one independent head per exit). The last
            block has attention but no feed-forward.
        esn_num_heads (`int`, *optional*, defaults to 4):
            Attention heads per block; must divide `esn_width`.
        esn_mlp_ratio (`float`, *optional*, defaults to 4.0):
            Hidden width of the blocks' feed-forward, as a multiple of `esn_width`.
        exit_stages (`list[str]`, *optional*):
            Module paths, inside the base model, of the stages after which an exit sits (e.g. `["layer1", "layer2"]`
            for a CIFAR ResNet). The base's last stage cannot carry an exit: its classifier answers there.
        exit_thresholds (`list[float]`, *optional*):
            One threshold per ESN exit; an image exits at exit `p` when that exit's confidence is strictly greater
            than `exit_thresholds[p - 1]`. Defaults to 1.0 each (no ESN exit is taken until calibrated).
        saver_feature_dim (`int`, *optional*):
            Width of the saver's pre-logits feature (token 0).
        stage_feature_dims (`list[int]`, *optional*):
            Channels of each tapped stage's output.
        exit_macs (`list[int]`, *optional*):
            Cumulative multiply-accumulates per image of each answer point: the saver, each ESN exit (saver + base up
            to that stage + the ESN work done so far) and the final base answer. Divide by `base_macs` for the
            relative cost of an image that leaves there.
        kwargs:
            Every [`TinySaverConfig`] argument (`saver_config`, `base_config`, `threshold`, `confidence`, ...).

    Example:

    ```python
    >>> from hf_tinysaver import CifarResNetConfig, TinySaverESNConfig

    >>> config = TinySaverESNConfig(
    ...     saver_config=CifarResNetConfig(depth=20),
    ...     base_config=CifarResNetConfig(depth=56),
    ...     esn_width=32,
    ...     esn_layers=1,
    ...     exit_stages=["layer1", "layer2"],
    ... )
    >>> config.num_exits, config.exit_thresholds
    (2, [1.0, 1.0])
    ```
    """

    model_type = "tinysaver_esn"

    def __init__(
        self,
        esn_width: int = 128,
        esn_layers: int = 1,
        esn_num_heads: int = 4,
        esn_mlp_ratio: float = 4.0,
        exit_stages: list[str] | None = None,
        exit_thresholds: list[float] | None = None,
        saver_feature_dim: int | None = None,
        stage_feature_dims: list[int] | None = None,
        exit_macs: list[int] | None = None,
        **kwargs,
    ):
        if esn_width < 1:
            raise ValueError(f"esn_width must be a positive integer, got {esn_width}.")
        if esn_layers < 0:
            raise ValueError(f"esn_layers must be 0 or more, got {esn_layers}.")
        if esn_layers > 0 and (esn_num_heads < 1 or esn_width % esn_num_heads != 0):
            raise ValueError(
                f"esn_num_heads ({esn_num_heads}) must divide esn_width ({esn_width}); e.g. use esn_num_heads=4 "
                "with a width that is a multiple of 4."
            )
        exit_stages = list(exit_stages) if exit_stages is not None else []
        if exit_thresholds is None:
            exit_thresholds = [1.0] * len(exit_stages)
        exit_thresholds = validate_exit_thresholds(exit_thresholds)
        if len(exit_thresholds) != len(exit_stages):
            raise ValueError(
                f"Got {len(exit_thresholds)} exit_thresholds for {len(exit_stages)} exit_stages; give one threshold "
                "per ESN exit (the saver's threshold is `threshold`)."
            )
        if stage_feature_dims is not None and len(stage_feature_dims) != len(exit_stages):
            raise ValueError(
                f"stage_feature_dims has {len(stage_feature_dims)} entries for {len(exit_stages)} exit_stages."
            )
        if exit_macs is not None and len(exit_macs) != len(exit_stages) + 2:
            raise ValueError(
                f"exit_macs needs {len(exit_stages) + 2} entries (saver, each ESN exit, final base answer), got "
                f"{len(exit_macs)}."
            )

        self.esn_width = int(esn_width)
        self.esn_layers = int(esn_layers)
        self.esn_num_heads = int(esn_num_heads)
        self.esn_mlp_ratio = float(esn_mlp_ratio)
        self.exit_stages = exit_stages
        self.exit_thresholds = exit_thresholds
        self.saver_feature_dim = int(saver_feature_dim) if saver_feature_dim is not None else None
        self.stage_feature_dims = [int(v) for v in stage_feature_dims] if stage_feature_dims is not None else None
        self.exit_macs = [int(v) for v in exit_macs] if exit_macs is not None else None
        super().__init__(**kwargs)

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "exit_thresholds":
            value = validate_exit_thresholds(value)
        super().__setattr__(key, value)

    @property
    def num_exits(self) -> int:
        """Number `P` of ESN exits (the saver and the base's final answer are not counted)."""
        return len(self.exit_stages)

    @property
    def relative_exit_macs(self) -> list[float] | None:
        """`exit_macs` divided by `base_macs`: the relative cost of an image leaving at each answer point."""
        if not self.exit_macs or not self.base_macs:
            return None
        return [macs / self.base_macs for macs in self.exit_macs]

    def to_diff_dict(self) -> dict[str, Any]:
        # The ESN's shape and thresholds are always written, so a saved model reloads on its own.
        output = super().to_diff_dict()
        full = self.to_dict()
        for key in _ESN_KEYS:
            output[key] = full[key]
        return output


def validate_exit_thresholds(exit_thresholds: Any) -> list[float]:
    """Returns the ESN's per-exit thresholds as a list of floats, each checked by [`validate_threshold`].

    Args:
        exit_thresholds: One threshold per ESN exit.

    Returns:
        A new list of floats.
    """
    if isinstance(exit_thresholds, (str, bytes)) or not hasattr(exit_thresholds, "__iter__"):
        raise ValueError(f"exit_thresholds must be a list of numbers, one per ESN exit, got {exit_thresholds!r}.")
    return [validate_threshold(value, f"exit_thresholds[{index}]") for index, value in enumerate(exit_thresholds)]


__all__ = ["TinySaverESNConfig", "validate_exit_thresholds"]
