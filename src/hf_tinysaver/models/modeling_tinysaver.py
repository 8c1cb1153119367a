"""TinySaver cascade model: a tiny saver classifier answers the images it is confident about, the base the rest.

Implements TinySaver (Wang et al., "Tiny Models are the Computational Saver for Large Models", arXiv 2403.17726)
as one transformers `PreTrainedModel` holding both classifiers, so a calibrated cascade saves, loads and serves like
any other image classifier.

Copied next to saved cascades as remote code: imports only torch, transformers and flat siblings.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import CONFIG_MAPPING, AutoModelForImageClassification, PreTrainedConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save, get_class_from_dynamic_module
from transformers.utils import ModelOutput

from .confidence import compute_confidence
from .configuration_tinysaver import TinySaverConfig, validate_threshold
from .image_processing_tinysaver import (
    TinySaverImageProcessor,
    normalize_preprocessing,
    preprocessing_from_image_processor,
    preprocessing_from_timm,
)
from .inference_optimization import fold_batch_norms, retain_freed_memory
from .mac_counting import count_macs

logger = logging.getLogger(__name__)


@dataclass
class TinySaverImageClassifierOutput(ModelOutput):
    """
    Output of [`TinySaverForImageClassification`].

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
            Cross-entropy of the cascade's logits.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            The saver's logits for rows that exited, the base model's logits for the others.
        exited (`torch.BoolTensor` of shape `(batch_size,)`):
            Whether each image was answered by the saver (and never reached the base).
        saver_confidence (`torch.DoubleTensor` of shape `(batch_size,)`):
            The saver's confidence on each image; an image exits when it is greater than the threshold.
        saver_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            The saver's logits on every image, in the base's label space.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    exited: torch.BoolTensor | None = None
    saver_confidence: torch.DoubleTensor | None = None
    saver_logits: torch.FloatTensor | None = None


def build_classifier(config: PreTrainedConfig) -> PreTrainedModel:
    """Builds an image classifier (random weights) from its config, for any architecture a cascade can hold.

    Architectures transformers knows (its own, or registered like hf_tinysaver's CIFAR ResNets once the library is
    imported) come from `AutoModelForImageClassification`; a sub-model whose code the cascade's folder carries comes
    from there, through the `auto_map` that `save_pretrained` wrote into its config (see [`shipped_sub_config`]).
    """
    reference = (getattr(config, "auto_map", None) or {}).get("AutoModelForImageClassification")
    if reference is not None and config.model_type not in CONFIG_MAPPING and config.name_or_path:
        model_class = get_class_from_dynamic_module(
            reference, config.name_or_path, revision=getattr(config, "_commit_hash", None)
        )
        return model_class(config)
    return AutoModelForImageClassification.from_config(config)


def shipped_code_auto_map(model: PreTrainedModel) -> dict[str, str] | None:
    """The `auto_map` of a sub-model whose classes are custom code (not transformers'), or `None`.

    Such a model (hf_tinysaver's CIFAR ResNet) must carry its `modeling_*.py` and `configuration_*.py` files into the
    cascade's folder; transformers' own architectures (TimmWrapper for timm models included) need none.
    """
    model_class, config_class = type(model), type(model.config)
    modules = [sys.modules.get(model_class.__module__), sys.modules.get(config_class.__module__)]
    if any(module is None or not getattr(module, "__file__", None) for module in modules):
        return None
    model_module, config_module = (module.__name__.rpartition(".")[2] for module in modules)
    if model_class.__module__.split(".")[0] == "transformers" or not (
        model_module.startswith("modeling_") and config_module.startswith("configuration_")
    ):
        return None
    return {
        "AutoConfig": f"{config_module}.{config_class.__name__}",
        "AutoModelForImageClassification": f"{model_module}.{model_class.__name__}",
    }


def check_label_spaces(
    saver_config: PreTrainedConfig, base_config: PreTrainedConfig, label_mapping: list[int] | None = None
) -> None:
    """Raises a `ValueError` naming the difference when the saver's labels do not match the base's.

    Args:
        saver_config: Config of the saver (its `id2label` is compared).
        base_config: Config of the base.
        label_mapping: Optional explicit mapping, saver class `i` -> base class `label_mapping[i]`.
    """
    saver_labels = {int(k): str(v) for k, v in saver_config.id2label.items()}
    base_labels = {int(k): str(v) for k, v in base_config.id2label.items()}
    if label_mapping is not None:
        if len(label_mapping) != len(saver_labels):
            raise ValueError(
                f"label_mapping has {len(label_mapping)} entries but the saver has {len(saver_labels)} labels; "
                "give one base class index per saver class."
            )
        invalid = [index for index in label_mapping if not 0 <= int(index) < len(base_labels)]
        if invalid:
            raise ValueError(f"label_mapping points outside the base's {len(base_labels)} labels: {invalid[:5]}.")
        if len(set(label_mapping)) != len(label_mapping):
            raise ValueError("label_mapping maps two saver classes to the same base class; it must be one-to-one.")
        return
    if len(saver_labels) != len(base_labels):
        raise ValueError(
            f"The saver predicts {len(saver_labels)} labels but the base predicts {len(base_labels)}. Use a saver "
            "trained on the base's label set, or pass `label_mapping` (saver class i -> base class index)."
        )
    differences = [
        (i, saver_labels[i], base_labels.get(i)) for i in sorted(saver_labels) if saver_labels[i] != base_labels.get(i)
    ]
    if differences:
        shown = ", ".join(f"{i}: saver {s!r} vs base {b!r}" for i, s, b in differences[:3])
        raise ValueError(
            f"The saver's and the base's label names differ at {len(differences)} of {len(base_labels)} indices "
            f"({shown}{', ...' if len(differences) > 3 else ''}). If only the names differ, pass "
            "`label_mapping=list(range(num_labels))`; otherwise pass the saver -> base index mapping."
        )


class TinySaverPreTrainedModel(PreTrainedModel):
    config_class = TinySaverConfig
    config: TinySaverConfig
    base_model_prefix = "tinysaver"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # Both sub-models are complete classifiers that initialise (or load) their own weights.
        pass


class TinySaverForImageClassification(TinySaverPreTrainedModel):
    r"""
    A TinySaver cascade: the saver runs on every image; images on which its confidence is greater than the threshold
    exit with the saver's prediction; the others, gathered into one smaller batch, go to the base model, whose
    prediction alone is then returned. The base never runs when every image exits.

    Args:
        config ([`TinySaverConfig`]):
            Holds both sub-model configs, the threshold and the confidence metric.
        saver (`PreTrainedModel`, *optional*):
            An already built saver to use instead of building one from `config.saver_config`.
        base (`PreTrainedModel`, *optional*):
            An already built base model to use instead of building one from `config.base_config`.

    Example:

    ```python
    >>> from PIL import Image
    >>> from transformers import TimmWrapperConfig, TimmWrapperForImageClassification
    >>> from hf_tinysaver import TinySaverForImageClassification

    >>> saver = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_efficientnet", num_labels=10))
    >>> base = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_vit", num_labels=10))
    >>> cascade = TinySaverForImageClassification.from_saver_and_base(saver, base, threshold=0.5).eval()
    >>> processor = cascade.get_image_processor()  # each sub-model gets its own preprocessing
    >>> inputs = processor(images=[Image.new("RGB", (200, 180), "teal")] * 4, return_tensors="pt")
    >>> outputs = cascade(**inputs)
    >>> outputs.logits.shape, outputs.exited.shape
    (torch.Size([4, 10]), torch.Size([4]))
    ```
    """

    # Hooks the installed library fills in (`hf_tinysaver.models`); a class loaded as remote code keeps `None`, so the
    # shipped files never reach back into hf_tinysaver and behave alike whether or not it is installed.
    hub_publisher: ClassVar[Callable[..., Any] | None] = None
    """`hub_publisher(model, repo_id, **kwargs)` replaces the plain `push_to_hub` upload when set."""
    model_resolver: ClassVar[Callable[[str], PreTrainedModel] | None] = None
    """`model_resolver(name)` loads a model by name with the installed library's rule (`hf_tinysaver.sources`: local
    folder, zoo name, Hub id); without it names go to `AutoModelForImageClassification.from_pretrained`."""

    def __init__(
        self, config: TinySaverConfig, saver: PreTrainedModel | None = None, base: PreTrainedModel | None = None
    ):
        super().__init__(config)
        if config.saver_config is None or config.base_config is None:
            raise ValueError(
                "A TinySaverConfig needs both `saver_config` and `base_config`; build cascades with "
                "`TinySaverForImageClassification.from_saver_and_base(saver, base)`."
            )
        check_label_spaces(config.saver_config, config.base_config, config.label_mapping)
        self.saver = saver if saver is not None else build_classifier(config.saver_config)
        self.base = base if base is not None else build_classifier(config.base_config)
        if config.label_mapping is not None:
            self.register_buffer(
                "label_mapping_index", torch.tensor(config.label_mapping, dtype=torch.long), persistent=False
            )
        else:
            self.label_mapping_index = None
        self.post_init()

    @classmethod
    def from_saver_and_base(
        cls,
        saver: PreTrainedModel | str | os.PathLike,
        base: PreTrainedModel | str | os.PathLike,
        threshold: float = 1.0,
        confidence: str = "max_prob",
        temperature: float = 1.0,
        label_mapping: list[int] | None = None,
        saver_preprocessing: dict[str, Any] | None = None,
        base_preprocessing: dict[str, Any] | None = None,
        saver_macs: int | None = None,
        base_macs: int | None = None,
        **config_kwargs,
    ) -> TinySaverForImageClassification:
        r"""
        Builds a cascade from a saver and a base classifier.

        Args:
            saver (`PreTrainedModel`, `str` or `os.PathLike`):
                The tiny model: an image-classification model instance, a local `save_pretrained` folder, a Hub id
                (timm ids such as `timm/mobilenetv3_small_100.lamb_in1k` load through TimmWrapper) or a name that
                [`~TinySaverForImageClassification.model_resolver`] knows (zoo names, `hf_tinysaver.zoo`, when the
                library is installed).
            base (`PreTrainedModel`, `str` or `os.PathLike`):
                The large model, in any of the same forms.
            threshold (`float`, *optional*, defaults to 1.0):
                Images whose saver confidence is greater than this exit at the saver.
            confidence (`str`, *optional*, defaults to `"max_prob"`):
                `"max_prob"`, `"margin"` or `"entropy"`.
            temperature (`float`, *optional*, defaults to 1.0):
                Temperature applied to the saver's logits before the confidence is computed.
            label_mapping (`list[int]`, *optional*):
                Saver class `i` -> base class `label_mapping[i]`, for savers with another label order or subset.
            saver_preprocessing (`dict`, *optional*):
                The saver's preprocessing spec. Found automatically for timm models, zoo models and folders or Hub
                ids with an image processor; required for bare transformers model instances.
            base_preprocessing (`dict`, *optional*):
                The same for the base.
            saver_macs (`int`, *optional*):
                The saver's MACs per image; counted when not given and not recorded in its config.
            base_macs (`int`, *optional*):
                The base's MACs per image; likewise.
            config_kwargs:
                Further [`TinySaverConfig`] attributes, e.g. `calibration`.

        Returns:
            [`TinySaverForImageClassification`]: The cascade, in eval mode when both sub-models were.
        """
        saver_model, base_model, saver_preprocessing, base_preprocessing = load_sub_models(
            saver, base, saver_preprocessing, base_preprocessing, resolver=cls.model_resolver
        )
        return cls.from_sub_models(
            saver_model,
            base_model,
            threshold=threshold,
            confidence=confidence,
            confidence_temperature=temperature,
            label_mapping=label_mapping,
            saver_preprocessing=saver_preprocessing,
            base_preprocessing=base_preprocessing,
            saver_macs=saver_macs,
            base_macs=base_macs,
            **config_kwargs,
        )

    @classmethod
    def from_sub_models(
        cls, saver: PreTrainedModel, base: PreTrainedModel, **config_kwargs: Any
    ) -> TinySaverForImageClassification:
        r"""
        Builds the cascade around two loaded classifiers: what
        [`~TinySaverForImageClassification.from_saver_and_base`] does once it has loaded them and found their
        preprocessing. Subclasses extend it with what they measure on the sub-models.

        Args:
            saver (`PreTrainedModel`):
                The saver.
            base (`PreTrainedModel`):
                The base.
            config_kwargs:
                Attributes of `cls.config_class` besides the two sub-configs, with `saver_preprocessing` and
                `base_preprocessing`; `saver_macs` and `base_macs` are counted when missing or `None`.

        Returns:
            [`TinySaverForImageClassification`]: The cascade, in eval mode when both sub-models were.

        Example:

        ```python
        >>> from transformers import TimmWrapperConfig, TimmWrapperForImageClassification
        >>> from hf_tinysaver import TinySaverForImageClassification

        >>> saver = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=10))
        >>> base = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_vit", num_labels=10))
        >>> spec = {"input_size": [3, 32, 32], "resize": "fixed"}
        >>> cascade = TinySaverForImageClassification.from_sub_models(
        ...     saver, base, threshold=0.5, saver_preprocessing=spec, base_preprocessing=spec
        ... )
        >>> cascade.config.threshold, cascade.config.saver_macs > 0
        (0.5, True)
        ```
        """
        for role, model in (("saver", saver), ("base", base)):
            if config_kwargs.get(f"{role}_macs") is None:
                config_kwargs[f"{role}_macs"] = find_macs(model, config_kwargs[f"{role}_preprocessing"])
        config = cls.config_class(saver_config=saver.config, base_config=base.config, **config_kwargs)
        model = cls(config, saver=saver, base=base)
        return model.train(saver.training or base.training)

    def get_image_processor(self) -> TinySaverImageProcessor:
        """Returns the processor that prepares raw images for this cascade (each sub-model its own way)."""
        if self.config.saver_preprocessing is None:
            raise ValueError(
                "This cascade has no preprocessing recorded; rebuild it with `from_saver_and_base(..., "
                "saver_preprocessing=..., base_preprocessing=...)`."
            )
        return TinySaverImageProcessor(
            preprocessing=self.config.saver_preprocessing, base_preprocessing=self.config.base_preprocessing
        )

    def set_operating_point(
        self, relative_macs: float | None = None, exit_rate: float | None = None, threshold: float | None = None
    ) -> dict[str, Any]:
        r"""
        Moves the cascade to another certified operating point, without recalibrating.

        A cascade calibrated with a certificate (`max-drop` with `confidence_level`) keeps every threshold that passed
        in `config.calibration["certified_points"]`; all of them hold the accuracy-drop target at once, so serving
        may switch between them under load. Exactly one request:

        - `relative_macs`: the most accurate certified point that costs at most this budget (the largest relative
          MACs not above it).
        - `exit_rate`: the certified point with the smallest exit rate of at least this (rates as measured on the
          calibration set).
        - `threshold`: a certified threshold itself (within 1e-12).

        Args:
            relative_macs (`float`, *optional*): Budget in base-model equivalents per image.
            exit_rate (`float`, *optional*): Share of images that should exit at the saver.
            threshold (`float`, *optional*): One of the certified thresholds.

        Returns:
            `dict`: The certified point now in use (`threshold`, `exit_rate`, `relative_macs`, `bound`); its
            threshold is written to `config.threshold`.

        Raises:
            ValueError: When the cascade has no certified points, or none meets the request.

        Example:

        ```python
        >>> from hf_tinysaver.workflows.cascade import build_cascade, calibrate_cascade

        >>> cascade = build_cascade("cifar10-resnet20", "cifar10-resnet56")
        >>> _ = calibrate_cascade(cascade, "cifar10", "test[:50%]", max_drop=1.0, confidence_level=0.9, progress=False)
        >>> point = cascade.set_operating_point(relative_macs=0.9)
        >>> point["relative_macs"] <= 0.9 and cascade.config.threshold == point["threshold"]
        True
        ```
        """
        requests = {"relative_macs": relative_macs, "exit_rate": exit_rate, "threshold": threshold}
        given = {name: float(value) for name, value in requests.items() if value is not None}
        if len(given) != 1:
            raise ValueError(
                "Pass exactly one of relative_macs=, exit_rate= or threshold= to set_operating_point, got "
                f"{sorted(given) or 'none'}."
            )
        points = (self.config.calibration or {}).get("certified_points")
        if not points:
            raise ValueError(
                "This cascade has no certified operating points; calibrate it with a certificate (max-drop with "
                "confidence_level=..., `tinysaver calibrate --confidence-level 0.95`) first."
            )
        ((name, value),) = given.items()
        if name == "relative_macs":
            fitting = [point for point in points if point["relative_macs"] <= value + 1e-12]
            chosen = max(fitting, key=lambda point: point["relative_macs"]) if fitting else None
        elif name == "exit_rate":
            fitting = [point for point in points if point["exit_rate"] >= value - 1e-12]
            chosen = min(fitting, key=lambda point: point["exit_rate"]) if fitting else None
        else:
            fitting = [point for point in points if abs(point["threshold"] - value) <= 1e-12]
            chosen = fitting[0] if fitting else None
        if chosen is None:
            low = min(point[name] for point in points)
            high = max(point[name] for point in points)
            raise ValueError(
                f"No certified operating point meets {name}={value:g}: the certified points have {name} from "
                f"{low:.6g} to {high:.6g}. Request a value in that range, or recalibrate on more images for cheaper "
                "certified points."
            )
        self.config.threshold = float(chosen["threshold"])
        return dict(chosen)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Saves the cascade (config, both sub-models in one `model.safetensors`, remote code) and its processor.

        The remote code is the cascade's own files plus, only for sub-models that are custom code (a CIFAR ResNet),
        theirs; their configs get an `auto_map` naming those files.
        """
        shipped = []
        for sub_model, sub_config in ((self.saver, self.config.saver_config), (self.base, self.config.base_config)):
            auto_map = shipped_code_auto_map(sub_model)
            if auto_map is not None:
                sub_config.auto_map = {**(getattr(sub_config, "auto_map", None) or {}), **auto_map}
                shipped.append(sub_model)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for sub_model in shipped:
                custom_object_save(sub_model, save_directory)
            if self.config.saver_preprocessing is not None:
                self.get_image_processor().save_pretrained(save_directory)

    def push_to_hub(self, repo_id: str, **kwargs) -> Any:
        r"""
        Uploads the cascade, its processor and remote code to the Hub.

        With hf_tinysaver installed, [`~TinySaverForImageClassification.hub_publisher`] is
        `hf_tinysaver.hub.push.push_cascade`, which also generates the model card and the calibration's trade-off plot
        (see its docstring for the keyword arguments). A cascade loaded through remote code alone
        (`trust_remote_code=True`, whether or not hf_tinysaver is installed) has no publisher and falls back to
        transformers' plain `PreTrainedModel.push_to_hub`: no generated card, no plot.

        Args:
            repo_id (`str`):
                The repo to push to, `namespace/name`.
            kwargs:
                Passed on to the publisher (or to `PreTrainedModel.push_to_hub`).

        Returns:
            What the publisher returns (a `CommitInfo` for both).
        """
        publisher = type(self).hub_publisher
        if publisher is None:
            return super().push_to_hub(repo_id, **kwargs)
        return publisher(self, repo_id, **kwargs)

    def optimize_for_inference(
        self, channels_last: bool = True, fold_batch_norm: bool = True, retain_memory: bool = True
    ) -> TinySaverForImageClassification:
        """Prepares the cascade for serving: eval mode, batch norms folded into convolutions, channels-last weights,
        and an allocator that reuses freed memory.

        These are CPU serving optimisations measured in `benchmarks/throughput.py`: folding each batch norm into the
        convolution before it removes one pass over every activation, oneDNN convolutions run faster in channels-last
        layout, and keeping freed memory mapped stops glibc from handing activation memory back to the system after
        every forward pass and page-faulting it in again on the next (which made ResNet-56 1.6x and ResNet-20 1.9x
        slower at batch 64 here: the smaller the model, the larger the share). Predictions are unchanged up to float
        rounding (on CUDA with TF32 convolutions, PyTorch's default for cuDNN, that rounding is TF32's, about 1e-3
        relative, enough to flip an exit that sits right at the threshold); the parameters, and so
        `save_pretrained`, are untouched: folded weights live in non-persistent buffers that follow later weight
        changes, and `train()` brings the batch norms back.

        Args:
            channels_last (`bool`, *optional*, defaults to `True`):
                Convert convolutional sub-models' 4-D weights to `torch.channels_last` memory format.
            fold_batch_norm (`bool`, *optional*, defaults to `True`):
                Fold each `BatchNorm2d` that directly follows a `Conv2d` into it. The pairs are found by running two
                random images of each sub-model's input size (from its recorded preprocessing) and checked against the
                unfolded logits.
            retain_memory (`bool`, *optional*, defaults to `True`):
                Call [`retain_freed_memory`]: a process-wide glibc malloc setting, so the process keeps (and reuses)
                its peak memory instead of returning it to the system. No effect on other C libraries.

        Returns:
            The cascade itself.

        Example:

        ```python
        >>> from transformers import TimmWrapperConfig, TimmWrapperForImageClassification
        >>> from hf_tinysaver import TinySaverForImageClassification

        >>> saver = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=10))
        >>> base = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_efficientnet", num_labels=10))
        >>> cascade = TinySaverForImageClassification.from_saver_and_base(saver, base).optimize_for_inference()
        >>> sorted({type(module).__name__ for module in cascade.saver.modules() if "Folded" in type(module).__name__})
        ['BatchNormFoldedConv2d', 'FoldedBatchNorm2d']
        ```
        """
        self.eval()
        if retain_memory:
            retain_freed_memory()
        sub_models = [(self.saver, self.config.saver_preprocessing), (self.base, self.config.base_preprocessing)]
        for sub_model, preprocessing in sub_models:
            preprocessing = preprocessing or self.config.saver_preprocessing
            if channels_last and any(isinstance(module, nn.Conv2d) for module in sub_model.modules()):
                sub_model.to(memory_format=torch.channels_last)
            has_batch_norm = any(isinstance(module, nn.BatchNorm2d) for module in sub_model.modules())
            if fold_batch_norm and has_batch_norm:
                if preprocessing is None:
                    logger.warning(
                        "No preprocessing is recorded for this cascade, so its input size is unknown and batch norms "
                        "are not folded; rebuild it with `from_saver_and_base(..., saver_preprocessing=...)`."
                    )
                    continue
                parameter = next(sub_model.parameters())
                generator = torch.Generator().manual_seed(0)
                example_input = torch.randn((2, *preprocessing["input_size"]), generator=generator)
                fold_batch_norms(sub_model, example_input.to(dtype=parameter.dtype, device=parameter.device))
        return self

    def _needs_base_pixel_values(self) -> bool:
        saver_spec, base_spec = self.config.saver_preprocessing, self.config.base_preprocessing
        if saver_spec is None or base_spec is None:
            return False
        # Called on every forward pass: normalising (deep-copying) both specs each time would cost more than the rest
        # of the cascade's bookkeeping, so the answer is kept for as long as the specs compare equal.
        cached = self.__dict__.get("_needs_base_pixel_values_cache")
        if cached is not None and cached[0] == saver_spec and cached[1] == base_spec:
            return cached[2]
        needs = normalize_preprocessing(saver_spec) != normalize_preprocessing(base_spec)
        self.__dict__["_needs_base_pixel_values_cache"] = (copy.deepcopy(saver_spec), copy.deepcopy(base_spec), needs)
        return needs

    def saver_logits_in_base_space(self, saver_logits: torch.Tensor) -> torch.Tensor:
        """Puts the saver's logits in the base's label order (identity without `label_mapping`)."""
        if self.label_mapping_index is None:
            return saver_logits
        mapped = saver_logits.new_full((saver_logits.shape[0], self.config.num_labels), float("-inf"))
        return mapped.index_copy(1, self.label_mapping_index.to(saver_logits.device), saver_logits)

    def check_inputs(self, pixel_values: torch.Tensor | None, base_pixel_values: torch.Tensor | None) -> None:
        """Raises a `ValueError` that says what to pass when the inputs cannot feed both sub-models."""
        if pixel_values is None:
            raise ValueError("pixel_values is required; prepare images with TinySaverImageProcessor.")
        if base_pixel_values is None and self._needs_base_pixel_values():
            raise ValueError(
                "This cascade's saver and base use different preprocessing, so `base_pixel_values` is required. "
                "Prepare images with `TinySaverImageProcessor` (`cascade.get_image_processor()`), which returns both."
            )
        if base_pixel_values is not None and base_pixel_values.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} images but base_pixel_values has {base_pixel_values.shape[0]}."
            )

    def register_decision_hook(
        self,
        hook: Callable[
            [TinySaverForImageClassification, torch.Tensor, torch.Tensor | None, TinySaverImageClassifierOutput], None
        ],
    ) -> RemovableHandle:
        """Calls `hook` on every batch once the saver has decided which images exit, in `forward` and `forward_stream`.

        The hook receives `(cascade, pixel_values, base_pixel_values, output)`: the batch's inputs (`base_pixel_values`
        is `None` when `pixel_values` serves both sub-models) and its output, whose `exited`, `saver_confidence` and
        `saver_logits` are set; in `forward_stream`, `output.logits` may still lack the base's answers, which arrive
        later. It runs before the output is returned, so the inputs are still the caller's. Monitors such as
        `hf_tinysaver.monitor.DriftGuard` attach here; the hook must not modify its arguments.

        Args:
            hook: The callable.

        Returns:
            A handle whose `remove()` detaches the hook.
        """
        hooks = self.__dict__.setdefault("_decision_hooks", OrderedDict())
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def _call_decision_hooks(
        self,
        pixel_values: torch.Tensor,
        base_pixel_values: torch.Tensor | None,
        output: TinySaverImageClassifierOutput,
    ) -> None:
        for hook in list(self.__dict__.get("_decision_hooks", {}).values()):
            hook(self, pixel_values, base_pixel_values, output)

    def run_saver(
        self, pixel_values: torch.Tensor, threshold: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs the saver and decides which images exit.

        Args:
            pixel_values: Images prepared for the saver; cast to the saver's own device and dtype.
            threshold: Overrides `config.threshold` (checked by [`validate_threshold`]).

        Returns:
            The saver's logits in the base's label space, its confidence and the boolean exit mask, on the saver's
            device.
        """
        threshold = self.config.threshold if threshold is None else validate_threshold(threshold)
        raw_saver_logits = self.saver(pixel_values=to_placement(pixel_values, placement(self.saver))).logits
        saver_confidence = compute_confidence(
            raw_saver_logits, self.config.confidence, self.config.confidence_temperature
        )
        return self.saver_logits_in_base_space(raw_saver_logits), saver_confidence, saver_confidence > threshold

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        base_pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        threshold: float | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TinySaverImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, channels, height, width)`):
                Images prepared for the saver (`TinySaverImageProcessor` output).
            base_pixel_values (`torch.FloatTensor`, *optional*):
                The same images prepared for the base. Required when the two sub-models' preprocessing differ;
                otherwise `pixel_values` serves both.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices; the cross-entropy of the cascade's logits is returned as `loss`.
            threshold (`float`, *optional*):
                Overrides `config.threshold` for this call.
            return_dict (`bool`, *optional*):
                Return a [`TinySaverImageClassifierOutput`] (default) or a tuple.
        """
        self.check_inputs(pixel_values, base_pixel_values)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        # Each sub-model gets its inputs on its own device and in its own dtype; the outputs come back on the
        # caller's device, the logits in the wider of the two sub-models' dtypes (no-ops when all agree).
        caller_device = pixel_values.device
        base_placement = placement(self.base)
        saver_logits, saver_confidence, exited = self.run_saver(pixel_values, threshold)
        logits_dtype = output_logits_dtype(saver_logits, base_placement)
        saver_logits, saver_confidence, exited = (
            saver_logits.to(caller_device, logits_dtype),
            saver_confidence.to(caller_device),
            exited.to(caller_device),
        )

        logits = saver_logits
        remaining_count, remaining = rows_that_did_not_exit(exited)
        if remaining_count > 0:
            base_inputs = base_pixel_values if base_pixel_values is not None else pixel_values
            if remaining is not None:
                base_inputs = base_inputs.index_select(0, remaining.to(base_inputs.device))
            base_logits = self.base(pixel_values=to_placement(base_inputs, base_placement)).logits
            base_logits = base_logits.to(caller_device, logits_dtype)
            if remaining is None:
                logits = base_logits
            else:
                logits = saver_logits.index_copy(0, remaining, base_logits)

        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels.to(logits.device))

        output = TinySaverImageClassifierOutput(
            loss=loss, logits=logits, exited=exited, saver_confidence=saver_confidence, saver_logits=saver_logits
        )
        if self.__dict__.get("_decision_hooks"):
            self._call_decision_hooks(pixel_values, base_pixel_values, output)
        return output if return_dict else output.to_tuple()

    def forward_stream(
        self,
        batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
        base_batch_size: int | None = None,
        threshold: float | None = None,
        max_waiting_batches: int | None = None,
    ) -> Iterator[TinySaverImageClassifierOutput]:
        r"""
        Classifies a stream of batches, running the base on full batches of the images that did not exit.

        `forward` sends the base the few images of each batch that did not exit, and a CPU runs such small
        sub-batches much less efficiently per image than full ones. For bulk inference (a dataset, a queue of
        requests), this method instead collects those images across batches and runs the base once it has
        `base_batch_size` of them (and on the rest at the end), so the base always works on full batches. Each
        input batch's output is yielded, in input order, as soon as all of its images are answered; an image that
        needs the base may therefore wait for later batches (bound that with `max_waiting_batches`). Predictions
        equal `forward`'s up to float rounding.

        Args:
            batches (`Iterable[torch.Tensor | Mapping[str, torch.Tensor]]`):
                `pixel_values` tensors, or mappings such as the `BatchFeature`s of [`TinySaverImageProcessor`] with
                `pixel_values` and, when the sub-models' preprocessing differ, `base_pixel_values`. Other keys (for
                example `labels`) are ignored.
            base_batch_size (`int`, *optional*):
                Images per base call; defaults to the size of the first batch.
            threshold (`float`, *optional*):
                Overrides `config.threshold`.
            max_waiting_batches (`int`, *optional*):
                Latency bound: when more input batches than this are waiting for the base, it runs at once on
                whatever is queued, even less than a full batch. `0` answers every batch before reading the next
                (like `forward`); the default waits for full batches.

        Returns:
            An iterator of [`TinySaverImageClassifierOutput`] (without `loss`), one per input batch.

        Example:

        ```python
        >>> from PIL import Image
        >>> from transformers import TimmWrapperConfig, TimmWrapperForImageClassification
        >>> from hf_tinysaver import TinySaverForImageClassification

        >>> saver = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=10))
        >>> base = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_vit", num_labels=10))
        >>> cascade = TinySaverForImageClassification.from_saver_and_base(saver, base, threshold=0.15).eval()
        >>> processor = cascade.get_image_processor()
        >>> images = [Image.new("RGB", (64, 48), color) for color in ("red", "green", "blue") for _ in range(4)]
        >>> batches = (processor(images=images[i : i + 4], return_tensors="pt") for i in range(0, 12, 4))
        >>> [tuple(output.logits.shape) for output in cascade.forward_stream(batches)]
        [(4, 10), (4, 10), (4, 10)]
        ```
        """
        if base_batch_size is not None and (isinstance(base_batch_size, bool) or int(base_batch_size) < 1):
            raise ValueError(f"base_batch_size must be a positive number of images, got {base_batch_size!r}.")
        if max_waiting_batches is not None and (isinstance(max_waiting_batches, bool) or int(max_waiting_batches) < 0):
            raise ValueError(f"max_waiting_batches must be 0 or more batches, got {max_waiting_batches!r}.")
        threshold = None if threshold is None else validate_threshold(threshold)
        waiting = deque()  # [output, images still without base logits], in input order
        queue = deque()  # (waiting entry, row positions in its batch, base inputs of those rows)
        queued = 0

        def answered() -> Iterator[TinySaverImageClassifierOutput]:
            while waiting and waiting[0][1] == 0:
                yield waiting.popleft()[0]

        for batch in batches:
            pixel_values, base_pixel_values = stream_batch_inputs(batch)
            self.check_inputs(pixel_values, base_pixel_values)
            if base_batch_size is None:
                base_batch_size = max(1, pixel_values.shape[0])
            with torch.no_grad():
                caller_device = pixel_values.device
                saver_logits, saver_confidence, exited = self.run_saver(pixel_values, threshold)
                logits_dtype = output_logits_dtype(saver_logits, placement(self.base))
                saver_logits, saver_confidence, exited = (
                    saver_logits.to(caller_device, logits_dtype),
                    saver_confidence.to(caller_device),
                    exited.to(caller_device),
                )
                remaining_count, remaining = rows_that_did_not_exit(exited)
                output = TinySaverImageClassifierOutput(
                    logits=saver_logits.clone(),
                    exited=exited,
                    saver_confidence=saver_confidence,
                    saver_logits=saver_logits,
                )
                if self.__dict__.get("_decision_hooks"):
                    self._call_decision_hooks(pixel_values, base_pixel_values, output)
                entry = [output, remaining_count]
                waiting.append(entry)
                if remaining_count > 0:
                    base_inputs = base_pixel_values if base_pixel_values is not None else pixel_values
                    if remaining is None:
                        # A copy, like index_select's: the caller may refill its input buffer for the next batch.
                        remaining = torch.arange(remaining_count, device=exited.device)
                        base_inputs = base_inputs.clone()
                    else:
                        base_inputs = base_inputs.index_select(0, remaining.to(base_inputs.device))
                    queue.append((entry, remaining, base_inputs))
                    queued += remaining_count
                while queued >= base_batch_size:
                    queued -= self._run_base_on_queue(queue, base_batch_size)
            yield from answered()
            if max_waiting_batches is not None and len(waiting) > max_waiting_batches:
                with torch.no_grad():
                    while queued > 0:
                        queued -= self._run_base_on_queue(queue, base_batch_size)
                yield from answered()
        with torch.no_grad():
            while queued > 0:
                queued -= self._run_base_on_queue(queue, base_batch_size)
        yield from answered()

    def _run_base_on_queue(self, queue: deque, max_images: int) -> int:
        """Runs the base once on up to `max_images` queued images and writes its logits into their outputs.

        Args:
            queue: `(waiting entry, row positions, base inputs)` tuples; a partly used one is put back in front.
            max_images: Images in this base call.

        Returns:
            The number of images the base ran on.
        """
        taken, taken_images = [], 0
        while queue and taken_images < max_images:
            entry, positions, base_inputs = queue.popleft()
            room = max_images - taken_images
            if positions.numel() > room:
                queue.appendleft((entry, positions[room:], base_inputs[room:]))
                positions, base_inputs = positions[:room], base_inputs[:room]
            taken.append((entry, positions, base_inputs))
            taken_images += positions.numel()
        base_placement = placement(self.base)
        inputs = [to_placement(base_inputs, base_placement) for _, _, base_inputs in taken]
        base_logits = self.base(pixel_values=inputs[0] if len(inputs) == 1 else torch.cat(inputs)).logits
        for (entry, positions, _), logits in zip(
            taken, base_logits.split([positions.numel() for _, positions, _ in taken]), strict=True
        ):
            output = entry[0]
            output.logits.index_copy_(0, positions, logits.to(output.logits.device, output.logits.dtype))
            entry[1] -= positions.numel()
        return taken_images


def load_classifier(
    model: PreTrainedModel | nn.Module | str | os.PathLike,
    resolver: Callable[[str], PreTrainedModel] | None = None,
) -> PreTrainedModel:
    """Returns an image classifier given as an instance, a local folder, a Hub id or a name `resolver` knows.

    Args:
        model: The classifier, a timm `nn.Module`, a local `save_pretrained` folder or a Hub id.
        resolver: Loads every name (the installed library's rule, which also knows zoo names); without one, a name
            is a local folder or a Hub id for `AutoModelForImageClassification.from_pretrained`.

    Returns:
        The `PreTrainedModel`.
    """
    if isinstance(model, PreTrainedModel):
        return model
    if isinstance(model, nn.Module):
        return wrap_timm_model(model)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"Expected a model instance, a folder or a Hub id, got {type(model).__name__}.")
    if resolver is not None:
        return resolver(str(model))
    return AutoModelForImageClassification.from_pretrained(str(model))


def placement(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """The device and floating-point dtype of a sub-model's first floating-point parameter or buffer.

    Returns:
        `(device, dtype)`, or `(None, None)` for a model without floating-point tensors.
    """
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    for tensor in model.buffers():
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None, None


def to_placement(
    pixel_values: torch.Tensor, model_placement: tuple[torch.device | None, torch.dtype | None]
) -> torch.Tensor:
    """Moves and casts a sub-model's inputs to its own `placement` (a no-op, returning the tensor, when they match)."""
    device, dtype = model_placement
    if device is None:
        return pixel_values
    return pixel_values.to(device=device, dtype=dtype)


def output_logits_dtype(
    saver_logits: torch.Tensor, base_placement: tuple[torch.device | None, torch.dtype | None]
) -> torch.dtype:
    """The dtype of a cascade's logits: the wider of the saver's logits' and the base's (float32 with bfloat16)."""
    base_dtype = base_placement[1]
    if base_dtype is None or base_dtype == saver_logits.dtype:
        return saver_logits.dtype
    return torch.promote_types(saver_logits.dtype, base_dtype)


def rows_that_did_not_exit(exited: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """Counts the rows that did not exit and, when only some of them did, gives their indices.

    Reads the exit flags to the host once: after a large convolution each small tensor op costs several
    microseconds, which at batch 1 would otherwise add up to a visible share of the cascade's time.

    Args:
        exited: `(batch,)` boolean exit mask.

    Returns:
        The number of rows that did not exit, and their indices (`None` when all or none of them exited).
    """
    flags = exited.tolist()
    remaining = [index for index, flag in enumerate(flags) if not flag]
    if not remaining or len(remaining) == len(flags):
        return len(remaining), None
    return len(remaining), torch.tensor(remaining, device=exited.device)


def stream_batch_inputs(batch: torch.Tensor | Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Splits one `forward_stream` item into saver and base inputs, or says what an item must look like."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping) and "pixel_values" in batch:
        return batch["pixel_values"], batch.get("base_pixel_values")
    raise TypeError(
        "forward_stream expects each batch to be a pixel_values tensor or a mapping with 'pixel_values' (and "
        f"'base_pixel_values' when the sub-models' preprocessing differ), got {type(batch).__name__}"
        + (f" with keys {sorted(batch)}." if isinstance(batch, Mapping) else ".")
    )


def load_sub_models(
    saver: Any,
    base: Any,
    saver_preprocessing: dict | None = None,
    base_preprocessing: dict | None = None,
    resolver: Callable[[str], PreTrainedModel] | None = None,
) -> tuple[PreTrainedModel, PreTrainedModel, dict[str, Any], dict[str, Any]]:
    """Loads saver and base (instances, folders, Hub ids or names `resolver` knows) and finds their preprocessing."""
    saver_model = load_classifier(saver, resolver)
    base_model = load_classifier(base, resolver)
    saver_preprocessing = saver_preprocessing or find_preprocessing(saver_model, saver, role="saver")
    base_preprocessing = base_preprocessing or find_preprocessing(base_model, base, role="base")
    return saver_model, base_model, saver_preprocessing, base_preprocessing


def wrap_timm_model(model: nn.Module) -> PreTrainedModel:
    """Wraps a plain timm classifier in `TimmWrapperForImageClassification`, keeping its weights and the class names
    timm knows for it ([`timm_label_names`]; `LABEL_<i>` otherwise)."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    architecture = pretrained_cfg.get("architecture")
    if architecture is None or not hasattr(model, "num_classes"):
        raise TypeError(
            "Plain nn.Modules must be timm classifiers (created with timm.create_model); wrap other models in a "
            "transformers PreTrainedModel first."
        )
    label_names = timm_label_names(model)
    config = TimmWrapperConfig(
        architecture=architecture,
        num_labels=model.num_classes,
        pretrained_cfg=pretrained_cfg,
        id2label=dict(enumerate(label_names)) if label_names else None,
    )
    wrapper = TimmWrapperForImageClassification(config)
    wrapper.timm_model.load_state_dict(model.state_dict())
    return wrapper.train(model.training)


def timm_label_names(model: nn.Module) -> list[str] | None:
    """The class names timm knows for a classifier: its `pretrained_cfg["label_names"]`, else the descriptions of
    the ImageNet subset its classes match (as `TimmWrapperConfig.from_pretrained` names Hub timm models), else `None`."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    names = pretrained_cfg.get("label_names")
    if names is not None and len(names) == model.num_classes:
        return [str(name) for name in names]
    subset = infer_imagenet_subset(model)
    if not subset:
        return None
    info = ImageNetInfo(subset)
    descriptions = info.label_descriptions(as_dict=True)
    names = [descriptions[synset] for synset in info.label_names()]
    return names if len(names) == model.num_classes else None


def find_preprocessing(model: PreTrainedModel, source: Any, role: str) -> dict[str, Any]:
    """Finds the preprocessing a classifier expects: recorded in its config, saved beside it, or timm's own."""
    recorded = getattr(model.config, "preprocessing", None)
    if recorded:
        return normalize_preprocessing(recorded)
    if isinstance(source, (str, os.PathLike)):
        from transformers import AutoImageProcessor

        try:
            image_processor = AutoImageProcessor.from_pretrained(str(source), trust_remote_code=False)
        except (OSError, ValueError, TypeError):
            image_processor = None
        if isinstance(image_processor, TinySaverImageProcessor):
            return image_processor.preprocessing
        if image_processor is not None and not hasattr(image_processor, "val_transforms"):
            return preprocessing_from_image_processor(image_processor)
    if hasattr(model, "timm_model"):
        return preprocessing_from_timm(model)
    raise ValueError(
        f"Cannot tell how the {role} preprocesses images. Pass `{role}_preprocessing=` to from_saver_and_base, e.g. "
        f"`preprocessing_from_image_processor(AutoImageProcessor.from_pretrained(<{role} id>))`."
    )


def find_macs(model: PreTrainedModel, preprocessing: dict[str, Any]) -> int:
    """Returns the MACs per image recorded in the model's config, or counts them on one image of its input size."""
    recorded = getattr(model.config, "macs", None)
    if recorded:
        return int(recorded)
    return count_macs(model, tuple(preprocessing["input_size"]))


__all__ = [
    "TinySaverForImageClassification",
    "TinySaverPreTrainedModel",
    "TinySaverImageClassifierOutput",
    "build_classifier",
    "check_label_spaces",
    "load_classifier",
    "retain_freed_memory",
]
