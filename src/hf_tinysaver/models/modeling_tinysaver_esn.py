"""TinySaver with an Exit Sequence Network (ESN): light exits along the frozen base that reuse the saver's answer.

The ESN is the multi-exit extension of TinySaver (Wang et al., arXiv 2403.17726). The frozen saver answers the images
it is confident about, as in the plain cascade. For the others the base runs stage by stage; after each tapped stage
the ESN turns the stage's pooled feature into one token, reads the tokens so far with causal attention (token 0 is
the saver's pre-logits feature) and adds a small correction to the saver's logits. An image leaves at the first exit
whose confidence passes its threshold, so later base stages are never computed for it. Images that pass no exit get
the base's own answer, as in the paper.

Copied next to saved models as remote code: imports only torch, transformers, timm and flat siblings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .confidence import compute_confidence, first_exit
from .configuration_tinysaver import validate_threshold
from .configuration_tinysaver_esn import TinySaverESNConfig, validate_exit_thresholds
from .mac_counting import count_macs_of
from .modeling_tinysaver import (
    TinySaverForImageClassification,
    TinySaverImageClassifierOutput,
    find_macs,
    placement,
    stream_batch_inputs,
)
from .staged_base import (
    SUPPORTED_BASES,
    StagedClassifier,
    check_staged_forward,
    classifier_module,
    exit_stage_positions,
    pool_feature,
    probe_input,
    run_with_pre_logits,
    staged_classifier,
)


@dataclass
class TinySaverESNImageClassifierOutput(TinySaverImageClassifierOutput):
    """
    Output of [`TinySaverESNForImageClassification`]: the fields of [`TinySaverImageClassifierOutput`], in the same
    order, then the ESN's own.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is provided):
            The ESN training objective: cross-entropy summed over the ESN exits, each image weighted by
            `2 * (1 - saver max probability)`.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            The answer of the point where each image left: the saver's logits, an ESN exit's logits or the base's.
        exited (`torch.BoolTensor` of shape `(batch_size,)`):
            Whether each image was answered by the saver and never reached the base (`exit_index == 0`).
        saver_confidence (`torch.DoubleTensor` of shape `(batch_size,)`):
            The saver's confidence on each image.
        saver_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            The saver's logits on every image, in the base's label space.
        exit_index (`torch.LongTensor` of shape `(batch_size,)`):
            Where each image left: 0 = the saver, `p` in `1..P` = ESN exit `p`, `P + 1` = the base's classifier.
        exit_logits (`torch.FloatTensor` of shape `(batch_size, P, num_labels)`, *optional*):
            Every ESN exit's logits on every image; returned with `output_all_exits=True` (or `labels`), which runs
            the whole base on every image.
        base_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
            The base's logits on every image; returned with `exit_logits`.
    """

    exit_index: torch.LongTensor | None = None
    exit_logits: torch.FloatTensor | None = None
    base_logits: torch.FloatTensor | None = None


class ExitSequenceAttention(nn.Module):
    """Multi-head self-attention where token `p` attends to tokens `0..p` only."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch_size, num_tokens, width = tokens.shape
        query, key, value = (
            self.qkv(tokens).view(batch_size, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )
        # Explicit matmuls rather than fused SDPA: the sequences are a few tokens long, masked weights are exactly
        # zero (a later token cannot change an earlier exit by even one bit), and MAC counters see every product.
        scores = (query @ key.transpose(-2, -1)) * self.head_dim**-0.5
        future = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=tokens.device).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        mixed = (weights @ value).transpose(1, 2).reshape(batch_size, num_tokens, width)
        return self.proj(mixed)


class ExitSequenceBlock(nn.Module):
    """Pre-norm transformer block with causal attention; the ESN's last block has no feed-forward."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, with_feed_forward: bool):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = ExitSequenceAttention(width, num_heads)
        if with_feed_forward:
            hidden = max(1, round(width * mlp_ratio))
            self.feed_forward_norm = nn.LayerNorm(width)
            self.feed_forward = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        else:
            self.feed_forward_norm = None
            self.feed_forward = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attention(self.attention_norm(tokens))
        if self.feed_forward is not None:
            tokens = tokens + self.feed_forward(self.feed_forward_norm(tokens))
        return tokens


class ExitSequenceNetwork(nn.Module):
    r"""
    The trainable part: one token per feature (global average pool -> LayerNorm -> Linear to `width` -> ReLU; token 0
    from the saver's pre-logits feature, token `p` from tapped base stage `p`), `num_layers` causal transformer blocks
    without positional embedding, and one bias-free linear head per ESN exit whose output is added to the saver's
    logits.

    Args:
        feature_dims (`list[int]`): Widths of the saver's feature and of each tapped stage's pooled output.
        num_labels (`int`): Number of classes.
        width (`int`): Token width `d`.
        num_layers (`int`): Number `L` of causal blocks (0 allowed).
        num_heads (`int`): Attention heads per block.
        mlp_ratio (`float`): Feed-forward width as a multiple of `width`.
    """

    def __init__(
        self, feature_dims: list[int], num_labels: int, width: int, num_layers: int, num_heads: int, mlp_ratio: float
    ):
        super().__init__()
        self.token_embeddings = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.ReLU()) for dim in feature_dims
        )
        self.blocks = nn.ModuleList(
            ExitSequenceBlock(width, num_heads, mlp_ratio, with_feed_forward=index < num_layers - 1)
            for index in range(num_layers)
        )
        self.exit_heads = nn.ModuleList(nn.Linear(width, num_labels, bias=False) for _ in feature_dims[1:])
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Zero heads: before training every exit answers exactly what the saver answers.
        for head in self.exit_heads:
            nn.init.zeros_(head.weight)

    @property
    def num_exits(self) -> int:
        return len(self.exit_heads)

    def embed(self, index: int, feature: torch.Tensor) -> torch.Tensor:
        """Token `index` (0 = saver) from its pooled feature: `(batch, dim)` -> `(batch, width)`."""
        return self.token_embeddings[index](feature)

    def contextualize(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return tokens

    def forward(self, features: list[torch.Tensor], saver_logits: torch.Tensor) -> torch.Tensor:
        """Logits of every exit the given features reach, in one pass over the whole token sequence.

        Args:
            features: The saver's pooled feature, then the pooled outputs of tapped stages `1..T-1`.
            saver_logits: `(batch, num_labels)` logits of the saver, in the base's label space.

        Returns:
            `(batch, T - 1, num_labels)`: the logits of exits `1..T-1`.
        """
        tokens = torch.stack([self.embed(index, feature) for index, feature in enumerate(features)], dim=1)
        hidden = self.contextualize(tokens)
        corrections = torch.stack([self.exit_heads[p - 1](hidden[:, p]) for p in range(1, len(features))], dim=1)
        return corrections + saver_logits.unsqueeze(1)

    def exit_logits(self, tokens: torch.Tensor, saver_logits: torch.Tensor) -> torch.Tensor:
        """Logits of exit `p` from the embedded tokens `0..p` only (the inference path, stage by stage).

        Args:
            tokens: `(batch, p + 1, width)` tokens from [`~ExitSequenceNetwork.embed`].
            saver_logits: `(batch, num_labels)` logits of the saver, in the base's label space.

        Returns:
            `(batch, num_labels)`: the logits of exit `p`.
        """
        exit_number = tokens.shape[1] - 1
        if not 1 <= exit_number <= self.num_exits:
            raise ValueError(f"Expected 2 to {self.num_exits + 1} tokens, got {tokens.shape[1]}.")
        hidden = self.contextualize(tokens)
        return self.exit_heads[exit_number - 1](hidden[:, -1]) + saver_logits


def esn_loss(exit_logits: torch.Tensor, labels: torch.Tensor, saver_logits: torch.Tensor) -> torch.Tensor:
    """The ESN training objective: cross-entropy summed over exits, each image weighted by `2 * (1 - saver max prob)`.

    Images the saver is sure of (which rarely reach an exit) weigh little; those it doubts weigh up to 2.

    Args:
        exit_logits: `(batch, P, num_labels)` logits of the ESN exits.
        labels: `(batch,)` class indices.
        saver_logits: `(batch, num_labels)` logits of the saver (the weights carry no gradient).

    Returns:
        The scalar loss, averaged over the batch.
    """
    num_exits = exit_logits.shape[1]
    weights = 2.0 * (1.0 - torch.softmax(saver_logits.detach().float(), dim=-1).amax(dim=-1))
    per_exit = nn.functional.cross_entropy(
        exit_logits.float().flatten(0, 1), labels.repeat_interleave(num_exits), reduction="none"
    ).view(-1, num_exits)
    return (weights * per_exit.sum(dim=1)).mean()


class TinySaverESNForImageClassification(TinySaverForImageClassification):
    r"""
    A TinySaver cascade with an Exit Sequence Network. The frozen saver runs on every image and answers those on which
    its confidence is greater than `threshold` (exit 0). The other images, gathered into one smaller batch, run
    through the frozen base stage by stage; after each stage in `exit_stages` the ESN exit there gives logits (its
    correction plus the saver's logits) and the images whose confidence passes that exit's threshold leave, so the
    batch shrinks stage by stage and later stages never run for them. The base's own classifier answers the rest.

    Only the ESN (`model.esn`) is trainable; the saver and the base stay frozen and in eval mode even under
    `model.train()`.

    Args:
        config ([`TinySaverESNConfig`]):
            The cascade's config, with the ESN's shape, exit stages and thresholds.
        saver (`PreTrainedModel`, *optional*):
            An already built saver to use instead of building one from `config.saver_config`.
        base (`PreTrainedModel`, *optional*):
            An already built base to use instead of building one from `config.base_config`.

    Example:

    ```python
    >>> import torch
    >>> from hf_tinysaver import CifarResNetConfig, CifarResNetForImageClassification, TinySaverESNForImageClassification

    >>> saver = CifarResNetForImageClassification(CifarResNetConfig(depth=20)).eval()
    >>> base = CifarResNetForImageClassification(CifarResNetConfig(depth=32)).eval()
    >>> spec = {"input_size": [3, 32, 32], "resize": "fixed"}
    >>> model = TinySaverESNForImageClassification.from_saver_and_base(
    ...     saver, base, esn_width=32, esn_layers=1, threshold=0.9, exit_thresholds=[0.8, 0.7],
    ...     saver_preprocessing=spec, base_preprocessing=spec,
    ... )
    >>> model.config.exit_stages
    ['layer1', 'layer2']
    >>> outputs = model(pixel_values=torch.randn(4, 3, 32, 32))
    >>> outputs.logits.shape, outputs.exit_index.shape
    (torch.Size([4, 10]), torch.Size([4]))
    ```
    """

    config_class = TinySaverESNConfig
    config: TinySaverESNConfig

    def __init__(
        self, config: TinySaverESNConfig, saver: PreTrainedModel | None = None, base: PreTrainedModel | None = None
    ):
        super().__init__(config, saver=saver, base=base)
        if config.saver_feature_dim is None or config.stage_feature_dims is None:
            raise ValueError(
                "This TinySaverESNConfig lacks the feature widths of the saver and the tapped stages; build the model "
                "with `TinySaverESNForImageClassification.from_saver_and_base(saver, base, ...)`."
            )
        if config.label_mapping is not None and sorted(config.label_mapping) != list(range(config.num_labels)):
            raise ValueError(
                "ESN exits add the saver's logits, so the saver must predict every class of the base; a label_mapping "
                "may reorder the saver's classes but not leave base classes out."
            )
        self._staged_base = staged_classifier(self.base)
        self._exit_positions = exit_stage_positions(self._staged_base, config.exit_stages)
        self.esn = ExitSequenceNetwork(
            feature_dims=[config.saver_feature_dim, *config.stage_feature_dims],
            num_labels=config.num_labels,
            width=config.esn_width,
            num_layers=config.esn_layers,
            num_heads=config.esn_num_heads,
            mlp_ratio=config.esn_mlp_ratio,
        )
        # The parent's post_init ran before the ESN existed; run it again so it covers the whole model.
        self.post_init()
        self.train(self.training)

    def train(self, mode: bool = True) -> TinySaverESNForImageClassification:
        """Sets the ESN's training mode; the saver and base stay frozen and in eval mode (BatchNorm untouched)."""
        super().train(mode)
        # Also re-freezes after `from_pretrained`, whose weight loading hands back parameters that require grad.
        self.saver.eval().requires_grad_(False)
        self.base.eval().requires_grad_(False)
        return self

    @property
    def staged_base(self) -> StagedClassifier:
        """The base cut into stem, stages and head."""
        return self._staged_base

    @classmethod
    def from_saver_and_base(
        cls,
        saver: PreTrainedModel | str | os.PathLike,
        base: PreTrainedModel | str | os.PathLike,
        esn_width: int = 128,
        esn_layers: int = 1,
        esn_num_heads: int = 4,
        esn_mlp_ratio: float = 4.0,
        exit_stages: list[str] | None = None,
        exit_thresholds: list[float] | None = None,
        threshold: float = 1.0,
        confidence: str = "max_prob",
        temperature: float = 1.0,
        label_mapping: list[int] | None = None,
        saver_preprocessing: dict[str, Any] | None = None,
        base_preprocessing: dict[str, Any] | None = None,
        saver_macs: int | None = None,
        **config_kwargs,
    ) -> TinySaverESNForImageClassification:
        r"""
        Builds an ESN cascade from a saver and a base classifier, with a freshly initialised ESN.

        The base is checked once on a random input: its stage-by-stage forward must reproduce its own logits. The
        widths of the tapped features and the MACs of every answer point are measured and stored in the config.

        Args:
            saver (`PreTrainedModel`, `str` or `os.PathLike`):
                The tiny model (instance, local folder, Hub id or zoo name); it answers exit 0.
            base (`PreTrainedModel`, `str` or `os.PathLike`):
                The large model; one of the architectures in `SUPPORTED_BASES`.
            esn_width (`int`, *optional*, defaults to 128):
                Token width `d`.
            esn_layers (`int`, *optional*, defaults to 1):
                Causal transformer blocks `L` (0 to 3 in the paper).
            esn_num_heads (`int`, *optional*, defaults to 4):
                Attention heads per block.
            esn_mlp_ratio (`float`, *optional*, defaults to 4.0):
                Feed-forward width as a multiple of `esn_width`.
            exit_stages (`list[str]`, *optional*):
                Base stages (module paths) followed by an ESN exit; defaults to every stage but the last, whose
                output the base's classifier answers.
            exit_thresholds (`list[float]`, *optional*):
                One threshold per ESN exit; defaults to 1.0 (closed) until calibrated.
            threshold (`float`, *optional*, defaults to 1.0):
                The saver's threshold (exit 0).
            confidence (`str`, *optional*, defaults to `"max_prob"`):
                Confidence metric of every exit.
            temperature (`float`, *optional*, defaults to 1.0):
                Temperature of the saver's confidence (ESN exits use 1.0).
            label_mapping (`list[int]`, *optional*):
                Saver class `i` -> base class `label_mapping[i]`; must cover every base class.
            saver_preprocessing (`dict`, *optional*):
                The saver's preprocessing spec (found automatically where possible).
            base_preprocessing (`dict`, *optional*):
                The base's preprocessing spec.
            saver_macs (`int`, *optional*):
                The saver's MACs per image; counted when not given.
            config_kwargs:
                Further [`TinySaverESNConfig`] attributes, e.g. `calibration`.

        Returns:
            [`TinySaverESNForImageClassification`]: The model, in eval mode.
        """
        return super().from_saver_and_base(
            saver,
            base,
            threshold=threshold,
            confidence=confidence,
            temperature=temperature,
            label_mapping=label_mapping,
            saver_preprocessing=saver_preprocessing,
            base_preprocessing=base_preprocessing,
            saver_macs=saver_macs,
            esn_width=esn_width,
            esn_layers=esn_layers,
            esn_num_heads=esn_num_heads,
            esn_mlp_ratio=esn_mlp_ratio,
            exit_stages=exit_stages,
            exit_thresholds=exit_thresholds,
            **config_kwargs,
        )

    @classmethod
    def from_sub_models(
        cls,
        saver: PreTrainedModel,
        base: PreTrainedModel,
        exit_stages: list[str] | None = None,
        **config_kwargs: Any,
    ) -> TinySaverESNForImageClassification:
        r"""
        Builds the ESN cascade around two loaded classifiers (see
        [`~TinySaverESNForImageClassification.from_saver_and_base`]): checks the base stage by stage, measures the
        widths of the saver's feature and of the tapped stages, builds the cascade as the plain one does, then counts
        the MACs of every answer point.

        Args:
            saver (`PreTrainedModel`):
                The saver.
            base (`PreTrainedModel`):
                The base; one of the architectures in `SUPPORTED_BASES`.
            exit_stages (`list[str]`, *optional*):
                Base stages followed by an ESN exit; defaults to every stage but the last.
            config_kwargs:
                Further [`TinySaverESNConfig`] attributes, with `saver_preprocessing` and `base_preprocessing`.

        Returns:
            [`TinySaverESNForImageClassification`]: The model, in eval mode.
        """
        was_training = (saver.training, base.training)
        saver.eval()
        base.eval()
        try:
            staged = staged_classifier(base)
            if exit_stages is None:
                exit_stages = staged.stage_names[:-1]
            positions = exit_stage_positions(staged, exit_stages)
            saver_probe = probe_input(saver, config_kwargs["saver_preprocessing"], batch_size=2)
            base_probe = probe_input(base, config_kwargs["base_preprocessing"], batch_size=2)
            with torch.no_grad():
                _, saver_feature = run_with_pre_logits(saver, saver_probe)
                stage_outputs = check_staged_forward(staged, base_probe)
            model = super().from_sub_models(
                saver,
                base,
                exit_stages=exit_stages,
                saver_feature_dim=saver_feature.shape[-1],
                stage_feature_dims=[pool_feature(stage_outputs[p]).shape[-1] for p in positions],
                **config_kwargs,
            )
            model.count_exit_macs(saver_macs=model.config.saver_macs)
        except Exception:
            saver.train(was_training[0])
            base.train(was_training[1])
            raise
        return model.eval()

    def count_exit_macs(self, saver_macs: int | None = None) -> list[int]:
        """Counts the MACs of every answer point for one image and stores them in the config.

        Sets `config.saver_macs`, `config.base_macs` (stem + all stages + head) and `config.exit_macs`: the saver;
        then for ESN exit `p` the saver, the base up to that stage and the ESN work of exits `1..p` (embedding each
        token and running the blocks over the tokens so far, as the stage-by-stage forward does); and the final
        answer (everything).

        Args:
            saver_macs (`int`, *optional*):
                The saver's MACs if already known; otherwise as recorded in its config or counted.

        Returns:
            `config.exit_macs`.
        """
        staged = self._staged_base
        saver_probe = probe_input(self.saver, self.config.saver_preprocessing)
        base_probe = probe_input(self.base, self.config.base_preprocessing)
        if saver_macs is None:
            # As the plain cascade counts it (recorded in the config, or counted), so costs compare.
            saver_macs = find_macs(self.saver, self.config.saver_preprocessing)
        with torch.no_grad():
            hidden = staged.run_stem(base_probe)
            _, saver_feature = run_with_pre_logits(self.saver, saver_probe)
        stem_macs = count_macs_of(staged.run_stem, base_probe)
        stage_macs = []
        stage_outputs = []
        for index in range(len(staged)):
            stage_macs.append(count_macs_of(staged.run_stage, index, hidden))
            with torch.no_grad():
                hidden = staged.run_stage(index, hidden)
            stage_outputs.append(hidden)
        head_macs = count_macs_of(staged.run_head, hidden)
        base_macs = stem_macs + sum(stage_macs) + head_macs

        saver_logits = torch.zeros(1, self.config.num_labels, device=base_probe.device)
        with torch.no_grad():
            tokens = self.esn.embed(0, saver_feature)[:, None]
        esn_macs = count_macs_of(self.esn.embed, 0, saver_feature)
        exit_macs = [int(saver_macs)]
        for exit_number, position in enumerate(self._exit_positions, start=1):
            feature = pool_feature(stage_outputs[position])
            esn_macs += count_macs_of(self.esn.embed, exit_number, feature)
            with torch.no_grad():
                tokens = torch.cat([tokens, self.esn.embed(exit_number, feature)[:, None]], dim=1)
            esn_macs += count_macs_of(self.esn.exit_logits, tokens, saver_logits)
            exit_macs.append(int(saver_macs + stem_macs + sum(stage_macs[: position + 1]) + esn_macs))
        exit_macs.append(int(saver_macs + base_macs + esn_macs))
        self.config.saver_macs = int(saver_macs)
        self.config.base_macs = int(base_macs)
        self.config.exit_macs = exit_macs
        return exit_macs

    def check_placement(self) -> None:
        """Raises a `ValueError` when the saver, the base and the ESN are not in one dtype on one device.

        The ESN's exits combine the saver's and the base's features, so, unlike the plain cascade, all three parts
        must share a dtype and a device.
        """
        parts = {"saver": placement(self.saver), "base": placement(self.base), "ESN": placement(self.esn)}
        if len(set(parts.values())) > 1:
            found = ", ".join(f"{name} {dtype} on {device}" for name, (device, dtype) in parts.items())
            raise ValueError(
                f"An ESN cascade runs its saver, base and exits in one dtype on one device, but found {found}. Move "
                "the whole model at once, e.g. `model.to(torch.float32)` or `model.to('cuda')`."
            )

    def compute_exit_features(
        self, pixel_values: torch.Tensor, base_pixel_values: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Runs the frozen saver and the whole base on every image and returns what the ESN reads.

        Args:
            pixel_values: Images prepared for the saver.
            base_pixel_values: The same images prepared for the base (when its preprocessing differs).

        Returns:
            A dict with `saver_logits` (base label space), `saver_features`, `stage_features` (one pooled
            `(batch, channels)` tensor per ESN exit) and `base_logits`. Caching these once lets the ESN train
            without running the frozen models again.
        """
        self.check_placement()
        raw_saver_logits, saver_features = run_with_pre_logits(self.saver, pixel_values)
        base_inputs = base_pixel_values if base_pixel_values is not None else pixel_values
        base_logits, stage_outputs = self._staged_base.forward(base_inputs)
        return {
            "saver_logits": self.saver_logits_in_base_space(raw_saver_logits),
            "saver_features": saver_features,
            "stage_features": [pool_feature(stage_outputs[position]) for position in self._exit_positions],
            "base_logits": base_logits,
        }

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        base_pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        threshold: float | None = None,
        exit_thresholds: list[float] | None = None,
        output_all_exits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TinySaverESNImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, channels, height, width)`):
                Images prepared for the saver (`TinySaverImageProcessor` output).
            base_pixel_values (`torch.FloatTensor`, *optional*):
                The same images prepared for the base; required when the two preprocessings differ.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices; the ESN training objective is returned as `loss` (implies `output_all_exits`).
            threshold (`float`, *optional*):
                Overrides the saver's threshold (`config.threshold`) for this call.
            exit_thresholds (`list[float]`, *optional*):
                Overrides `config.exit_thresholds` for this call.
            output_all_exits (`bool`, *optional*):
                Run the whole base on every image and return every exit's logits (`exit_logits`, `base_logits`)
                besides the cascade's answer. Defaults to `True` when `labels` are given, else `False`.
            return_dict (`bool`, *optional*):
                Return a [`TinySaverESNImageClassifierOutput`] (default) or a tuple.
        """
        self.check_inputs(pixel_values, base_pixel_values)
        self.check_placement()
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        threshold = self.config.threshold if threshold is None else validate_threshold(threshold)
        # Validated here too: the config's list can be changed in place.
        exit_thresholds = validate_exit_thresholds(
            self.config.exit_thresholds if exit_thresholds is None else exit_thresholds
        )
        if len(exit_thresholds) != self.esn.num_exits:
            raise ValueError(f"Expected {self.esn.num_exits} exit_thresholds, got {len(exit_thresholds)}.")
        if output_all_exits is None:
            output_all_exits = labels is not None
        base_inputs = base_pixel_values if base_pixel_values is not None else pixel_values

        if output_all_exits:
            output = self._forward_all_exits(pixel_values, base_inputs, threshold, exit_thresholds)
            if labels is not None:
                output.loss = esn_loss(output.exit_logits, labels.to(output.exit_logits.device), output.saver_logits)
        else:
            output = self._forward_early_exit(pixel_values, base_inputs, threshold, exit_thresholds)
            if labels is not None:
                output.loss = nn.functional.cross_entropy(output.logits.float(), labels.to(output.logits.device))
        if self.__dict__.get("_decision_hooks"):
            self._call_decision_hooks(pixel_values, base_pixel_values, output)
        return output if return_dict else output.to_tuple()

    def forward_stream(
        self,
        batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
        base_batch_size: int | None = None,
        threshold: float | None = None,
        max_waiting_batches: int | None = None,
        exit_thresholds: list[float] | None = None,
    ) -> Iterator[TinySaverESNImageClassifierOutput]:
        r"""
        Classifies a stream of batches with the ESN's exits, answering each batch before reading the next.

        The plain cascade's `forward_stream` pools the images that miss the saver across batches so that its base
        runs on full batches. The ESN cannot: its base runs stage by stage with an exit after each, and which images
        go on depends on the exits before. So every batch is answered exactly as `forward` answers it (the same
        decisions, `exit_index` and logits), and the stream is a convenience for iterating over a dataset.

        Args:
            batches (`Iterable[torch.Tensor | Mapping[str, torch.Tensor]]`):
                `pixel_values` tensors, or mappings with `pixel_values` (and `base_pixel_values` when the
                preprocessings differ), e.g. [`TinySaverImageProcessor`] outputs. Other keys are ignored.
            base_batch_size (`int`, *optional*):
                Not supported (the base cannot pool images across batches here); passing it is an error.
            threshold (`float`, *optional*):
                Overrides the saver's threshold, as in `forward`.
            max_waiting_batches (`int`, *optional*):
                Accepted for compatibility with the cascade's signature: no batch ever waits, so any bound holds.
            exit_thresholds (`list[float]`, *optional*):
                Overrides `config.exit_thresholds`, as in `forward`.

        Returns:
            An iterator of [`TinySaverESNImageClassifierOutput`], one per input batch, in input order.
        """
        if base_batch_size is not None:
            raise ValueError(
                "An Exit Sequence Network cannot pool images across batches for its base: the base runs stage by "
                "stage with exits in between. Omit base_batch_size (each batch is answered as `forward` answers "
                "it), or use larger input batches."
            )
        if max_waiting_batches is not None and (isinstance(max_waiting_batches, bool) or int(max_waiting_batches) < 0):
            raise ValueError(f"max_waiting_batches must be 0 or more batches, got {max_waiting_batches!r}.")
        for batch in batches:
            pixel_values, base_pixel_values = stream_batch_inputs(batch)
            with torch.no_grad():  # not around the yield: the caller's code between items keeps its grad mode
                output = self(
                    pixel_values=pixel_values,
                    base_pixel_values=base_pixel_values,
                    threshold=threshold,
                    exit_thresholds=exit_thresholds,
                    return_dict=True,
                )
            yield output

    def _saver_confidence(self, saver_logits: torch.Tensor) -> torch.Tensor:
        # ESN label mappings are permutations, under which every confidence metric is invariant.
        return compute_confidence(saver_logits, self.config.confidence, self.config.confidence_temperature)

    def _forward_early_exit(
        self, pixel_values: torch.Tensor, base_inputs: torch.Tensor, threshold: float, exit_thresholds: list[float]
    ) -> TinySaverESNImageClassifierOutput:
        staged = self._staged_base
        raw_saver_logits, saver_features = run_with_pre_logits(self.saver, pixel_values)
        saver_logits = self.saver_logits_in_base_space(raw_saver_logits)
        saver_confidence = self._saver_confidence(saver_logits)
        batch_size = saver_logits.shape[0]
        logits = saver_logits
        exit_index = torch.zeros(batch_size, dtype=torch.long, device=saver_logits.device)
        remaining = torch.nonzero(~(saver_confidence > threshold), as_tuple=True)[0]
        if remaining.numel() > 0:
            subset = remaining.numel() < batch_size
            hidden = staged.run_stem(base_inputs.index_select(0, remaining) if subset else base_inputs)
            remaining_saver_logits = saver_logits[remaining]
            tokens = self.esn.embed(0, saver_features[remaining]).unsqueeze(1)
            next_stage = 0
            for exit_number, position in enumerate(self._exit_positions, start=1):
                while next_stage <= position:
                    hidden = staged.run_stage(next_stage, hidden)
                    next_stage += 1
                token = self.esn.embed(exit_number, pool_feature(hidden)).unsqueeze(1)
                tokens = torch.cat([tokens, token], dim=1)
                candidate = self.esn.exit_logits(tokens, remaining_saver_logits)
                leaving = compute_confidence(candidate, self.config.confidence) > exit_thresholds[exit_number - 1]
                if not bool(leaving.any()):
                    continue
                rows = remaining[leaving]
                logits = logits.index_copy(0, rows, candidate[leaving].to(logits.dtype))
                exit_index[rows] = exit_number
                staying = ~leaving
                remaining = remaining[staying]
                if remaining.numel() == 0:
                    break
                hidden, tokens, remaining_saver_logits = (
                    hidden[staying],
                    tokens[staying],
                    remaining_saver_logits[staying],
                )
            if remaining.numel() > 0:
                while next_stage < len(staged):
                    hidden = staged.run_stage(next_stage, hidden)
                    next_stage += 1
                base_logits = staged.run_head(hidden)
                logits = logits.index_copy(0, remaining, base_logits.to(logits.dtype))
                exit_index[remaining] = self.esn.num_exits + 1
        return TinySaverESNImageClassifierOutput(
            logits=logits,
            exit_index=exit_index,
            exited=exit_index == 0,
            saver_confidence=saver_confidence,
            saver_logits=saver_logits,
        )

    def _forward_all_exits(
        self, pixel_values: torch.Tensor, base_inputs: torch.Tensor, threshold: float, exit_thresholds: list[float]
    ) -> TinySaverESNImageClassifierOutput:
        features = self.compute_exit_features(pixel_values, base_inputs)
        saver_logits = features["saver_logits"]
        saver_confidence = self._saver_confidence(saver_logits)
        exit_logits = self.esn([features["saver_features"], *features["stage_features"]], saver_logits)
        confidences = [saver_confidence] + [
            compute_confidence(exit_logits[:, p].detach(), self.config.confidence) for p in range(self.esn.num_exits)
        ]
        exit_index = first_exit(torch.stack(confidences, dim=1), [threshold, *exit_thresholds])
        candidates = torch.cat([saver_logits.unsqueeze(1), exit_logits, features["base_logits"].unsqueeze(1)], dim=1)
        logits = candidates.gather(1, exit_index.view(-1, 1, 1).expand(-1, 1, candidates.shape[-1])).squeeze(1)
        return TinySaverESNImageClassifierOutput(
            logits=logits,
            exit_index=exit_index,
            exited=exit_index == 0,
            saver_confidence=saver_confidence,
            saver_logits=saver_logits,
            exit_logits=exit_logits,
            base_logits=features["base_logits"],
        )


__all__ = [
    "SUPPORTED_BASES",
    "ExitSequenceNetwork",
    "StagedClassifier",
    "TinySaverESNForImageClassification",
    "TinySaverESNImageClassifierOutput",
    "classifier_module",
    "esn_loss",
    "pool_feature",
    "run_with_pre_logits",
    "staged_classifier",
]
