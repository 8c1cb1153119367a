"""ImageNet MobileNet v1/v2 from Google's 8-bit quantized TFLite files, converted to float PyTorch.

The TFLite graphs are TF-slim MobileNets with batch norm folded into conv biases, so they map one-to-one onto
transformers' `MobileNetV1ForImageClassification` / `MobileNetV2ForImageClassification` (the TF-slim networks with
TF "SAME" padding and ReLU6, ported by transformers from the same TF checkpoints). Each TFLite convolution gives its
dequantized weights (`(q - zero_point) * scale`) and bias to one conv layer, whose batch norm is made the identity
plus that bias. The logits convolution, applied after global average pooling, becomes the linear classifier, with
output 0 ("background") dropped so that the outputs are the 1,000 ImageNet classes in standard order.

timm's MobileNets could hold the same weights, but timm cannot build the v1 widths 0.25/0.5/0.75 from model
arguments, and transformers' classes need no remote code at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    MobileNetV1Config,
    MobileNetV1ForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
)
from transformers.models.mobilenet_v1.modeling_mobilenet_v1 import MobileNetV1ConvLayer
from transformers.models.mobilenet_v2.modeling_mobilenet_v2 import MobileNetV2ConvLayer

from ..models.image_processing_tinysaver import normalize_preprocessing
from .data import imagenet_label_names

_CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")


def mobilenet_tflite_preprocessing(image_size: int) -> dict:
    """What the TFLite models expect: 87.5 % centre crop, bilinear resize, pixels scaled to [-1, 1]."""
    return normalize_preprocessing(
        {
            "input_size": [3, image_size, image_size],
            "resize": "shortest_edge",
            "crop_pct": 0.875,
            "interpolation": "bilinear",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        }
    )


def _interpreter(path: str | Path, num_threads: int | None = None, delegates: bool = True):
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as error:
        raise ImportError(
            "Reading TFLite files needs the LiteRT interpreter: `pip install ai-edge-litert` "
            "(or `pip install 'hf_tinysaver[zoo]'`)."
        ) from error
    # Without the default (XNNPACK) delegate the op list stays the model's own, with no fused DELEGATE nodes.
    resolver = OpResolverType.AUTO if delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(model_path=str(path), num_threads=num_threads, experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    return interpreter


@dataclass
class TFLiteConv:
    """One convolution of a TFLite graph, dequantized to float PyTorch layout."""

    op_name: str
    weight: torch.Tensor  # (out, in / groups, kh, kw)
    bias: torch.Tensor
    output_shape: tuple[int, ...]  # NHWC
    relu6: bool  # its output is clamped to [0, 6]: a fused ReLU6


def _dequantize(interpreter, details: dict) -> np.ndarray:
    values = interpreter.get_tensor(details["index"]).astype(np.float64)
    quantization = details["quantization_parameters"]
    scales, zero_points = quantization["scales"], quantization["zero_points"]
    if len(scales) > 1:  # per-channel quantization along `quantized_dimension`
        shape = [1] * values.ndim
        shape[quantization["quantized_dimension"]] = -1
        scales, zero_points = scales.reshape(shape), zero_points.reshape(shape)
    return (values - zero_points) * scales


def _clamped_to_relu6(details: dict) -> bool:
    scale, zero_point = details["quantization"]
    low, high = np.iinfo(details["dtype"]).min, np.iinfo(details["dtype"]).max
    return abs((low - zero_point) * scale) < 1e-6 and abs((high - zero_point) * scale - 6.0) < 0.01


def read_tflite_convolutions(path: str | Path) -> tuple[list[TFLiteConv], list[str]]:
    """Reads the convolutions of a TFLite classifier in execution order.

    Args:
        path: The `.tflite` file.

    Returns:
        The convolutions (CONV_2D weights OHWI and DEPTHWISE_CONV_2D weights 1HWC, both turned into PyTorch's
        layout), and the names of all ops in execution order.
    """
    interpreter = _interpreter(path, delegates=False)
    tensors = {details["index"]: details for details in interpreter.get_tensor_details()}
    convolutions, op_names = [], []
    for op in interpreter._get_ops_details():
        op_names.append(op["op_name"])
        if op["op_name"] not in _CONV_OPS:
            continue
        weight = torch.from_numpy(_dequantize(interpreter, tensors[op["inputs"][1]])).float()
        if op["op_name"] == "CONV_2D":
            weight = weight.permute(0, 3, 1, 2)
        else:
            if weight.shape[0] != 1:
                raise ValueError(
                    f"{Path(path).name}: depthwise convolutions with a channel multiplier are unsupported."
                )
            weight = weight.permute(3, 0, 1, 2)
        bias = torch.from_numpy(_dequantize(interpreter, tensors[op["inputs"][2]])).float()
        output = tensors[op["outputs"][0]]
        convolutions.append(
            TFLiteConv(
                op_name=op["op_name"],
                weight=weight.contiguous(),
                bias=bias,
                output_shape=tuple(int(v) for v in output["shape"]),
                relu6=_clamped_to_relu6(output),
            )
        )
    return convolutions, op_names


def _conv_layers(model) -> list:
    return [module for module in model.modules() if isinstance(module, (MobileNetV1ConvLayer, MobileNetV2ConvLayer))]


def _output_shapes(model, layers: list, image_size: int) -> list[tuple[int, ...]]:
    shapes = []
    hooks = [
        layer.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
        for layer in layers
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    return [(n, h, w, c) for n, c, h, w in shapes]  # NCHW -> NHWC, as TFLite reports them


def convert_mobilenet_tflite(path: str | Path, version: int, depth_multiplier: float, image_size: int):
    """Converts a quantized TFLite MobileNet into a float transformers model.

    The TFLite graph and the transformers network must agree layer by layer: the number, kind and shape of the
    convolutions, which of them end in ReLU6, their output resolutions (so strides and padding agree) and, for v2,
    the number of residual additions. Any difference raises an error instead of giving a silently wrong model.

    Args:
        path: The `.tflite` file.
        version: 1 or 2.
        depth_multiplier: The width multiplier of the file (e.g. 0.25).
        image_size: The input resolution of the file (e.g. 128).

    Returns:
        A `MobileNetV1ForImageClassification` or `MobileNetV2ForImageClassification` in eval mode, with 1,000
        ImageNet outputs.
    """
    convolutions, op_names = read_tflite_convolutions(path)
    name = Path(path).name
    config_class, model_class = {
        1: (MobileNetV1Config, MobileNetV1ForImageClassification),
        2: (MobileNetV2Config, MobileNetV2ForImageClassification),
    }[version]
    config = config_class(
        depth_multiplier=depth_multiplier,
        image_size=image_size,
        id2label=dict(enumerate(imagenet_label_names())),
    )
    model = model_class(config).eval()
    layers = _conv_layers(model)
    *feature_convolutions, logits_convolution = convolutions
    if len(layers) != len(feature_convolutions):
        raise ValueError(f"{name} has {len(feature_convolutions)} feature convolutions, the model {len(layers)}.")
    if version == 2:
        residual_blocks = sum(getattr(module, "use_residual", False) for module in model.modules())
        if residual_blocks != op_names.count("ADD"):
            raise ValueError(f"{name} has {op_names.count('ADD')} residual additions, the model {residual_blocks}.")
    for index, (layer, source) in enumerate(zip(layers, feature_convolutions, strict=True)):
        problem = None
        if tuple(layer.convolution.weight.shape) != tuple(source.weight.shape):
            problem = f"weight {tuple(source.weight.shape)} vs {tuple(layer.convolution.weight.shape)}"
        elif (layer.activation is not None) != source.relu6:
            problem = f"ReLU6 {source.relu6} vs {layer.activation is not None}"
        if problem:
            raise ValueError(f"{name}: convolution {index} ({source.op_name}) does not match the model: {problem}.")
        normalization = layer.normalization
        with torch.no_grad():
            layer.convolution.weight.copy_(source.weight)
            # Identity batch norm (mean 0, var + eps = 1, scale 1) whose shift is the folded conv bias.
            normalization.weight.fill_(1.0)
            normalization.bias.copy_(source.bias)
            normalization.running_mean.zero_()
            normalization.running_var.fill_(1.0 - normalization.eps)
    expected_shapes = [source.output_shape for source in feature_convolutions]
    actual_shapes = _output_shapes(model, layers, image_size)
    if actual_shapes != expected_shapes:
        raise ValueError(
            f"{name}: feature map shapes differ from the TFLite graph: {actual_shapes} vs {expected_shapes}."
        )
    logits_weight = logits_convolution.weight.flatten(1)
    if logits_weight.shape != (1001, model.classifier.in_features) or logits_convolution.relu6:
        raise ValueError(f"{name}: the last convolution is not a 1001-way logits layer: {tuple(logits_weight.shape)}.")
    with torch.no_grad():
        model.classifier.weight.copy_(logits_weight[1:])
        model.classifier.bias.copy_(logits_convolution.bias[1:])
    return model


class TFLiteImageClassifier:
    """Runs a quantized TFLite ImageNet classifier with the LiteRT interpreter (the int8 reference).

    Args:
        path: The `.tflite` file.
        num_threads: Interpreter threads.

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_tinysaver.zoo import resolve_assets
    >>> from hf_tinysaver.zoo.mobilenet_tflite import TFLiteImageClassifier

    >>> path = resolve_assets() / "models/imagenet-mobilenet-tflite/mobilenet_v1_0.25_128_quant.tflite"
    >>> classifier = TFLiteImageClassifier(path)
    >>> classifier(np.zeros((2, 128, 128, 3), dtype=np.uint8)).shape
    (2, 1000)
    ```
    """

    def __init__(self, path: str | Path, num_threads: int | None = None):
        self.interpreter = _interpreter(path, num_threads=num_threads)
        self.input_details = self.interpreter.get_input_details()[0]
        self.output_details = self.interpreter.get_output_details()[0]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Classifies uint8 RGB images.

        Args:
            images: `(N, H, W, 3)` uint8 pixels, already resized and cropped to the model's input size.

        Returns:
            `(N, 1000)` float probabilities of the ImageNet classes (the "background" output dropped).
        """
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError("TFLiteImageClassifier takes (N, H, W, 3) uint8 images.")
        scale, zero_point = self.output_details["quantization"]
        outputs = []
        for image in images:
            self.interpreter.set_tensor(self.input_details["index"], image[None])
            self.interpreter.invoke()
            quantized = self.interpreter.get_tensor(self.output_details["index"])[0].astype(np.float32)
            outputs.append((quantized[1:] - zero_point) * scale)
        return np.stack(outputs)


def pixel_values_to_uint8(pixel_values: torch.Tensor, preprocessing: dict) -> np.ndarray:
    """Undoes the normalisation of `pixel_values` (N, C, H, W), giving the (N, H, W, C) uint8 pixels they came from."""
    mean = torch.tensor(preprocessing["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing["std"]).view(1, -1, 1, 1)
    pixels = ((pixel_values.float() * std + mean) * 255).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


__all__ = [
    "TFLiteImageClassifier",
    "convert_mobilenet_tflite",
    "mobilenet_tflite_preprocessing",
    "pixel_values_to_uint8",
    "read_tflite_convolutions",
]
