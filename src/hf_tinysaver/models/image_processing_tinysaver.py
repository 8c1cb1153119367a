"""Image processor of a TinySaver cascade: one raw image in, each sub-model's own preprocessing out.

A saver and its base rarely share preprocessing (a 128 px MobileNet and a 260 px EfficientNet, different
normalisations). The processor therefore emits `pixel_values` prepared for the saver and, when the base needs
something else, `base_pixel_values` prepared for the base, each exactly as the sub-model gets it on its own.

Copied next to saved cascades as remote code: imports only torch, torchvision, PIL, numpy and transformers.
"""

from __future__ import annotations

import copy
import enum
import math
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import transformers
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

RESIZE_MODES = ("shortest_edge", "squash", "fixed")
INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}
_PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def normalize_preprocessing(spec: dict[str, Any]) -> dict[str, Any]:
    """Validates a preprocessing spec and fills in its defaults.

    A spec describes how one sub-model wants its images, in timm's data-config terms:

    - `input_size`: `[channels, height, width]` of the model input.
    - `resize`: `"shortest_edge"` (timm's eval transform: scale the shorter side to `floor(height / crop_pct)`, then
      centre-crop), `"squash"` (resize both sides to `floor(size / crop_pct)`, then centre-crop) or `"fixed"`
      (resize straight to `height x width`, no crop; a no-op for images of that size already).
    - `crop_pct`: fraction of the resized image kept by the centre crop (default 0.875; ignored by `"fixed"`).
    - `interpolation`: `"bilinear"`, `"bicubic"`, `"nearest"`, ...
    - `mean` / `std`: per-channel normalisation of pixels scaled to [0, 1].

    Alternatively, a spec holding `image_processor` (the `to_dict()` of a transformers image processor) is applied
    by that processor itself, so transformers-native sub-models see exactly their own preprocessing.

    Args:
        spec: The spec to check.

    Returns:
        A new, complete spec.
    """
    if not isinstance(spec, dict):
        raise TypeError(f"A preprocessing spec must be a dict, got {type(spec).__name__}.")
    spec = copy.deepcopy(spec)
    if "image_processor" in spec:
        processor_dict = spec["image_processor"]
        if not isinstance(processor_dict, dict) or "image_processor_type" not in processor_dict:
            raise ValueError("`image_processor` must be the `to_dict()` of a transformers image processor.")
        return spec
    if "input_size" not in spec:
        raise ValueError("A preprocessing spec needs `input_size` ([channels, height, width]).")
    input_size = [int(v) for v in spec["input_size"]]
    if len(input_size) != 3 or min(input_size) < 1:
        raise ValueError(f"input_size must be [channels, height, width], got {spec['input_size']}.")
    resize = spec.get("resize", "shortest_edge")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}.")
    if resize == "shortest_edge" and input_size[1] != input_size[2]:
        raise ValueError(
            f"resize='shortest_edge' needs a square input_size, got {input_size}; use 'squash' or 'fixed'."
        )
    crop_pct = float(spec.get("crop_pct") or 0.875)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    interpolation = spec.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}.")
    channels = input_size[0]
    mean = [float(v) for v in spec.get("mean", IMAGENET_DEFAULT_MEAN)]
    std = [float(v) for v in spec.get("std", IMAGENET_DEFAULT_STD)]
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ValueError(f"mean and std need {channels} values each (std > 0), got mean={mean}, std={std}.")
    return {
        "input_size": input_size,
        "resize": resize,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
        "mean": mean,
        "std": std,
    }


def preprocessing_from_timm(model_or_config: Any) -> dict[str, Any]:
    """Builds the spec of a timm model (or `TimmWrapperForImageClassification`, or a timm pretrained config dict).

    Args:
        model_or_config: A timm model, a transformers TimmWrapper model, or a timm data/pretrained config dict.

    Returns:
        The preprocessing spec that timm's own eval transform for that model implements.
    """
    import timm.data

    if hasattr(model_or_config, "timm_model"):
        model_or_config = model_or_config.timm_model
    if isinstance(model_or_config, dict):
        data_config = timm.data.resolve_data_config(model_or_config, verbose=False)
    else:
        data_config = timm.data.resolve_model_data_config(model_or_config)
    crop_mode = data_config.get("crop_mode") or "center"
    if crop_mode not in ("center", "squash"):
        raise ValueError(f"timm crop_mode {crop_mode!r} is not supported; use a 'center' or 'squash' data config.")
    input_size = list(data_config["input_size"])
    resize = "squash" if crop_mode == "squash" or input_size[1] != input_size[2] else "shortest_edge"
    return normalize_preprocessing(
        {
            "input_size": input_size,
            "resize": resize,
            "crop_pct": data_config.get("crop_pct"),
            "interpolation": data_config.get("interpolation", "bilinear"),
            "mean": list(data_config["mean"]),
            "std": list(data_config["std"]),
        }
    )


def preprocessing_from_image_processor(image_processor: Any) -> dict[str, Any]:
    """Wraps a transformers image processor (e.g. `ViTImageProcessor`) as a spec that replays it exactly.

    Args:
        image_processor: A transformers image processor instance.

    Returns:
        A spec holding the processor's serialised form plus a readable summary (`input_size`, `mean`, `std`,
        `interpolation`) used for MAC counting and documentation.
    """
    processor_dict = image_processor.to_dict()
    processor_dict.setdefault("image_processor_type", type(image_processor).__name__)
    size = processor_dict.get("crop_size") if processor_dict.get("do_center_crop") else processor_dict.get("size")
    height, width = _size_to_hw(size or {})
    resample = processor_dict.get("resample")
    summary = {
        "input_size": [3, height, width],
        "mean": list(processor_dict.get("image_mean") or IMAGENET_DEFAULT_MEAN),
        "std": list(processor_dict.get("image_std") or IMAGENET_DEFAULT_STD),
        "interpolation": _PIL_RESAMPLE_NAMES.get(int(resample), str(resample)) if resample is not None else None,
    }
    return {**summary, "image_processor": _jsonable(processor_dict)}


def _size_to_hw(size: dict[str, int] | int) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    return 224, 224


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, enum.Enum):
        return value.value  # e.g. PILImageResampling, so the spec stays plain JSON
    return value


def build_transform(spec: dict[str, Any]):
    """Returns a callable turning one RGB PIL image into the `(C, H, W)` float tensor that spec describes."""
    spec = normalize_preprocessing(spec)
    if "image_processor" in spec:
        processor_dict = dict(spec["image_processor"])
        processor_class = getattr(transformers, processor_dict["image_processor_type"], None)
        if processor_class is None:
            raise ValueError(
                f"Image processor {processor_dict['image_processor_type']!r} is not in this transformers version; "
                "upgrade transformers."
            )
        image_processor = processor_class.from_dict(processor_dict)
        return lambda image: image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    _, height, width = spec["input_size"]
    interpolation = INTERPOLATIONS[spec["interpolation"]]
    steps = []
    if spec["resize"] == "fixed":
        steps.append(transforms.Resize((height, width), interpolation=interpolation))
    elif spec["resize"] == "shortest_edge":
        steps += [
            transforms.Resize(math.floor(height / spec["crop_pct"]), interpolation=interpolation),
            transforms.CenterCrop((height, width)),
        ]
    else:
        scale_size = (math.floor(height / spec["crop_pct"]), math.floor(width / spec["crop_pct"]))
        steps += [transforms.Resize(scale_size, interpolation=interpolation), transforms.CenterCrop((height, width))]
    steps += [transforms.ToTensor(), transforms.Normalize(mean=spec["mean"], std=spec["std"])]
    return transforms.Compose(steps)


EXIF_ORIENTATION = 0x0112
# PIL modes whose pixels are 16-bit integers (0..65535).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def pixels_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Scales an image array of any numeric dtype to 8 bits (0..255), by the value range its type or data implies.

    The rules, the same for PIL images, NumPy arrays and tensors:

    - `uint8`: unchanged. `bool`: False/True become 0/255.
    - `uint16` (PIL's `I;16` modes, 16-bit PNGs and TIFFs): 0..65535 is scaled to 0..255.
    - Other integer types (PIL's 32-bit mode `I`, which is how PIL hands out 16-bit files too, `int32`/`int64`
      arrays and tensors): by the data's bit depth, 0..255 as 8-bit and 0..65535 as 16-bit; negative values and
      values above 65535 are an error.
    - Floats (PIL's mode `F`, `float16`/`float32`/`float64`): 0..1 when no value exceeds 1, else 0..255 as 8-bit
      values; NaN, infinite, negative values and values above 255 are an error.

    Scaled values are rounded to the nearest 8-bit level, so `v * 257` (16-bit) and `v / 255` (float) give back the
    8-bit `v` exactly. Clipping (what `PIL.Image.convert("RGB")` does to such images) is never used.

    Args:
        pixels: The image's pixel values.

    Returns:
        A `uint8` array of the same shape.

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_tinysaver.models.image_processing_tinysaver import pixels_to_uint8

    >>> pixels_to_uint8(np.array([0, 128 * 257, 65535], dtype=np.uint16)).tolist()
    [0, 128, 255]
    >>> pixels_to_uint8(np.array([0.0, 0.5, 1.0])).tolist()
    [0, 128, 255]
    ```
    """
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if np.issubdtype(pixels.dtype, np.floating):
        values = pixels.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError("The image holds NaN or infinite pixel values; fix or drop it.")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0 or high > 255:
            raise ValueError(
                f"A float image must hold values in 0..1 (or 0..255), got {low:g}..{high:g}; rescale it first."
            )
        scale = 255.0 if high <= 1.0 else 1.0
        return np.rint(values * scale).astype(np.uint8)
    if np.issubdtype(pixels.dtype, np.integer):
        values = pixels.astype(np.int64)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:
            raise ValueError(
                f"An integer image must hold 8-bit (0..255) or 16-bit (0..65535) values, got {low}..{high}; convert "
                "it to 8 bits first."
            )
        if (pixels.dtype.kind == "u" and pixels.dtype.itemsize == 2) or high > 255:  # uint16 of either byte order
            return ((values * 255 + 32767) // 65535).astype(np.uint8)  # rounded: v * 257 -> v
        return values.astype(np.uint8)
    raise ValueError(f"Unsupported image dtype {pixels.dtype}; pass uint8, 16-bit integer or float pixels.")


def to_rgb_pil(image: Any) -> PIL.Image.Image:
    """Converts an image to an RGB PIL image with the right pixels.

    Accepts a PIL image of any mode, an `(H, W)` or `(H, W, C)` array or a `(C, H, W)` tensor (C = 1, 3 or 4), of any
    numeric dtype: 16-bit, 32-bit integer and float pixels are scaled to 8 bits as [`pixels_to_uint8`] describes,
    never clipped. A PIL image's EXIF orientation is applied first (`PIL.ImageOps.exif_transpose`, as
    `transformers.image_utils.load_image` does), and transparent pixels are composited on white.
    """
    if isinstance(image, torch.Tensor):
        if image.ndim not in (2, 3):
            raise ValueError(
                f"Tensor images must be (channels, height, width) or (height, width), got shape {tuple(image.shape)}."
            )
        pixels = image.detach().cpu()
        if pixels.dtype == torch.bfloat16:
            pixels = pixels.float()
        image = (pixels.permute(1, 2, 0) if pixels.ndim == 3 else pixels).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(
                f"Array images must be (height, width) or (height, width, 3 or 4), got shape {image.shape}."
            )
        image = PIL.Image.fromarray(np.ascontiguousarray(pixels_to_uint8(image)))
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"Expected a PIL image, an array or a tensor, got {type(image).__name__}.")
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = PIL.Image.fromarray(pixels_to_uint8(np.asarray(image)))
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Composite transparent pixels on white, as browsers and PIL-based loaders show them.
            background = PIL.Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
            return background
        image = image.convert("RGB")
    return image


class TinySaverImageProcessor(BaseImageProcessor):
    r"""
    Prepares raw images for a TinySaver cascade: `pixel_values` with the saver's preprocessing and, when the base
    model needs different preprocessing, `base_pixel_values` with the base's. Each spec reproduces the sub-model's
    own preprocessing exactly (see [`normalize_preprocessing`]). With only `preprocessing` set it serves a single
    classifier.

    Args:
        preprocessing (`dict`):
            Spec of the saver (or of the single model).
        base_preprocessing (`dict`, *optional*):
            Spec of the base model. Omitted or equal to `preprocessing`: one tensor serves both.

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_tinysaver import TinySaverImageProcessor

    >>> processor = TinySaverImageProcessor(
    ...     preprocessing={"input_size": [3, 32, 32], "resize": "fixed", "interpolation": "bilinear"},
    ...     base_preprocessing={"input_size": [3, 64, 64], "resize": "shortest_edge", "mean": [0.5] * 3, "std": [0.5] * 3},
    ... )
    >>> inputs = processor(images=Image.new("RGB", (80, 60)), return_tensors="pt")
    >>> inputs["pixel_values"].shape, inputs["base_pixel_values"].shape
    (torch.Size([1, 3, 32, 32]), torch.Size([1, 3, 64, 64]))
    ```
    """

    model_input_names = ["pixel_values", "base_pixel_values"]

    def __init__(
        self,
        preprocessing: dict[str, Any] | None = None,
        base_preprocessing: dict[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if preprocessing is None:
            raise ValueError(
                "TinySaverImageProcessor needs `preprocessing` (the saver's spec); build one with "
                "`preprocessing_from_timm(model)` or `preprocessing_from_image_processor(processor)`."
            )
        self.preprocessing = normalize_preprocessing(preprocessing)
        base_preprocessing = normalize_preprocessing(base_preprocessing) if base_preprocessing else None
        self.base_preprocessing = None if base_preprocessing == self.preprocessing else base_preprocessing

    def _get_transforms(self):
        # Built lazily from the specs; `to_dict` drops them so they never reach the saved JSON.
        if getattr(self, "_transforms", None) is None:
            self._transforms = (
                build_transform(self.preprocessing),
                build_transform(self.base_preprocessing) if self.base_preprocessing else None,
            )
        return self._transforms

    def to_dict(self) -> dict[str, Any]:
        transforms_cache, self._transforms = getattr(self, "_transforms", None), None
        try:
            output = super().to_dict()
        finally:
            self._transforms = transforms_cache
        output.pop("_transforms", None)
        return output

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Prepares one image or a list of images.

        Args:
            images: A PIL image (any mode: grayscale and RGBA are converted to RGB; 16-bit, 32-bit integer and float
                images are scaled to 8 bits, see [`pixels_to_uint8`]; the EXIF orientation is applied), an array or
                a tensor, or a sequence of them (list, tuple, `datasets` column).
            return_tensors: Only `"pt"` is supported.

        Returns:
            A `BatchFeature` with `pixel_values` and, when the base's preprocessing differs, `base_pixel_values`.
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(
                f"TinySaverImageProcessor returns PyTorch tensors only; got return_tensors={return_tensors!r}."
            )
        if isinstance(images, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        else:
            images = list(images)  # lists, tuples and `datasets` columns
        if len(images) == 0:
            raise ValueError("No images given.")
        images = [to_rgb_pil(image) for image in images]
        saver_transform, base_transform = self._get_transforms()
        data = {"pixel_values": torch.stack([saver_transform(image) for image in images])}
        if base_transform is not None:
            data["base_pixel_values"] = torch.stack([base_transform(image) for image in images])
        return BatchFeature(data=data, tensor_type="pt")


__all__ = [
    "TinySaverImageProcessor",
    "build_transform",
    "normalize_preprocessing",
    "pixels_to_uint8",
    "preprocessing_from_image_processor",
    "preprocessing_from_timm",
    "to_rgb_pil",
]
