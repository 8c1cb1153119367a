"""The data's labels in the model's label space: class names aligned, ranges checked, the split's order inspected.

Every path that reads labels from a dataset ([`record`], and through it `calibrate`, `evaluate`, `search` and the
ESN) goes through [`align_dataset_labels`] and [`dataset_labels`]:

- A `ClassLabel` column's names are compared with the model's `id2label` after light normalisation (case,
  surrounding and repeated whitespace, underscores as spaces). The same names in another order are aligned by name:
  the labels are translated into the model's class ids, and a warning says so once per dataset and model. Names the
  model does not have are an error that names the first classes that differ and says how to pass a mapping.
- Generic names carry no meaning: a `ClassLabel(num_classes=10)` is named `"0"`..`"9"` and a config built from
  `num_labels` alone has `LABEL_0`, `LABEL_1`, ... When either side is generic only the label range is checked.
  So is a plain integer label column.
- `label_map` (`--label-map` on the command line) states the translation where names cannot: dataset class ->
  model class, each given by index or by name. Classes it leaves out are aligned by name as above.
- Labels outside `[0, num_labels)` after translation are an error naming the first such row. A split whose labels
  are all `-1` (the `datasets` convention for "no label", e.g. a Hub test split) is treated as unlabelled.

[`label_order_warnings`] tells when a calibration split cannot stand for deployment: it covers only part of the
model's classes, or its labels come sorted or grouped (a label-sorted dataset's `test[:50%]` and `test[50%:]` hold
different classes; `shuffle_seed` fixes that).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The order statistics that flag a split as sorted or grouped by label: the effect must be large AND far outside
# what a random order of the same labels gives (in standard deviations), so small random splits never trip them.
_MIN_ORDER_EFFECT = 0.5
_MIN_ORDER_SIGMAS = 5.0
_MIN_ROWS_FOR_ORDER = 20

_ALIGNED_BY_NAME: set[int] = set()


def normalize_label_name(name: Any) -> str:
    """Lower case, underscores as spaces, whitespace collapsed: how class names are compared."""
    return " ".join(str(name).replace("_", " ").split()).casefold()


def _is_generic_dataset_names(names: Sequence[str]) -> bool:
    return all(str(name) == str(index) for index, name in enumerate(names))


def _is_generic_model_names(names: Sequence[str]) -> bool:
    return all(str(name) == f"LABEL_{index}" for index, name in enumerate(names))


def _model_names(id2label: Mapping[Any, Any]) -> list[str]:
    labels = {int(key): str(value) for key, value in id2label.items()}
    if sorted(labels) != list(range(len(labels))):
        raise ValueError(f"The model's id2label must have the keys 0..{len(labels) - 1}, got {sorted(labels)[:10]}.")
    return [labels[index] for index in range(len(labels))]


def parse_label_map(label_map: Any) -> dict[Any, Any] | None:
    """Reads a `label_map` given as a dict, a list (dataset class i -> model class `label_map[i]`), JSON text or a
    JSON file; returns a dict (or None when none was given)."""
    if label_map is None:
        return None
    if isinstance(label_map, (str, os.PathLike)):
        text = str(label_map)
        if os.path.isfile(text):
            with open(text) as file:
                text = file.read()
        try:
            label_map = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"The label map {str(label_map)[:80]!r} is neither a JSON file nor JSON text ({error}); give e.g. "
                '\'{"plane": "airplane", "3": 5}\' (dataset class -> model class, by index or name).'
            ) from error
    if isinstance(label_map, Mapping):
        return dict(label_map)
    if isinstance(label_map, Sequence):
        return dict(enumerate(label_map))
    raise ValueError(
        f"label_map must be a dict (dataset class -> model class), a list or JSON, got {type(label_map).__name__}."
    )


def _resolve_class(value: Any, names: Sequence[str] | None, count: int | None, side: str) -> int:
    """A class given by index (int or digit string) or by name, as an index on `side` ("dataset" or "model")."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        index = int(value)
    elif (
        isinstance(value, str)
        and re.fullmatch(r"-?\d+", value.strip())
        and (names is None or normalize_label_name(value) not in {normalize_label_name(n) for n in names})
    ):
        index = int(value)
    elif isinstance(value, str) and names is not None:
        matches = [i for i, name in enumerate(names) if normalize_label_name(name) == normalize_label_name(value)]
        if len(matches) != 1:
            shown = ", ".join(repr(n) for n in list(names)[:5])
            reason = "no" if not matches else f"{len(matches)}"
            raise ValueError(
                f"The label map names the {side} class {value!r}, but the {side} has {reason} class of that name "
                f"({shown}, ...); give the class by name as the {side} spells it, or by index."
            )
        return matches[0]
    else:
        raise ValueError(
            f"The label map's {side} class {value!r} is neither an index nor a class name"
            f"{'' if names is not None else ' (the ' + side + ' has no class names; use indices)'}."
        )
    if count is not None and not 0 <= index < count:
        raise ValueError(f"The label map's {side} class {index} is outside the {side}'s {count} classes.")
    return index


def align_dataset_labels(
    dataset_names: Sequence[str] | None,
    id2label: Mapping[Any, Any],
    label_map: Any = None,
    dataset_description: str = "the dataset",
    model_description: str = "the model",
) -> np.ndarray | None:
    r"""
    Compares a dataset's class names with a model's `id2label` and returns how to translate the dataset's labels.

    Args:
        dataset_names (`Sequence[str]`, *optional*):
            The dataset's `ClassLabel` names (class `i` is `dataset_names[i]`), or None for a plain integer column.
        id2label (`Mapping`):
            The model's `id2label` (for a cascade: the base's, which is the cascade's).
        label_map (*optional*):
            Dataset class -> model class, each by index or by name, as a dict, a list, JSON text or a JSON file
            (see the module docstring). Classes it leaves out are aligned by name.
        dataset_description, model_description (`str`):
            How the error and warning messages name the two sides.

    Returns:
        `None` when the dataset's labels already are the model's class ids, else an int64 array `t` with dataset
        class `i` -> model class `t[i]` (labels `>= len(t)` are left as they are, for the range check).

    Raises:
        ValueError: When a dataset class has no model class of the same name and the map does not place it.

    Example:

    ```python
    >>> from hf_tinysaver.labels import align_dataset_labels

    >>> model = {0: "cat", 1: "dog", 2: "bird"}
    >>> align_dataset_labels(["cat", "dog", "bird"], model) is None
    True
    >>> align_dataset_labels(["Bird", "dog", "cat"], model).tolist()  # aligned by name (and warned once)
    [2, 1, 0]
    >>> align_dataset_labels(["dog", "kitty"], model, label_map={"kitty": "cat"}).tolist()  # by map and name
    [1, 0]
    ```
    """
    model_names = _model_names(id2label)
    num_labels = len(model_names)
    explicit: dict[int, int] = {}
    for key, value in (parse_label_map(label_map) or {}).items():
        source = _resolve_class(
            key, dataset_names, len(dataset_names) if dataset_names is not None else None, "dataset"
        )
        explicit[source] = _resolve_class(value, model_names, num_labels, "model")
    if dataset_names is None:
        if not explicit:
            return None
        translation = np.arange(max(max(explicit) + 1, num_labels), dtype=np.int64)
        for source, target in explicit.items():
            translation[source] = target
        return None if np.array_equal(translation, np.arange(len(translation))) else translation

    generic = _is_generic_dataset_names(dataset_names) or _is_generic_model_names(model_names)
    by_name: dict[str, int | None] = {}
    for index, name in enumerate(model_names):
        key = normalize_label_name(name)
        by_name[key] = None if key in by_name else index  # None: two model classes share the name
    translation = np.arange(len(dataset_names), dtype=np.int64)
    unmatched = []
    for index, name in enumerate(dataset_names):
        key = normalize_label_name(name)
        if index in explicit:
            translation[index] = explicit[index]
        elif generic or (index < num_labels and normalize_label_name(model_names[index]) == key):
            continue
        elif by_name.get(key) is not None:
            translation[index] = by_name[key]
        else:
            unmatched.append(index)
    if unmatched:
        shown = "; ".join(
            f"dataset class {i} {dataset_names[i]!r} vs model class {i} "
            f"{model_names[i] if i < num_labels else '(none)'!r}"
            for i in unmatched[:3]
        )
        first = dataset_names[unmatched[0]]
        raise ValueError(
            f"The class names of {dataset_description} differ from the id2label of {model_description}: "
            f"{len(unmatched)} of its {len(dataset_names)} classes have no model class of that name ({shown}"
            f"{'; ...' if len(unmatched) > 3 else ''}). If the classes are the same under other names, pass a "
            f"mapping from dataset classes to model classes (by index or name): label_map={{{first!r}: "
            f'<model class>, ...}} in Python or --label-map \'{{"{first}": "<model class>", ...}}\' (JSON text or '
            "a JSON file) on the command line; otherwise use a model trained on this dataset's classes."
        )
    if np.array_equal(translation, np.arange(len(translation))):
        return None
    announcement = hash((tuple(map(str, dataset_names)), tuple(model_names), tuple(translation.tolist())))
    if announcement not in _ALIGNED_BY_NAME:
        _ALIGNED_BY_NAME.add(announcement)
        moved = [i for i in range(len(translation)) if translation[i] != i]
        example = moved[0]
        how = "by name" if not explicit else "by the label map and by name"
        warnings.warn(
            f"The classes of {dataset_description} are those of {model_description} in another order: "
            f"{len(moved)} of {len(translation)} classes were aligned {how} into the model's ids (e.g. dataset "
            f"class {example} {dataset_names[example]!r} is model class {translation[example]} "
            f"{model_names[translation[example]]!r}).",
            UserWarning,
            stacklevel=3,
        )
    return translation


def translate_labels(labels: np.ndarray, translation: np.ndarray | None) -> np.ndarray:
    """Applies an [`align_dataset_labels`] translation; labels outside it are left as they are."""
    labels = np.asarray(labels, dtype=np.int64)
    if translation is None:
        return labels
    inside = (labels >= 0) & (labels < len(translation))
    return np.where(inside, translation[np.clip(labels, 0, len(translation) - 1)], labels)


def check_label_range(labels: np.ndarray, num_labels: int, where: str = "the split") -> None:
    """Raises a `ValueError` naming the first row whose label is outside `[0, num_labels)`."""
    labels = np.asarray(labels)
    outside = np.flatnonzero((labels < 0) | (labels >= num_labels))
    if outside.size == 0:
        return
    row, value = int(outside[0]), int(labels[outside[0]])
    hint = (
        "-1 marks an unlabelled row in `datasets`: drop those rows (dataset.filter(lambda row: row['label'] != -1)) "
        "or record a split with no labels at all"
        if value == -1
        else "check that the dataset's classes are the model's, or pass label_map / --label-map (dataset class -> "
        "model class) to translate them"
    )
    raise ValueError(
        f"Row {row} of {where} has label {value}, outside the model's {num_labels} classes [0, {num_labels}) "
        f"({outside.size} of {len(labels)} rows are outside); {hint}."
    )


def dataset_labels(
    dataset: Any,
    label_column: str,
    id2label: Mapping[Any, Any] | None,
    label_map: Any = None,
    where: str = "the split",
    model_description: str = "the model",
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A split's labels in the model's label space, checked.

    Args:
        dataset: A `datasets.Dataset`.
        label_column: Its label column.
        id2label: The model's `id2label`; None when the model has no config (then only `label_map` applies and the
            caller checks the range against the number of logits).
        label_map: See [`align_dataset_labels`].
        where: How messages name the split (e.g. `"the split 'test[:50%]'"`).
        model_description: How messages name the model.

    Returns:
        `(labels, translation)`: int64 labels in the model's ids (None when every label is -1: an unlabelled split)
        and the translation applied (None: none was needed).
    """
    import datasets

    feature = dataset.features.get(label_column)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    raw = np.asarray(dataset[label_column])
    if raw.ndim != 1 or not (np.issubdtype(raw.dtype, np.integer) or raw.size == 0):
        raise ValueError(
            f"The label column {label_column!r} of {where} must hold one integer class per row, got "
            f"{raw.dtype} values of shape {raw.shape}; pass label_column=<name> (--label-column) for another column."
        )
    raw = raw.astype(np.int64)
    if raw.size and (raw == -1).all():
        return None, None
    if id2label is None:
        if label_map is not None:
            raise ValueError(
                f"{model_description} has no config with id2label, so label_map cannot name its classes; give the "
                "model a config (any transformers classifier has one) or translate the labels in the dataset."
            )
        return raw, None
    translation = align_dataset_labels(names, id2label, label_map, where, model_description)
    labels = translate_labels(raw, translation)
    check_label_range(labels, len(id2label), where)
    return labels, translation


def label_order_warnings(labels: np.ndarray, num_labels: int, split: str | None = None) -> list[str]:
    r"""
    Says why a labelled calibration split may not stand for deployment: the messages, one per finding.

    - Coverage: the split holds fewer classes than the model has (the message gives what a random sample of the
      same size over all classes would hold, for comparison).
    - Order: the labels come sorted or grouped. Two statistics, each compared with a random order of the same
      labels: the correlation of label with row index (0 +- 1/sqrt(n) at random, about 1 when sorted), and the
      excess of neighbouring rows with equal labels, `(a - e) / (1 - e)` with `a` the observed fraction and `e`
      its expectation under a random order (0 at random, 1 when every class is one run). Either flags the split
      when it is at least 0.5 and 5 standard deviations away from a random order.

    Args:
        labels: The split's labels (in the model's ids).
        num_labels: The model's number of classes.
        split: The split's name for the messages.

    Returns:
        A list of messages (empty when nothing stands out).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    name = f"The calibration split {split!r}" if split else "The calibration split"
    messages = []
    held = len(np.unique(labels))
    if held < num_labels:
        expected = num_labels * (1 - (1 - 1 / num_labels) ** n)
        # As many classes as a random sample of this size holds: the split is too small, not sorted.
        remedy = (
            f"calibrate on more images (about {math.ceil(3 * num_labels):,} hold nearly every class)"
            if held >= 0.95 * expected
            else "if the dataset is stored sorted by label, pass --shuffle-seed N (shuffle_seed=N) to shuffle the "
            "split before it is sliced"
        )
        messages.append(
            f"{name} holds {held} of the model's {num_labels} classes (a random sample of {n} images spread over "
            f"all {num_labels} would hold about {expected:.0f}): the threshold is chosen on those classes only and "
            f"may not hold on the others. Calibrate on data that covers the classes the cascade will see; {remedy}."
        )
    if n < _MIN_ROWS_FOR_ORDER or held < 2:
        return messages
    findings = []
    positions = np.arange(n, dtype=np.float64)
    values = labels.astype(np.float64)
    correlation = float(np.corrcoef(positions, values)[0, 1]) if values.std() > 0 else 0.0
    if abs(correlation) >= _MIN_ORDER_EFFECT and abs(correlation) * math.sqrt(n - 1) >= _MIN_ORDER_SIGMAS:
        findings.append(f"labels {'rise' if correlation > 0 else 'fall'} with the row (correlation {correlation:.2f})")
    counts = np.bincount(labels - labels.min())
    expected_equal = float((counts * (counts - 1)).sum() / (n * (n - 1)))
    equal = float(np.mean(labels[1:] == labels[:-1]))
    if expected_equal < 1:
        excess = (equal - expected_equal) / (1 - expected_equal)
        sigma = math.sqrt(max(expected_equal * (1 - expected_equal), 1e-12) / (n - 1))
        if excess >= _MIN_ORDER_EFFECT and (equal - expected_equal) / sigma >= _MIN_ORDER_SIGMAS:
            findings.append(
                f"{100 * equal:.0f} % of neighbouring rows share a label, against {100 * expected_equal:.0f} % in a "
                "random order"
            )
    if findings:
        messages.append(
            f"{name} is sorted or grouped by label ({'; '.join(findings)}). A slice of data stored by label (e.g. "
            "'test[:50%]') holds other classes than the rest, so a threshold calibrated on it does not carry over. "
            "Pass --shuffle-seed N (shuffle_seed=N) to apply a fixed random permutation of the whole split before "
            "it is sliced."
        )
    return messages


def warn_label_order(labels: np.ndarray | None, num_labels: int, split: str | None = None) -> list[str]:
    """Issues [`label_order_warnings`] as `UserWarning`s (nothing for an unlabelled split); returns the messages."""
    if labels is None:
        return []
    messages = label_order_warnings(labels, num_labels, split)
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=3)
    return messages


__all__ = [
    "align_dataset_labels",
    "check_label_range",
    "dataset_labels",
    "label_order_warnings",
    "normalize_label_name",
    "parse_label_map",
    "translate_labels",
    "warn_label_order",
]
