"""Writing files and folders so that an interrupt never leaves a half-written or mixed result.

Everything hf_tinysaver writes goes through this module:

- [`write_file_atomic`], [`write_bytes_atomic`], [`write_text_atomic`], [`write_json_atomic`]: one file, written to a
  fresh temporary name beside it, flushed to disk and renamed over the target. A reader sees the old file or the new
  one, never a part. The file gets the usual permissions (`0o666` less the umask), not the `0o600` of `mkstemp`.
- [`atomic_folder`]: a whole folder (a saved cascade with its calibration files, the demo's output) is written into a
  hidden sibling `.<name>.tmp-<pid>-<hex>` and swapped in when complete. What is atomic:

  * On Linux the swap is one `renameat2(RENAME_EXCHANGE)` call: at every moment the target name holds either the
    complete old folder or the complete new one. The old folder then sits under the temporary name and is deleted.
  * Where that call does not exist (other systems, some file systems) the swap is two renames: the old folder to
    `.<name>.old-<pid>-<hex>`, then the new one to the target name. Between the two the target name is briefly
    absent; the old folder is complete under its `.old-` name, and the next [`check_output_folder`] (called by
    every command that writes a folder, and by [`atomic_folder`]) puts it back when no live process owns it.
  * Leftover temporary siblings of a killed run (`SIGKILL`, power loss) are deleted by the next save to the same
    target once the process that made them is gone. `KeyboardInterrupt` (`SIGINT`) and, while a folder is being
    written from the main thread, `SIGTERM` remove the temporary folder before the process ends.

- [`check_output_folder`]: validates an output folder up front, before minutes of recording: an existing file, a
  place that cannot be written, or an existing folder holding files the library did not write are refused with an
  [`OutputFolderError`] (a `ValueError`) that says what to do.

Example:

```python
>>> import json, os, tempfile
>>> from hf_tinysaver.storage import atomic_folder, write_json_atomic

>>> target = os.path.join(tempfile.mkdtemp(), "cascade")
>>> with atomic_folder(target, kind="cascade") as folder:
...     _ = write_json_atomic(folder / "calibration.json", {"threshold": 0.5})
>>> sorted(os.listdir(target)), json.load(open(os.path.join(target, "calibration.json")))
(['calibration.json'], {'threshold': 0.5})
```
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import io
import json
import os
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The remote-code files `save_pretrained` may copy into a cascade folder: the shipped flat modules of models/.
_REMOTE_CODE_NAMES = sorted(
    path.name for path in (Path(__file__).resolve().parent / "models").glob("*.py") if path.name != "__init__.py"
)
_MODEL_FILE_PATTERNS = (
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    *_REMOTE_CODE_NAMES,
)
# What the library writes into each kind of folder (shell patterns for names at the top level; a trailing "/" names
# a sub-folder of the given kind). An existing folder holding only such names is the library's own output and may be
# replaced without `overwrite`.
# The fixed names of a saved cascade's calibration files: whoever needs one finds it in the folder by this name.
CALIBRATION_FILE = "calibration.json"
TRADEOFF_CSV_FILE = "tradeoff.csv"
TRADEOFF_PLOT_FILE = "tradeoff.png"
# What `tinysaver evaluate --save-to-folder` writes: the cascade's results on held-out data, shown in its model card.
EVALUATION_FILE = "evaluation.json"
KNOWN_FOLDER_FILES: dict[str, tuple[str, ...]] = {
    "cascade": (*_MODEL_FILE_PATTERNS, CALIBRATION_FILE, TRADEOFF_CSV_FILE, TRADEOFF_PLOT_FILE, EVALUATION_FILE),
    "esn": _MODEL_FILE_PATTERNS,
    "demo": ("search.json", "search.csv", "search.png", "demo.json", "cascade/"),
}
_CONFIG_MODEL_TYPES = {"cascade": {"tinysaver"}, "esn": {"tinysaver_esn"}}
_SUBFOLDER_KINDS = {"demo": {"cascade": "cascade"}}


class OutputFolderError(ValueError):
    """An output folder that cannot or must not be written (an existing file, no write access, foreign files)."""


# ----------------------------------------------------------------------------------------------------------- files


def write_file_atomic(path: str | os.PathLike, write: Callable[[io.BufferedWriter], Any], fsync: bool = True) -> Path:
    """Writes a file through `write(binary_file)` to a temporary name beside `path`, then renames it over `path`.

    Args:
        path: The file to write; its parent folders are created.
        write: Called once with the open binary file.
        fsync: Flush the data to disk before the rename (so that a power loss cannot leave an empty file either).

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name opened with `open` (mode 0o666 less the umask), not `mkstemp` (0o600, which would stick).
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            if fsync:
                os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    """Writes `data` to `path` atomically (see [`write_file_atomic`])."""
    return write_file_atomic(path, lambda file: file.write(data), fsync=fsync)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Writes `text` to `path` atomically (see [`write_file_atomic`]); newlines are written as given."""
    return write_bytes_atomic(path, text.encode(encoding), fsync=fsync)


def write_json_atomic(path: str | os.PathLike, data: Any, fsync: bool = True) -> Path:
    """Writes `data` as indented JSON (numpy scalars and arrays, and paths, converted) to `path` atomically."""
    return write_text_atomic(
        path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n", fsync=fsync
    )


def copy_file_atomic(source: str | os.PathLike, path: str | os.PathLike, fsync: bool = True) -> Path:
    """Copies `source` to `path` atomically (see [`write_file_atomic`])."""
    with open(source, "rb") as source_file:
        return write_file_atomic(path, lambda file: shutil.copyfileobj(source_file, file), fsync=fsync)


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------------------------------------- folders


def _matches(name: str, patterns: tuple[str, ...], is_dir: bool) -> str | None:
    for pattern in patterns:
        if pattern.endswith("/"):
            if is_dir and name == pattern[:-1]:
                return pattern
        elif not is_dir and fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


def foreign_files(folder: str | os.PathLike, kind: str) -> list[str]:
    """Lists (relative, sorted) what in `folder` the library does not write for a folder of this `kind`.

    Hidden temporary siblings are not inside the folder and so not listed. A `config.json` of another model type
    counts as foreign: a folder is the library's own only when its config is a TinySaver one of that kind.

    Args:
        folder: An existing folder.
        kind: A key of `KNOWN_FOLDER_FILES` (`"cascade"`, `"esn"`, `"demo"`).
    """
    if kind not in KNOWN_FOLDER_FILES:
        raise ValueError(f"Unknown folder kind {kind!r}; choose one of {sorted(KNOWN_FOLDER_FILES)}.")
    folder = Path(folder)
    foreign = []
    for entry in sorted(folder.iterdir()):
        is_dir = entry.is_dir() and not entry.is_symlink()
        pattern = _matches(entry.name, KNOWN_FOLDER_FILES[kind], is_dir)
        if pattern is None or (entry.is_symlink()):
            foreign.append(entry.name + ("/" if is_dir else ""))
        elif is_dir:
            foreign += [f"{entry.name}/{name}" for name in foreign_files(entry, _SUBFOLDER_KINDS[kind][entry.name])]
        elif entry.name == "config.json" and kind in _CONFIG_MODEL_TYPES:
            try:
                model_type = json.loads(entry.read_text()).get("model_type")
            except (OSError, ValueError, AttributeError):
                model_type = None
            if model_type not in _CONFIG_MODEL_TYPES[kind]:
                foreign.append(f"{entry.name} (model_type {model_type!r})")
    return foreign


def _owner_alive(name: str) -> bool:
    """Whether the process whose id is embedded in a temporary sibling's name (`...-<pid>-<hex>`) still runs."""
    try:
        pid = int(name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(target: Path, marker: str) -> list[Path]:
    prefix = f".{target.name}.{marker}-"
    if not target.parent.is_dir():
        return []
    return sorted(path for path in target.parent.iterdir() if path.name.startswith(prefix) and path.is_dir())


def recover_output_folder(target: str | os.PathLike) -> None:
    """Repairs what an interrupted [`atomic_folder`] swap left beside `target`, when no live process owns it.

    Puts a complete old folder back when a two-rename swap was cut between its renames (the target name is absent and
    a `.<name>.old-*` sibling holds the old folder), and deletes leftover `.<name>.tmp-*`, `.<name>.old-*` and
    `.<name>.probe-*` siblings.
    """
    target = Path(target)
    for old in _siblings(target, "old"):
        if _owner_alive(old.name):
            continue
        if not os.path.lexists(target):
            with contextlib.suppress(OSError):  # another process may be recovering it at the same time
                os.rename(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for marker in ("tmp", "probe"):
        for temporary in _siblings(target, marker):
            if not _owner_alive(temporary.name):
                shutil.rmtree(temporary, ignore_errors=True)


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_output_folder(
    path: str | os.PathLike, overwrite: bool = False, kind: str = "cascade", option: str = "--out"
) -> Path:
    r"""
    Checks, before any work, that a folder can be written at `path` by [`atomic_folder`].

    The rules:

    - `path` must not be an existing file (or a link to one).
    - The folder must be creatable: its nearest existing ancestor must be a folder in which a sub-folder can be made
      (tested by making and removing one, so read-only file systems and `/proc` count as unwritable, also for root).
    - An existing non-empty folder is replaced only when `overwrite` is set or when everything in it is what the
      library writes for that `kind` (see `KNOWN_FOLDER_FILES`; e.g. an earlier `tinysaver calibrate` output, with a
      TinySaver `config.json`). Anything else (a file the library did not write, a `config.json` of another model) is
      refused, naming the files, so that nobody's data is deleted by accident.

    It also repairs what an interrupted earlier save left beside `path` (see [`recover_output_folder`]).

    Args:
        path (`str` or `os.PathLike`):
            The output folder.
        overwrite (`bool`, *optional*, defaults to `False`):
            Allow replacing an existing folder whatever it holds (as a whole: nothing old stays).
        kind (`str`, *optional*, defaults to `"cascade"`):
            `"cascade"`, `"esn"` or `"demo"`: which files count as the library's own.
        option (`str`, *optional*, defaults to `"--out"`):
            How the caller names the path in messages.

    Returns:
        `path` as a `Path`.

    Raises:
        [`OutputFolderError`]: The folder cannot or must not be written; the message says what to do.

    Example:

    ```python
    >>> import os, tempfile
    >>> from hf_tinysaver.storage import check_output_folder

    >>> folder = tempfile.mkdtemp()
    >>> _ = open(os.path.join(folder, "notes.txt"), "w").write("mine")
    >>> try:
    ...     check_output_folder(folder)
    ... except ValueError as error:
    ...     print("--overwrite" in str(error))
    True
    >>> check_output_folder(folder, overwrite=True) == __import__("pathlib").Path(folder)
    True
    ```
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        path = Path(os.path.abspath(path))
    flag = "--overwrite" if option.startswith("--") else "overwrite=True (CLI: --overwrite)"
    recover_output_folder(path)
    if os.path.lexists(path) and not path.is_dir():
        raise OutputFolderError(
            f"{option} {str(path)!r} is an existing file, not a folder; choose a folder path that is new or holds an "
            "earlier output."
        )
    if path.is_symlink():
        raise OutputFolderError(
            f"{option} {str(path)!r} is a symbolic link; pass the folder it points to, or a new folder path."
        )
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise OutputFolderError(
            f"{option} {str(path)!r} cannot be created: {str(ancestor)!r} is a file, not a folder. Choose another "
            "path."
        )
    probe = ancestor / f".{path.name}.probe-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        os.mkdir(probe)
    except OSError as error:
        raise OutputFolderError(
            f"{option} {str(path)!r} cannot be written: making a folder in {str(ancestor)!r} fails "
            f"({error.strerror or error}). Choose a writable place."
        ) from error
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(probe)
    if path.is_dir() and not overwrite:
        foreign = foreign_files(path, kind)
        if foreign:
            shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
            raise OutputFolderError(
                f"{option} {str(path)!r} already holds files that hf_tinysaver did not write ({shown}). Choose a new "
                f"folder, or pass {flag} to replace the whole folder (everything in it is deleted)."
            )
    return path


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two paths in one step with Linux `renameat2(RENAME_EXCHANGE)`; `False` where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"Cannot swap {second} for {first}: {os.strerror(code)}")


def current_umask() -> int:
    """The process's umask (read from `/proc` on Linux, else by setting and restoring it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish_tree(folder: Path) -> None:
    """Gives every file and folder the usual mode (`0o666` / `0o777` less the umask: `save_pretrained` writes its
    weights with the `0o600` of a temporary file) and flushes everything to disk."""
    mask = current_umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            os.chmod(path, (0o777 if os.stat(path).st_mode & 0o111 else 0o666) & ~mask)
            with open(path, "rb") as file:
                os.fsync(file.fileno())
        descriptor = os.open(root, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _swap_in(temporary: Path, target: Path) -> None:
    if not os.path.lexists(target):
        try:
            os.rename(temporary, target)
            return
        except OSError as error:  # created meanwhile by someone else: swap with it below
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if _exchange(temporary, target):
        shutil.rmtree(temporary, ignore_errors=True)  # now the old folder
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex}")
    os.rename(target, old)
    os.rename(temporary, target)
    shutil.rmtree(old, ignore_errors=True)


class _TerminateAsInterrupt:
    """While active (main thread only), turns SIGTERM into `SystemExit(143)` so `finally` blocks clean up."""

    def __enter__(self):
        self.previous = None
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        ):
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    def __exit__(self, *exc_info):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


@contextlib.contextmanager
def atomic_folder(
    target: str | os.PathLike, overwrite: bool = False, kind: str = "cascade", option: str = "--out"
) -> Iterator[Path]:
    r"""
    Yields an empty temporary folder beside `target`; when the block completes, swaps it in as `target` as a whole.

    The temporary folder is a hidden sibling (`.<name>.tmp-<pid>-<hex>`, same file system, so the swap is a rename).
    On success an existing `target` is replaced as a whole: nothing of the old folder (stale weight shards,
    `*.index.json`, `pytorch_model.bin`) stays. On an exception, `KeyboardInterrupt` or `SIGTERM` the temporary
    folder is removed and `target` is untouched. See the module docstring for what is atomic where.

    Args:
        target (`str` or `os.PathLike`):
            The folder to write.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace an existing folder even when it holds files the library did not write.
        kind (`str`, *optional*, defaults to `"cascade"`):
            `"cascade"`, `"esn"` or `"demo"`; decides which existing files count as the library's own.
        option (`str`, *optional*, defaults to `"--out"`):
            How messages name the target.

    Raises:
        [`OutputFolderError`]: From [`check_output_folder`], before anything is written.
    """
    target = check_output_folder(target, overwrite=overwrite, kind=kind, option=option)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
    with _TerminateAsInterrupt():
        try:
            os.mkdir(temporary)  # 0o777 less the umask, like any folder; inside `try` for an interrupt right after
            yield temporary
            # Checked again: the folder may have changed during the (long) work in the block.
            check_output_folder(target, overwrite=overwrite, kind=kind, option=option)
            _finish_tree(temporary)
            _swap_in(temporary, target)
        finally:
            if temporary.exists():
                shutil.rmtree(temporary, ignore_errors=True)


__all__ = [
    "CALIBRATION_FILE",
    "EVALUATION_FILE",
    "KNOWN_FOLDER_FILES",
    "OutputFolderError",
    "TRADEOFF_CSV_FILE",
    "TRADEOFF_PLOT_FILE",
    "atomic_folder",
    "check_output_folder",
    "copy_file_atomic",
    "current_umask",
    "foreign_files",
    "recover_output_folder",
    "write_bytes_atomic",
    "write_file_atomic",
    "write_json_atomic",
    "write_text_atomic",
]
