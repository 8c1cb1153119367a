"""The zoo's evaluation datasets (CIFAR-10 JPEG, ImageNet-1k validation subset) and their label names."""

from __future__ import annotations

import os
from collections import Counter
from functools import lru_cache
from pathlib import Path

from .assets import asset_path, resolve_assets

# Dataset name -> folder inside the assets folder.
ZOO_DATASETS = {
    "cifar10": "datasets/cifar10-jpeg",
    "imagenet-val-1300": "datasets/imagenet-val-1300",
}


def load_zoo_dataset(name: str, split: str, assets: str | os.PathLike | None = None):
    """Loads one of the zoo's datasets from the assets folder with `datasets.load_dataset`.

    [`hf_tinysaver.sources.load_dataset_split`] loads them too (`"cifar10"` there is this dataset unless a local
    folder of that name exists), with `shuffle_seed` and every other kind of dataset source.

    Args:
        name: `"cifar10"` (splits `train` and `test`) or `"imagenet-val-1300"` (split `validation`).
        split: The split, with `datasets` slicing if wanted (`"test[:50%]"`).
        assets: The assets folder; defaults to [`resolve_assets`]'s search.

    Returns:
        A `datasets.Dataset` with columns `image` (PIL) and `label` (`ClassLabel` with the class names).

    Example:

    ```python
    >>> from hf_tinysaver.zoo import load_zoo_dataset

    >>> dataset = load_zoo_dataset("cifar10", "test[:10]")
    >>> dataset.features["label"].names[:3]
    ['airplane', 'automobile', 'bird']
    ```
    """
    import datasets

    return datasets.load_dataset(str(zoo_dataset_folder(name, assets)), split=split)


def zoo_dataset_folder(name: str, assets: str | os.PathLike | None = None) -> Path:
    """The folder of a zoo dataset inside the assets folder.

    Args:
        name: A name from `ZOO_DATASETS`.
        assets: The assets folder; defaults to [`resolve_assets`]'s search.

    Returns:
        The existing folder.

    Raises:
        ValueError: `name` is no zoo dataset.
        FileNotFoundError: The assets folder or the dataset's folder in it is missing (the message says where).
    """
    if name not in ZOO_DATASETS:
        raise ValueError(f"Unknown zoo dataset {name!r}; choose one of {sorted(ZOO_DATASETS)}.")
    return asset_path(resolve_assets(assets), ZOO_DATASETS[name])


@lru_cache(maxsize=1)
def imagenet_label_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in the standard sorted-wnid order, as the zoo's models label them.

    The names are timm's WordNet descriptions; the two classes both described as "crane" (the bird and the machine)
    get their wnid appended, as in the `imagenet-val-1300` dataset's `ClassLabel`, so that every name is unique.

    Returns:
        A tuple of 1,000 names.
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    wnids = info.label_names()
    descriptions = info.label_descriptions(as_dict=True)
    counts = Counter(descriptions[wnid] for wnid in wnids)
    return tuple(
        descriptions[wnid] if counts[descriptions[wnid]] == 1 else f"{descriptions[wnid]} ({wnid})" for wnid in wnids
    )


__all__ = ["ZOO_DATASETS", "imagenet_label_names", "load_zoo_dataset", "zoo_dataset_folder"]
