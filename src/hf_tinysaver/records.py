"""Per-sample records of a classifier over a `datasets` split, cached on disk, resumable and distributed.

Calibration and evaluation only need each model's logits on each sample. [`record`] runs a model once over a split
and keeps its float32 logits, predictions and labels in a cache keyed by the model's weights and config, the data's
content, the split and the preprocessing, so a second run costs nothing.

The run is written in chunks of a few batches, each written atomically (temporary file, then `os.replace`) with a
checksum: an interrupted run resumes from its last complete chunk, and a damaged chunk is detected and recomputed.
Under `accelerate launch` or `torchrun`, every process takes every `world_size`-th batch of each chunk; the main
process gathers them in batch order and alone writes the cache, so the records are those of a single-process run,
row for row. Every process gets the full records back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .calibration.simulation import CascadeSimulation, check_finite_logits
from .labels import check_label_range, dataset_labels
from .storage import write_file_atomic

logger = logging.getLogger(__name__)

RECORDS_FORMAT_VERSION = 1
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")
# Config keys that change between saves of the same model without changing what it computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset")


def default_cache_dir(kind: str = "records") -> Path:
    """The library's cache folder for `kind`: `$TINYSAVER_CACHE/<kind>` when that variable is set, else
    `~/.cache/hf_tinysaver/<kind>`.

    The one cache root of the library: records use `"records"`, the ESN's cached features `"esn"`.
    """
    root = os.environ.get("TINYSAVER_CACHE")
    return Path(root) / kind if root else Path.home() / ".cache" / "hf_tinysaver" / kind


def _sha256_of_array(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8)).hexdigest()


@contextlib.contextmanager
def _key_lock(cache_root: Path, key: str, model_name: str):
    """Holds an exclusive lock on one records key, so that runs recording the same key at once take turns.

    The second run waits until the first has written the finished records (and removed its chunks), then finds them
    in the cache. The lock is an advisory `fcntl.flock` on `.<key>.lock`, which the OS releases when a run dies and
    which the holder removes when done (a waiter that then holds the lock on a removed file tries again). Where there
    is no `fcntl` (Windows) or the lock file cannot be created (a read-only cache), runs go unprotected.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = cache_root / f".{key}.lock"
    while True:
        try:
            cache_root.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            logger.debug("Recording without a lock in %s: %s", cache_root, error)
            yield
            return
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another run that records %s on the same data (records key %s).", model_name, key)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            break
        os.close(descriptor)  # the previous holder removed this file: lock the one that is there now
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)  # releases the lock


@contextlib.contextmanager
def refreshing(bar, every_seconds: float = 2.0):
    """Redraws a tqdm bar every `every_seconds` from a background thread while the block runs, so that its elapsed
    time moves even while one slow batch (seconds of a large model on a CPU) is in progress."""
    import threading

    if getattr(bar, "disable", True):
        yield bar
        return
    stop = threading.Event()

    def redraw():
        while not stop.wait(every_seconds):
            bar.refresh()

    thread = threading.Thread(target=redraw, name="tinysaver-progress", daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic `.npz` with a checksum over every array, verified by `_load_arrays`."""
    checksum = hashlib.sha256()
    for name in sorted(arrays):
        checksum.update(name.encode())
        checksum.update(_sha256_of_array(arrays[name]).encode())
    payload = {**arrays, "checksum": np.array(checksum.hexdigest())}
    write_file_atomic(path, lambda file: np.savez(file, **payload))


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Loads an `.npz` written by `_save_arrays`; raises `ValueError` when it is truncated or damaged."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as error:  # zipfile, zlib, numpy and OS errors all mean "unreadable"
        raise ValueError(f"{path} is unreadable ({type(error).__name__}: {error}).") from error
    stored = str(arrays.pop("checksum", ""))
    checksum = hashlib.sha256()
    for name in sorted(arrays):
        checksum.update(name.encode())
        checksum.update(_sha256_of_array(arrays[name]).encode())
    if stored != checksum.hexdigest():
        raise ValueError(f"{path} fails its checksum.")
    return arrays


@dataclass
class Records:
    """One model's outputs on every sample of a split.

    Attributes:
        logits: float32 array `(n, num_labels)`, the model's logits in dataset order.
        predictions: int64 array `(n,)`, the argmax of `logits`.
        labels: int64 array `(n,)` of true classes, or None for an unlabelled split.
        model_name: A readable name of the model (its `name_or_path` or class name).
        model_hash: SHA-256 of the model's class, config and weights.
        dataset_fingerprint: Content fingerprint of the split that was run.
        split: The split string (e.g. `"test[:50%]"`), or None when a dataset object was given without one.
        preprocessing: Description of the preprocessing (the processor's `to_dict()` or the given dict).
        cache_key: The key under which these records are cached (None when caching was off).
        shuffle_seed: The seed of the permutation applied to the split before slicing, or None.
    """

    logits: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray | None
    model_name: str
    model_hash: str
    dataset_fingerprint: str
    split: str | None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    cache_key: str | None = None
    shuffle_seed: int | None = None

    def __post_init__(self):
        self.logits = np.asarray(self.logits, dtype=np.float32)
        self.predictions = np.asarray(self.predictions, dtype=np.int64)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.logits.ndim != 2 or len(self.predictions) != len(self.logits):
            raise ValueError(
                f"Records need logits (n, num_labels) and predictions (n,), got {self.logits.shape} and "
                f"{self.predictions.shape}."
            )
        if self.labels is not None and len(self.labels) != len(self.logits):
            raise ValueError(f"Records have {len(self.logits)} rows of logits but {len(self.labels)} labels.")
        # Refused here, so neither a fresh run nor a cached file can pass NaN rows off as class-0 predictions.
        check_finite_logits(self.logits, str(self.model_name), f" of split {self.split!r}" if self.split else "")

    @property
    def n(self) -> int:
        return len(self.logits)

    @property
    def accuracy(self) -> float | None:
        """Top-1 accuracy of the recorded model (None without labels)."""
        return None if self.labels is None else float((self.predictions == self.labels).mean())

    def metadata(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("logits", "predictions", "labels")
        } | {"n": self.n, "format_version": RECORDS_FORMAT_VERSION}

    def save(self, path: str | os.PathLike) -> None:
        """Writes the records atomically to an `.npz` file (arrays plus JSON metadata and a checksum)."""
        arrays = {
            "logits": self.logits,
            "predictions": self.predictions,
            "metadata": np.array(json.dumps(self.metadata(), sort_keys=True)),
        }
        if self.labels is not None:
            arrays["labels"] = self.labels
        _save_arrays(Path(path), arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, expected: dict[str, Any] | None = None) -> Records:
        """Reads records written by [`Records.save`].

        Args:
            path: The `.npz` file.
            expected: Metadata the file must hold, e.g. `{"cache_key": ..., "model_hash": ..., "n": ...}` (any of
                `metadata()`'s keys); checked before the records are used.

        Raises:
            ValueError: When the file is damaged, of another format, or its metadata differs from `expected` (e.g.
                another key's records copied over it).
        """
        arrays = _load_arrays(Path(path))
        metadata = json.loads(str(arrays["metadata"]))
        if metadata.pop("format_version", None) != RECORDS_FORMAT_VERSION:
            raise ValueError(f"{path} was written by another records format; delete it to record again.")
        stored_n = metadata.pop("n", None)
        for name, value in (expected or {}).items():
            stored = stored_n if name == "n" else metadata.get(name)
            if stored != value:
                raise ValueError(f"{path} holds records of another {name} ({stored!r}, expected {value!r}).")
        records = cls(
            logits=arrays["logits"], predictions=arrays["predictions"], labels=arrays.get("labels"), **metadata
        )
        if stored_n != records.n:
            raise ValueError(f"{path} says it holds {stored_n} rows but holds {records.n}.")
        return records


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's class, config (without volatile keys) and every tensor of its state dict."""
    digest = hashlib.sha256()
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config_dict = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """SHA-256 of every file's relative path and content under `folder` (hidden files and folders skipped).

    `datasets.load_dataset(<folder>)` can reuse its own cache after the files changed; keying records on the files'
    content keeps a changed folder from hitting stale records.
    """
    digest = hashlib.sha256()
    root = Path(folder)
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = Path(directory) / name
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            file_digest = hashlib.sha256()
            with open(path, "rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    file_digest.update(block)
            digest.update(file_digest.digest())
    return digest.hexdigest()


def dataset_fingerprint(dataset: Any, image_column: str = "image", label_column: str = "label") -> str:
    """SHA-256 of a loaded split's content (encoded image bytes and labels), not of its path: a rebuilt dataset
    changes it, a moved one does not."""
    digest = hashlib.sha256()
    arrow = dataset.with_format("arrow")
    for batch in arrow.iter(batch_size=10_000):
        images = batch.column(image_column).combine_chunks()
        if hasattr(images, "field") and images.type.num_fields:
            for value in images.field("bytes"):
                digest.update(value.as_buffer() if value.is_valid else b"\0")
        else:
            digest.update(repr(images.to_pylist()).encode())
        digest.update(np.asarray(batch.column(label_column).to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
    digest.update(str(len(dataset)).encode())
    return digest.hexdigest()


def _resolve_dataset(dataset: Any, split: str | None, fingerprint_files: bool = True, shuffle_seed: int | None = None):
    """Returns `(datasets.Dataset, fingerprint, split)` for a zoo name, a local folder, a Hub id or a loaded dataset.

    The split is loaded by [`~hf_tinysaver.sources.load_dataset_split`] (the library's one split loader; with
    `shuffle_seed`, each named split is permuted as a whole before the slice is taken, a loaded dataset as it is).
    The fingerprint is `datasets`' own, combined for a local folder with [`folder_fingerprint`] of its files; with
    `fingerprint_files=False` the files are not hashed (processes other than the main one only need the data, not the
    cache key).
    """
    from .sources import load_dataset_split, resolve_dataset_source

    if isinstance(dataset, (str, os.PathLike)) and split is None:
        raise ValueError(f"Name the split to record from {os.fspath(dataset)!r}, e.g. split='test' or 'test[:50%]'.")
    loaded = load_dataset_split(dataset, split, shuffle_seed=shuffle_seed)
    fingerprint = loaded._fingerprint
    if isinstance(dataset, (str, os.PathLike)):
        folder = resolve_dataset_source(dataset)
        if fingerprint_files and os.path.isdir(folder):
            fingerprint = hashlib.sha256(f"{fingerprint}|{folder_fingerprint(folder)}".encode()).hexdigest()
        return loaded, fingerprint, split
    if split is None and loaded.split is not None:
        split = str(loaded.split)
    return loaded, fingerprint, split


def find_column(dataset, requested: str | None, candidates: Sequence[str], kind: str, required: bool) -> str | None:
    """The name of a dataset's image or label column.

    Args:
        dataset: A `datasets.Dataset`.
        requested: The column the caller named (checked to exist), or None to look for one.
        candidates: Names tried in order (e.g. `IMAGE_COLUMNS`, `LABEL_COLUMNS`).
        kind: `"image"` or `"label"`, for messages; an image column is also found as the only `datasets.Image` one.
        required: Raise when none is found (else return None).

    Raises:
        ValueError: `requested` is not a column, or a required column is not found.
    """
    if requested is not None:
        if requested not in dataset.column_names:
            raise ValueError(f"No {kind} column {requested!r}; the dataset has {dataset.column_names}.")
        return requested
    for name in candidates:
        if name in dataset.column_names:
            return name
    if kind == "image":
        import datasets

        image_columns = [n for n, f in dataset.features.items() if isinstance(f, datasets.Image)]
        if len(image_columns) == 1:
            return image_columns[0]
    if required:
        raise ValueError(
            f"Cannot find the {kind} column among {dataset.column_names}; pass {kind}_column=<name> (looked for "
            f"{list(candidates)})."
        )
    return None


def _describe_preprocessing(processor: Any, preprocessing: dict[str, Any] | None) -> dict[str, Any] | None:
    if preprocessing is not None:
        return preprocessing
    to_dict = getattr(processor, "to_dict", None)
    return to_dict() if callable(to_dict) else None


def distributed_state():
    """The process's `accelerate.PartialState`, set up for CPU-only machines too.

    `PartialState()` only detects a multi-process launch on CPU when created with `cpu=True`; without it, each of
    the processes started by `torchrun` or `accelerate launch` on a machine without accelerators believes it runs
    alone. A state the caller already created (e.g. through `Accelerator()`) is reused as it is, but a state that
    contradicts the launcher's `WORLD_SIZE` is refused rather than letting every process write the cache.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if not PartialState._shared_state:
        has_accelerator = (
            torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
        )
        PartialState(cpu=not has_accelerator or parse_flag_from_env("ACCELERATE_USE_CPU"))
    state = PartialState()
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched_processes:
        raise RuntimeError(
            f"This process was launched as one of {launched_processes} (WORLD_SIZE) but accelerate's state has "
            f"{state.num_processes}. On a machine without GPUs, create the Accelerator with `Accelerator(cpu=True)` "
            "(or call `hf_tinysaver.records.distributed_state()` before creating it)."
        )
    return state


# What PIL (and the processor, for pixels it refuses) raise on a broken or unusable image.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


class UnreadableImageError(ValueError):
    """An image of a dataset row cannot be decoded or prepared; the message names the split, row and column."""


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def prepare_images(
    processor: Callable, dataset, image_column: str, start: int, stop: int, split: str | None = None
) -> Any:
    """Decodes rows `start:stop` of `dataset` and runs `processor` on their images.

    When the batch fails (a truncated or garbage image file, or an image the processor refuses), the rows are tried
    one by one, so the error names the row at fault instead of surfacing a bare PIL traceback.

    Args:
        processor: Called as `processor(images=list_of_images, return_tensors="pt")`.
        dataset: A `datasets.Dataset`.
        image_column: The column holding the images.
        start: First row (in the dataset as loaded, i.e. within the split selection).
        stop: End row (exclusive).
        split: The split's name for the message, e.g. `"test[:50%]"`.

    Returns:
        The processor's output for the batch.

    Raises:
        UnreadableImageError: Naming the split, the row, the column and the reason.
    """
    try:
        return processor(images=list(dataset[start:stop][image_column]), return_tensors="pt")
    except IMAGE_ERRORS as batch_error:
        for row in range(start, stop):
            try:
                processor(images=[dataset[row][image_column]], return_tensors="pt")
            except IMAGE_ERRORS as error:
                place = f"split {split!r}" if split else "the dataset"
                raise UnreadableImageError(
                    f"Cannot read the image in row {row} of {place} (column {image_column!r}): {_one_line(error)}. "
                    "Fix or drop that row (e.g. `dataset.filter(...)` or re-encode the file) and run again."
                ) from error
        raise batch_error


class _Batches(torch.utils.data.Dataset):
    """Batch `b` of the split, preprocessed: what a DataLoader worker returns for one batch index."""

    def __init__(self, dataset, image_column: str, processor: Callable, batch_size: int, split: str | None = None):
        self.dataset, self.image_column, self.processor, self.batch_size = dataset, image_column, processor, batch_size
        self.split = split

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __getitem__(self, batch_index: int) -> tuple[int, torch.Tensor]:
        start = batch_index * self.batch_size
        stop = min(start + self.batch_size, len(self.dataset))
        inputs = prepare_images(self.processor, self.dataset, self.image_column, start, stop, self.split)
        return batch_index, inputs["pixel_values"]


def record(
    model: torch.nn.Module,
    processor: Callable,
    dataset: Any,
    split: str | None = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    preprocessing: dict[str, Any] | None = None,
    model_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    chunk_batches: int = 16,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    shuffle_seed: int | None = None,
    label_map: Any = None,
    id2label: dict | None = None,
) -> Records:
    r"""
    Runs an image classifier over a dataset split and returns its per-sample logits, predictions and labels.

    Results are cached on disk (see [`default_cache_dir`]) under a key made of the model's weights and config, the
    data's content fingerprint, the split and the preprocessing: a second call with the same inputs loads them
    without running the model. An interrupted call resumes from its last complete chunk of `chunk_batches`
    batches. Launched with `accelerate launch` or `torchrun`, the processes share the batches and every process
    returns the same records as a single-process run.

    The labels are stored in the model's label space: a `ClassLabel` column's names are compared with the model's
    `id2label` (the same names in another order are aligned by name, with a warning; other names are an error, see
    [`~hf_tinysaver.labels.align_dataset_labels`]) and a label outside `[0, num_labels)` is an error naming its row.

    Args:
        model (`torch.nn.Module`):
            A classifier whose forward takes `pixel_values` and returns an output with `.logits` (any transformers
            image-classification model). It is put in eval mode.
        processor (`Callable`):
            Called as `processor(images=list_of_PIL_images, return_tensors="pt")["pixel_values"]`, e.g. a
            `TinySaverImageProcessor` or a transformers image processor.
        dataset (`str`, `os.PathLike` or `datasets.Dataset`):
            A local dataset folder or Hub id, loaded with `datasets.load_dataset(dataset, split=split)`, or a
            loaded `datasets.Dataset` (the split selection already applied).
        split (`str`, *optional*):
            The split string, e.g. `"test"` or `"test[:50%]"`. Required for a folder or Hub id; for a loaded dataset
            it only labels the records (defaults to the dataset's own split name).
        batch_size (`int`, *optional*, defaults to 64):
            Images per forward pass (per process).
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where records are cached; defaults to [`default_cache_dir`].
        use_cache (`bool`, *optional*, defaults to `True`):
            `False` runs the model and writes nothing.
        preprocessing (`dict`, *optional*):
            Describes `processor` for the cache key; defaults to `processor.to_dict()`. Required with the cache on
            when the processor has no `to_dict`.
        model_name (`str`, *optional*):
            Readable model name stored in the records; defaults to `model.name_or_path` or the class name.
        image_column (`str`, *optional*):
            Defaults to `image` or `img`, or the only `Image` feature.
        label_column (`str`, *optional*):
            Defaults to `label` or `labels`; without one the records have no labels.
        chunk_batches (`int`, *optional*, defaults to 16):
            Batches per resumable chunk.
        num_workers (`int`, *optional*, defaults to 0):
            DataLoader workers that decode and preprocess images in parallel.
        device (`str` or `torch.device`, *optional*):
            Where the model runs. Defaults to the model's device in a single process and to the process's own
            device (`PartialState().device`) in a distributed run; the model is moved there.
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar (on the main process only).
        shuffle_seed (`int`, *optional*):
            Apply a fixed random permutation (`datasets.Dataset.shuffle(seed=shuffle_seed)`) to the whole named
            split before the slice in `split` is taken, so that `"test[:50%]"` and `"test[50%:]"` under one seed are
            disjoint random halves even of data stored sorted by label. A loaded dataset is permuted as it is. Part
            of the cache key and stored in the records.
        label_map (`dict`, `list` or `str`, *optional*):
            Dataset class -> model class (by index or name; a dict, a list, JSON text or a JSON file) for datasets
            whose class names differ from the model's; see [`~hf_tinysaver.labels.align_dataset_labels`].
        id2label (`dict`, *optional*):
            The label space the labels are checked against and stored in; defaults to `model.config.id2label`. A
            cascade's saver is recorded with the cascade's (the base's) `id2label`.

    Returns:
        [`Records`] in dataset order.

    Example:

    ```python
    >>> import tempfile
    >>> import datasets, numpy as np, torch
    >>> from PIL import Image
    >>> from transformers import TimmWrapperConfig, TimmWrapperForImageClassification
    >>> from hf_tinysaver import TinySaverImageProcessor
    >>> from hf_tinysaver.records import record

    >>> rng = np.random.default_rng(0)
    >>> images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(10)]
    >>> data = datasets.Dataset.from_dict({"image": images, "label": list(range(10))})
    >>> model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_efficientnet", num_labels=10))
    >>> processor = TinySaverImageProcessor(preprocessing={"input_size": [3, 32, 32], "resize": "fixed"})
    >>> with tempfile.TemporaryDirectory() as cache:
    ...     records = record(model, processor, data, split="toy", batch_size=4, cache_dir=cache, progress=False)
    >>> records.logits.shape, records.labels[:3].tolist()
    ((10, 10), [0, 1, 2])
    ```
    """
    if batch_size < 1 or chunk_batches < 1:
        raise ValueError(f"batch_size and chunk_batches must be positive, got {batch_size} and {chunk_batches}.")
    state = distributed_state()
    data, fingerprint, split = _resolve_dataset(
        dataset, split, fingerprint_files=state.is_main_process, shuffle_seed=shuffle_seed
    )
    image_column = find_column(data, image_column, IMAGE_COLUMNS, "image", required=True)
    label_column = find_column(data, label_column, LABEL_COLUMNS, "label", required=False)
    if model_name is None:
        model_name = getattr(model, "name_or_path", None) or type(model).__name__
    if id2label is None:
        id2label = getattr(getattr(model, "config", None), "id2label", None)
    labels, label_translation = None, None
    if label_column is not None:
        labels, label_translation = dataset_labels(
            data,
            label_column,
            id2label,
            label_map,
            where=f"the split {split!r}"
            + (f" (shuffled with seed {shuffle_seed})" if shuffle_seed is not None else ""),
            model_description=str(model_name),
        )
    description = _describe_preprocessing(processor, preprocessing)
    if use_cache and description is None:
        raise ValueError(
            "The processor has no `to_dict()`, so the cache cannot tell its preprocessing apart: pass "
            "`preprocessing=<dict describing it>` or `use_cache=False`."
        )
    if len(data) == 0:
        raise ValueError(f"The split {split!r} is empty.")

    # The key and the cache state are decided on the main process and broadcast, so all processes agree.
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = None
    if state.is_main_process:
        model_hash = model_fingerprint(model)
        key_fields = {
            "format_version": RECORDS_FORMAT_VERSION,
            "model": model_hash,
            "dataset": fingerprint,
            "split": split,
            "preprocessing": description,
            "image_column": image_column,
            "label_column": label_column,
        }
        # Only where they apply, so the keys of records without them stay as they were.
        if shuffle_seed is not None:
            key_fields["shuffle_seed"] = shuffle_seed
        if label_translation is not None:
            key_fields["label_translation"] = label_translation.tolist()
        key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:40]
    else:
        model_hash = None
    # Runs recording the same key at once take turns: the later one waits here, then finds the finished records.
    locked = state.is_main_process and use_cache
    with _key_lock(cache_root, key, str(model_name)) if locked else contextlib.nullcontext():
        return _record_key(
            model=model,
            processor=processor,
            data=data,
            split=split,
            fingerprint=fingerprint,
            description=description,
            image_column=image_column,
            label_column=label_column,
            model_name=str(model_name),
            model_hash=model_hash,
            key=key,
            state=state,
            cache_root=cache_root,
            use_cache=use_cache,
            batch_size=batch_size,
            chunk_batches=chunk_batches,
            num_workers=num_workers,
            device=device,
            progress=progress,
            labels=labels,
            shuffle_seed=shuffle_seed,
            id2label=id2label,
        )


def _record_key(
    *,
    model,
    processor,
    data,
    split,
    fingerprint,
    description,
    image_column,
    label_column,
    model_name,
    model_hash,
    key,
    state,
    cache_root,
    use_cache,
    batch_size,
    chunk_batches,
    num_workers,
    device,
    progress,
    labels,
    shuffle_seed,
    id2label,
) -> Records:
    """The rest of [`record`], with the key chosen (and, on the main process, locked)."""
    from accelerate.utils import broadcast_object_list, gather_object
    from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS

    cached_records, pending = None, None
    if state.is_main_process and use_cache and (cache_root / f"{key}.npz").exists():
        expected = {
            "cache_key": key,
            "model_hash": model_hash,
            "dataset_fingerprint": fingerprint,
            "split": split,
            "preprocessing": json.loads(json.dumps(description, default=str)),
            "n": len(data),
        }
        try:
            cached_records = Records.load(cache_root / f"{key}.npz", expected=expected)
        except ValueError as error:
            logger.warning("Recording again: the cached records are damaged or not this key's (%s).", error)
    key, model_hash, hit = broadcast_object_list([key, model_hash, cached_records is not None])
    if hit:
        cached_records = broadcast_object_list([cached_records])[0]
        _check_records_labels(cached_records, id2label, split)
        return cached_records

    num_batches = math.ceil(len(data) / batch_size)
    chunks = [(start, min(start + chunk_batches, num_batches)) for start in range(0, num_batches, chunk_batches)]
    partial_dir = cache_root / f"{key}.partial"

    def chunk_rows(chunk: tuple[int, int]) -> tuple[int, int]:
        return chunk[0] * batch_size, min(chunk[1] * batch_size, len(data))

    def chunk_path(chunk: tuple[int, int]) -> Path:
        first_row, end_row = chunk_rows(chunk)
        return partial_dir / f"rows-{first_row:010d}-{end_row:010d}.npz"

    def load_chunk(chunk: tuple[int, int]) -> np.ndarray:
        arrays = _load_arrays(chunk_path(chunk))
        if str(arrays.get("key", "")) != key:
            raise ValueError(f"{chunk_path(chunk)} was not recorded for key {key}.")
        logits = arrays["logits"]
        rows = chunk_rows(chunk)[1] - chunk_rows(chunk)[0]
        if logits.dtype != np.float32 or logits.ndim != 2 or len(logits) != rows:
            raise ValueError(f"{chunk_path(chunk)} holds {logits.shape} {logits.dtype}, expected {rows} rows.")
        return logits

    if state.is_main_process:
        pending = []
        for chunk in chunks:
            if not (use_cache and chunk_path(chunk).exists()):
                pending.append(chunk)
                continue
            try:
                load_chunk(chunk)
            except ValueError as error:
                logger.warning("Recomputing a damaged chunk: %s", error)
                chunk_path(chunk).unlink(missing_ok=True)
                pending.append(chunk)
        if len(pending) < len(chunks):
            logger.info(
                "Resuming %s: %d of %d chunks already recorded.", model_name, len(chunks) - len(pending), len(chunks)
            )
    pending = broadcast_object_list([pending])[0]

    if device is None:
        parameter = next(model.parameters(), None)
        device = state.device if state.num_processes > 1 else (parameter.device if parameter is not None else "cpu")
    model.to(device).eval()
    # The images go to the model in its own dtype (a bfloat16 or float64 model gets bfloat16 or float64 pixels).
    parameter_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    loader_batches = _Batches(data, image_column, processor, batch_size, split)
    computed: dict[tuple[int, int], np.ndarray] = {}
    progress_bar = tqdm(
        total=sum(chunk_rows(chunk)[1] - chunk_rows(chunk)[0] for chunk in pending),
        unit="img",
        desc=f"Recording {model_name}",
        disable=not (progress and state.is_main_process),
    )
    # This process's batches: by global batch index, so chunks whose size is not a multiple of the world size balance
    # out. One loader over all of them (workers start once); each chunk takes its own batches from it in order.
    own_batches = {
        chunk: [b for b in range(chunk[0], chunk[1]) if b % state.num_processes == state.process_index]
        for chunk in pending
    }
    loader = iter(
        torch.utils.data.DataLoader(
            torch.utils.data.Subset(loader_batches, [b for chunk in pending for b in own_batches[chunk]]),
            batch_size=None,
            num_workers=num_workers,
        )
    )
    with progress_bar, refreshing(progress_bar), torch.inference_mode():
        for chunk in pending:
            own_logits = {}
            for _ in own_batches[chunk]:
                batch_index, pixel_values = next(loader)
                logits = model(pixel_values=pixel_values.to(device=device, dtype=parameter_dtype)).logits
                own_logits[int(batch_index)] = logits.float().cpu().numpy()
                if state.num_processes == 1:  # every batch, so a long chunk is never a silent stretch
                    progress_bar.update(len(logits))
            gathered = gather_object([own_logits]) if state.num_processes > 1 else [own_logits]
            if state.is_main_process:
                by_batch = {index: logits for part in gathered for index, logits in part.items()}
                chunk_logits = np.concatenate([by_batch[index] for index in range(chunk[0], chunk[1])])
                if use_cache:
                    _save_arrays(chunk_path(chunk), {"logits": chunk_logits, "key": np.array(key)})
                computed[chunk] = chunk_logits
                if state.num_processes > 1:  # other processes' batches are only known here
                    progress_bar.update(len(chunk_logits))

    records, refusal = None, None
    if state.is_main_process:
        logits = np.concatenate([computed[c] if c in computed else load_chunk(c) for c in chunks])
        try:
            records = Records(
                logits=logits,
                predictions=logits.argmax(axis=-1),
                labels=labels,
                model_name=str(model_name),
                model_hash=model_hash,
                dataset_fingerprint=fingerprint,
                split=split,
                preprocessing=json.loads(json.dumps(description, default=str)) if description is not None else {},
                cache_key=key if use_cache else None,
                shuffle_seed=shuffle_seed,
            )
            _check_records_labels(records, id2label, split)
        except ValueError as error:  # e.g. NaN logits: every process raises it, none waits for the records
            records, refusal = None, str(error)
        if use_cache and records is not None:
            records.save(cache_root / f"{key}.npz")
            shutil.rmtree(partial_dir, ignore_errors=True)
    records, refusal = broadcast_object_list([records, refusal])
    if refusal is not None:
        raise ValueError(refusal)
    return records


def _check_records_labels(records: Records, id2label: dict | None, split: str | None) -> None:
    """The range check for models without a config, whose number of classes is only known from their logits."""
    if id2label is None and records.labels is not None:
        check_label_range(records.labels, records.logits.shape[1], f"the split {split!r}")


def pair_from_records(
    saver_records: Records,
    base_records: Records,
    relative_saver_macs: float,
    confidence_metric: str = "max_prob",
    temperature: float = 1.0,
    label_mapping: Sequence[int] | None = None,
) -> CascadeSimulation:
    """Builds the cascade simulation of a saver and a base recorded on the same split.

    Args:
        saver_records: The saver's records.
        base_records: The base's records on the same data and split (preprocessing may differ).
        relative_saver_macs: Saver MACs / base MACs.
        confidence_metric: `"max_prob"`, `"margin"` or `"entropy"`.
        temperature: Divides the saver's logits before the confidence is computed.
        label_mapping: Saver class `i` -> base class `label_mapping[i]`, as in `TinySaverConfig`.

    Returns:
        A [`CascadeSimulation`] whose confidences are `compute_confidence` of the saver's float32 logits, as in the
        deployed cascade.
    """
    if (saver_records.dataset_fingerprint, saver_records.split, saver_records.shuffle_seed) != (
        base_records.dataset_fingerprint,
        base_records.split,
        base_records.shuffle_seed,
    ) or saver_records.n != base_records.n:
        raise ValueError(
            f"The saver was recorded on {saver_records.split!r} (shuffle seed {saver_records.shuffle_seed}, "
            f"{saver_records.n} rows, data {saver_records.dataset_fingerprint[:12]}) but the base on "
            f"{base_records.split!r} (shuffle seed {base_records.shuffle_seed}, {base_records.n} rows, data "
            f"{base_records.dataset_fingerprint[:12]}); record both on the same split."
        )
    labels = base_records.labels if base_records.labels is not None else saver_records.labels
    if saver_records.labels is not None and base_records.labels is not None:
        if not np.array_equal(saver_records.labels, base_records.labels):
            raise ValueError(
                "The saver's and the base's records hold different labels; record both on the same split."
            )
    return CascadeSimulation.from_logits(
        saver_records.logits,
        base_records.predictions,
        labels,
        relative_saver_macs=relative_saver_macs,
        confidence_metric=confidence_metric,
        temperature=temperature,
        label_mapping=label_mapping,
    )


__all__ = [
    "RECORDS_FORMAT_VERSION",
    "Records",
    "UnreadableImageError",
    "dataset_fingerprint",
    "default_cache_dir",
    "distributed_state",
    "find_column",
    "folder_fingerprint",
    "model_fingerprint",
    "pair_from_records",
    "prepare_images",
    "record",
    "refreshing",
]
