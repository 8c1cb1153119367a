"""Where a model or a dataset comes from: the one place that tells a zoo name, a local path and a Hub id apart.

Every model argument of the library accepts a model instance, a zoo name (`hf_tinysaver.zoo.ZOO`), a local
`save_pretrained` folder or a Hub id; every dataset argument a loaded `datasets.Dataset`, a zoo dataset name
(`hf_tinysaver.zoo.ZOO_DATASETS`), a local dataset folder or a Hub dataset id. [`parse_source`] decides which, with
one precedence rule for both:

1. An object that is not a string or a path (a model, a `datasets.Dataset`) is used as it is.
2. An existing local path always wins: a folder named `cifar10-resnet20` in the working directory is that folder,
   not the zoo model. A `pathlib.Path` (any `os.PathLike`) always names a local path, existing or not.
3. Otherwise a zoo name is the zoo's model or dataset.
4. Otherwise the string is a Hub id; one that cannot be a Hub id (`a/b/c`, `./folder`) names a missing local path.

A name that none of these loads gets a one-line `ValueError` naming the kinds of source and the closest zoo name
([`unknown_model_error`], [`unknown_dataset_error`]).

Example:

```python
>>> from hf_tinysaver.sources import load_dataset_split, load_model, parse_source

>>> parse_source("cifar10-resnet20")
Source(origin='zoo', value='cifar10-resnet20')
>>> parse_source("google/vit-base-patch16-224")
Source(origin='hub', value='google/vit-base-patch16-224')
>>> parse_source("cifar10", what="dataset")
Source(origin='zoo', value='cifar10')
>>> model = load_model("cifar10-resnet20")
>>> model.config.num_labels
10
>>> len(load_dataset_split("cifar10", "test[:8]"))
8
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

SourceOrigin = Literal["object", "local", "zoo", "hub"]


@dataclass(frozen=True)
class Source:
    """A model or dataset argument with its origin decided (see [`parse_source`]).

    Args:
        origin: `"object"` (an instance, used as it is), `"local"` (a path on this machine), `"zoo"` (a zoo name)
            or `"hub"` (a Hub id).
        value: The instance, or the path, zoo name or Hub id as a string.
    """

    origin: SourceOrigin
    value: Any


def _zoo_names(what: str) -> dict[str, Any]:
    if what == "model":
        from .zoo.registry import ZOO

        return ZOO
    from .zoo.data import ZOO_DATASETS

    return ZOO_DATASETS


def _can_be_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def parse_source(source: Any, what: Literal["model", "dataset"] = "model") -> Source:
    """Decides whether a model or dataset argument is an object, a local path, a zoo name or a Hub id.

    The precedence rule is the module's (an existing local path wins over a zoo name, a zoo name over a Hub id).
    Nothing is loaded or downloaded.

    Args:
        source: The argument: an instance, a string or an `os.PathLike`.
        what: `"model"` (zoo names from `ZOO`) or `"dataset"` (zoo names from `ZOO_DATASETS`).

    Returns:
        The [`Source`]; paths, zoo names and Hub ids as strings.

    Raises:
        ValueError: `what` is neither `"model"` nor `"dataset"`.
    """
    if what not in ("model", "dataset"):
        raise ValueError(f"what must be 'model' or 'dataset', got {what!r}.")
    if not isinstance(source, (str, os.PathLike)):
        return Source("object", source)
    name = os.fspath(source)
    if not isinstance(source, str) or os.path.exists(name):
        return Source("local", name)
    if name in _zoo_names(what):
        return Source("zoo", name)
    return Source("hub", name) if _can_be_hub_id(name) else Source("local", name)


def _edit_distance(first: str, second: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions."""
    previous = list(range(len(second) + 1))
    for i, first_char in enumerate(first, 1):
        current = [i]
        for j, second_char in enumerate(second, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (first_char != second_char)))
        previous = current
    return previous[-1]


def _unknown_source_error(name: str, cause: BaseException | None, what: str, local_kind: str) -> ValueError:
    """The one-line error for a model or dataset name that nothing loads, with the closest zoo name."""
    from huggingface_hub import constants

    zoo_names = list(_zoo_names(what))
    distances = {zoo_name: _edit_distance(name.lower(), zoo_name) for zoo_name in zoo_names}
    closest = min(distances, key=distances.get)
    hint = f" Did you mean {closest!r}?" if distances[closest] <= max(2, len(closest) // 4) else ""
    hub = "a Hub id reachable offline (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "a loadable Hub id"
    if what == "dataset":
        hub = hub.replace("Hub id", "Hub dataset id")
    reason = ""
    if cause is not None and not constants.HF_HUB_OFFLINE:  # offline, the cause only says "cannot connect"
        reason = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
        reason = f" ({type(cause).__name__}: {reason})" if reason else f" ({type(cause).__name__})"
    return ValueError(
        f"{what.capitalize()} {name!r} is neither a zoo name, nor a local {local_kind}, nor {hub}{reason}.{hint} "
        f"Zoo names: {', '.join(zoo_names)}."
    )


def unknown_model_error(name: str | os.PathLike, cause: BaseException | None = None) -> ValueError:
    """The error for a model name that is no zoo name, no local folder and no loadable Hub id.

    One line that names the three kinds of source, suggests the closest zoo name and lists them all.

    Args:
        name: The model argument.
        cause: The error loading it from the Hub raised (quoted unless offline, where it only says "cannot connect").

    Returns:
        The `ValueError` to raise (`raise unknown_model_error(name, error) from error`).
    """
    return _unknown_source_error(os.fspath(name), cause, "model", "model folder")


def unknown_dataset_error(name: str | os.PathLike, cause: BaseException | None = None) -> ValueError:
    """The error for a dataset name that is no zoo dataset, no local folder and no loadable Hub dataset id.

    Args:
        name: The dataset argument.
        cause: The error loading it from the Hub raised.

    Returns:
        The `ValueError` to raise, in the same form as [`unknown_model_error`]'s.
    """
    return _unknown_source_error(os.fspath(name), cause, "dataset", "dataset folder")


def _missing_local_error(path: str, what: str) -> ValueError:
    error = unknown_model_error(path) if what == "model" else unknown_dataset_error(path)
    return ValueError(f"No such local path {path!r}. {error}")


def _local_model_folder(path: str) -> str:
    if not os.path.exists(path):
        raise _missing_local_error(path, "model")
    if not os.path.isdir(path):
        raise ValueError(f"Model {path!r} is a file; pass the folder `save_pretrained` wrote (with its config.json).")
    return path


def load_model(model: Any, assets: str | os.PathLike | None = None):
    """Loads a classifier from a zoo name, a local folder or a Hub id (instances pass through).

    Which one a string is follows the module's precedence rule (an existing local folder wins over a zoo name, a zoo
    name over a Hub id). A timm `nn.Module` is wrapped as a transformers model.

    Args:
        model: An instance, a zoo name, a local `save_pretrained` folder or a Hub id.
        assets: The assets folder for zoo models (default: `TINYSAVER_ASSETS`, then `../shared`).

    Returns:
        The `PreTrainedModel`.

    Raises:
        ValueError: When a name is neither a zoo name, nor a local folder, nor a Hub id that loads (see
            [`unknown_model_error`]).
    """
    source = parse_source(model, "model")
    if source.origin == "object":
        from .models.modeling_tinysaver import load_classifier

        return load_classifier(source.value)
    if source.origin == "zoo":
        from .zoo.registry import load_zoo_model

        return load_zoo_model(source.value, assets=assets)
    from transformers import AutoModelForImageClassification

    # Loading a model module runs hf_tinysaver/models/__init__.py, which registers the Auto classes.
    from .models import modeling_tinysaver  # noqa: F401

    if source.origin == "local":
        return AutoModelForImageClassification.from_pretrained(_local_model_folder(source.value))
    try:
        return AutoModelForImageClassification.from_pretrained(source.value)
    except OSError as error:  # transformers' "not found / cannot connect" and huggingface_hub's errors
        raise unknown_model_error(source.value, error) from error


def load_model_config(model: Any, assets: str | os.PathLike | None = None):
    """The config of a model argument, without loading the weights where it can (as [`load_model`] decides).

    Args:
        model: An instance, a zoo name, a local `save_pretrained` folder or a Hub id.
        assets: The assets folder for zoo models.

    Returns:
        The model's `PretrainedConfig` (for a zoo model, that of its converted, cached folder).

    Raises:
        ValueError: As [`load_model`].
    """
    source = parse_source(model, "model")
    from transformers import AutoConfig, PreTrainedModel

    # Loading a model module runs hf_tinysaver/models/__init__.py, which registers the Auto classes.
    from .models import modeling_tinysaver  # noqa: F401

    if source.origin == "object":
        return source.value.config if isinstance(source.value, PreTrainedModel) else load_model(source.value).config

    if source.origin == "zoo":
        from .zoo.registry import cached_zoo_folder

        return AutoConfig.from_pretrained(cached_zoo_folder(source.value, assets))
    if source.origin == "local":
        return AutoConfig.from_pretrained(_local_model_folder(source.value))
    try:
        return AutoConfig.from_pretrained(source.value)
    except OSError as error:
        raise unknown_model_error(source.value, error) from error


def resolve_dataset_source(dataset: Any, assets: str | os.PathLike | None = None) -> Any:
    """Turns a zoo dataset name into its local folder; other sources are returned unchanged.

    Args:
        dataset: A zoo dataset name, a local folder, a Hub dataset id or a loaded `datasets.Dataset`.
        assets: The assets folder for zoo datasets (default: `TINYSAVER_ASSETS`, then `../shared`).

    Returns:
        What `datasets.load_dataset` (or [`record`]) accepts.
    """
    if parse_source(dataset, "dataset").origin == "zoo":
        from .zoo.data import zoo_dataset_folder

        return str(zoo_dataset_folder(dataset, assets))
    return dataset


def _check_shuffle_seed(shuffle_seed: Any) -> None:
    if shuffle_seed is not None and (isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int)):
        raise ValueError(f"shuffle_seed must be an integer or None, got {shuffle_seed!r}.")


def _split_instruction(split: str):
    import datasets

    try:
        return datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as error:
        raise ValueError(f"Cannot read the split {split!r} ({error}); use e.g. 'test' or 'test[:50%]'.") from error


def _is_saved_dataset(path: str) -> bool:
    """A folder `datasets.Dataset.save_to_disk` wrote (one dataset; a saved `DatasetDict` loads like any folder)."""
    import datasets

    return os.path.isfile(os.path.join(path, datasets.config.DATASET_STATE_JSON_FILENAME)) and not os.path.isfile(
        os.path.join(path, datasets.config.DATASETDICT_JSON_FILENAME)
    )


def _named_split_loader(path: str):
    """A function `name -> datasets.Dataset` reading one whole named split of a folder or Hub dataset."""
    import datasets

    if not _is_saved_dataset(path):
        return lambda name: datasets.load_dataset(path, split=name)
    saved = datasets.load_from_disk(path)
    saved_name = str(saved.split) if saved.split is not None else "train"

    def load(name: str):
        if name != saved_name:
            raise ValueError(
                f"{path!r} is one saved dataset (save_to_disk) whose split is {saved_name!r}; ask for that split "
                f"(e.g. {saved_name!r} or '{saved_name}[:50%]'), not {name!r}."
            )
        return saved

    return load


def _load_split_of(source: str, split: str, shuffle_seed: int | None):
    """`split` of a folder or Hub id: each named split read whole, permuted with `shuffle_seed` if given, sliced.

    The slice syntax is `datasets.ReadInstruction`'s, so `test[:50%]` and `test[50%:]` under one seed are disjoint
    and together the whole shuffled `test` split.
    """
    import datasets

    load_named_split = _named_split_loader(source)
    if shuffle_seed is None and not _is_saved_dataset(source):
        return datasets.load_dataset(source, split=split)  # datasets reads only the slice
    instruction = _split_instruction(split)
    names = list(dict.fromkeys(part.splitname for part in instruction._relative_instructions))
    whole = {name: load_named_split(name) for name in names}
    if shuffle_seed is not None:
        whole = {name: data.shuffle(seed=shuffle_seed) for name, data in whole.items()}
    parts = [
        whole[part.splitname].select(range(part.from_, part.to))
        for part in instruction.to_absolute({name: len(data) for name, data in whole.items()})
    ]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_dataset_split(
    dataset: Any, split: str | None, assets: str | os.PathLike | None = None, shuffle_seed: int | None = None
):
    """Loads one split (with `datasets` slicing, e.g. `"test[50%:]"`) of a zoo, local or Hub dataset.

    The one split loader of the library. A zoo name reads the zoo's folder in the assets folder; a local folder is
    read with `datasets.load_dataset` (imagefolder, parquet, a saved `DatasetDict`) or, when `Dataset.save_to_disk`
    wrote it, `datasets.load_from_disk`; a Hub id with `datasets.load_dataset`. A loaded `datasets.Dataset` is used
    as it is (`split` only names it).

    With `shuffle_seed`, the whole named split is permuted with that seed before the slice is taken (as in
    [`record`]), so that `"test[:50%]"` and `"test[50%:]"` under one seed are disjoint halves of the shuffled split;
    a loaded dataset is permuted as it is.

    Args:
        dataset: A zoo dataset name, a local folder, a Hub dataset id or a `datasets.Dataset`.
        split: The split with optional slicing; required unless `dataset` is a loaded dataset.
        assets: The assets folder for zoo datasets.
        shuffle_seed: Permute each named split with this seed before slicing.

    Returns:
        The `datasets.Dataset`.

    Raises:
        ValueError: No split named, a bad split or seed, or a name that is no zoo dataset, no local folder and no
            Hub dataset that loads (see [`unknown_dataset_error`]).
        TypeError: `dataset` is of another type.
    """
    import datasets

    _check_shuffle_seed(shuffle_seed)
    source = parse_source(dataset, "dataset")
    if source.origin == "object":
        if isinstance(dataset, datasets.DatasetDict):
            raise ValueError(f"Got a DatasetDict with splits {list(dataset)}; pass one split, e.g. dataset['test'].")
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(
                "dataset must be a zoo dataset name, a local folder, a Hub dataset id or a datasets.Dataset, got "
                f"{type(dataset).__name__}."
            )
        return dataset.shuffle(seed=shuffle_seed) if shuffle_seed is not None else dataset
    if split is None:
        raise ValueError(f"Name the split to load from {source.value!r}, e.g. split='test' or 'test[:50%]'.")
    if source.origin == "local" and not os.path.exists(source.value):
        raise _missing_local_error(source.value, "dataset")
    if source.origin == "hub":
        try:
            return _load_split_of(source.value, split, shuffle_seed)
        except (ConnectionError, FileNotFoundError) as error:  # offline, or no such dataset on the Hub
            raise unknown_dataset_error(source.value, error) from error
    return _load_split_of(str(resolve_dataset_source(source.value, assets)), split, shuffle_seed)


def split_name(dataset: Any, split: str | None) -> str | None:
    """The name a loaded split goes by in results: `split` when given, else the dataset's own split name."""
    if split is None and getattr(dataset, "split", None) is not None:
        return str(dataset.split)
    return split


def dataset_name(dataset: Any) -> str:
    """A readable name of a dataset argument for results files."""
    if isinstance(dataset, (str, os.PathLike)):
        return os.fspath(dataset)
    info = getattr(dataset, "info", None)
    return (getattr(info, "dataset_name", None) if info else None) or type(dataset).__name__


__all__ = [
    "Source",
    "dataset_name",
    "load_dataset_split",
    "load_model",
    "load_model_config",
    "parse_source",
    "resolve_dataset_source",
    "split_name",
    "unknown_dataset_error",
    "unknown_model_error",
]
