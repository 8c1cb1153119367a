"""Where the zoo finds its offline assets (pretrained weights, datasets) and where it caches converted models."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ASSETS_ENV = "TINYSAVER_ASSETS"
CACHE_ENV = "TINYSAVER_CACHE"

_ASSETS_HINT = (
    f"Pass `assets=` (CLI: `--assets DIR`) or set {ASSETS_ENV} to the folder that holds `models/` and `datasets/` "
    "(the project's `shared` folder)."
)


def _default_asset_candidates() -> list[Path]:
    # `../shared` as seen from the working directory (the layout CI and the benchmarks use), then the `shared`
    # folder beside the repository checkout this package was imported from (editable installs).
    repo_root = Path(__file__).resolve().parents[3]
    return [Path.cwd().parent / "shared", repo_root.parent / "shared"]


def resolve_assets(assets: str | os.PathLike | None = None) -> Path:
    """Finds the assets folder: the one holding `models/` and `datasets/` with the real weights and images.

    Looked up in order: the `assets` argument, the `TINYSAVER_ASSETS` environment variable, `../shared` relative
    to the current directory, and the `shared` folder beside the repository checkout.

    Args:
        assets: An explicit assets folder; it must exist.

    Returns:
        The absolute path of the assets folder.

    Raises:
        FileNotFoundError: The given folder does not exist, or no default location holds one.

    Example:

    ```python
    >>> from hf_tinysaver.zoo import resolve_assets

    >>> (resolve_assets() / "models").is_dir()
    True
    ```
    """
    for explicit, origin in ((assets, "assets argument"), (os.environ.get(ASSETS_ENV) or None, ASSETS_ENV)):
        if explicit is not None:
            path = Path(explicit).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(
                    f"The assets folder {str(path)!r} (from {origin}) does not exist. {_ASSETS_HINT}"
                )
            return path.resolve()
    candidates = _default_asset_candidates()
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    tried = ", ".join(repr(str(candidate)) for candidate in candidates)
    raise FileNotFoundError(f"No assets folder found (tried {tried}). {_ASSETS_HINT}")


def asset_path(assets: Path, relative: str) -> Path:
    """Returns `assets / relative`, or raises an error naming the missing file and where it was expected.

    Args:
        assets: The assets folder (see [`resolve_assets`]).
        relative: The file's path inside the assets folder, e.g. `"models/cifar10-resnet/resnet20-12fca82f.th"`.

    Returns:
        The path of the existing file or folder.
    """
    path = assets / relative
    if not path.exists():
        raise FileNotFoundError(
            f"Missing asset {Path(relative).name!r}: expected at {str(path)!r}. Copy it there, or point the zoo at "
            f"another assets folder. {_ASSETS_HINT}"
        )
    return path


def cache_root() -> Path:
    """The folder under which the zoo caches converted models: `$TINYSAVER_CACHE/zoo`, default
    `~/.cache/hf_tinysaver/zoo`."""
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_tinysaver"
    return Path(base).expanduser() / "zoo"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["ASSETS_ENV", "CACHE_ENV", "asset_path", "cache_root", "file_sha256", "resolve_assets"]
