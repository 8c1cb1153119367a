"""Publishing cascades on the Hugging Face Hub: weights, processor, remote code, model card and plot in one commit."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from ..models.configuration_tinysaver import TinySaverConfig
from ..storage import EVALUATION_FILE, TRADEOFF_PLOT_FILE
from .model_card import DEFAULT_TAGS, TinySaverModelCardData, generate_model_card

if TYPE_CHECKING:
    from ..models.modeling_tinysaver import TinySaverForImageClassification

CARD_FILE = "README.md"
# Files of a saved folder that are never uploaded: the card is regenerated, the rest is local bookkeeping.
_SKIPPED_NAMES = {CARD_FILE, ".DS_Store"}


class HubPushError(RuntimeError):
    """An upload to the Hub failed for a reason the user can fix (no token, a token without write access, ...)."""


def resolve_token(token: str | None, repo_id: str) -> str:
    """Returns `token`, else the one from `HF_TOKEN` or `hf auth login`; raises [`HubPushError`] when there is none."""
    token = token or get_token()
    if not token:
        raise HubPushError(
            f"No Hugging Face token found to push to {repo_id}: run `hf auth login`, pass `--token` (CLI) or "
            "`token=` (Python), or set the HF_TOKEN environment variable. The token needs write access to the repo."
        )
    return token


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    """The folder's own regular files as `(path in repo, local path)`, decided by name relative to the folder.

    Hidden entries (temporary folders of an interrupted save, `.cache/`, `.git/`) are skipped at every level; links
    are not followed out of the folder: a link that leads outside is refused rather than uploaded.
    """
    root = folder.resolve()
    files = []
    for current, directories, names in os.walk(folder, followlinks=False):
        current = Path(current)
        directories[:] = sorted(name for name in directories if not name.startswith("."))
        for name in [*directories, *names]:
            path = current / name
            if path.is_symlink() and not _inside(path, root):
                raise ValueError(
                    f"{path} is a link to {os.path.realpath(path)}, outside {folder}; push uploads only the folder's "
                    "own files. Copy the file into the folder (e.g. `cp -L`) instead of linking it."
                )
        for name in sorted(names):
            path = current / name
            relative = path.relative_to(folder)
            if name.startswith(".") or (relative.parent == Path(".") and name in _SKIPPED_NAMES):
                continue
            if path.is_file():  # a regular file, or a link to one inside the folder
                files.append((relative.as_posix(), path))
    return files


def _load_cascade_config(folder: Path) -> TinySaverConfig:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: save the cascade first with `cascade.save_pretrained({str(folder)!r})`."
        )
    from transformers import AutoConfig

    # Through AutoConfig so that registered TinySaverConfig subclasses (the ESN's) load as themselves.
    config = AutoConfig.from_pretrained(folder)
    if not isinstance(config, TinySaverConfig):
        raise ValueError(f"{folder} does not hold a TinySaver cascade (config.json has another model_type).")
    return config


def _recorded_plot(folder: Path, recorded: str) -> Path:
    """The plot the calibration record names, as a path inside `folder`; refuses paths that lead outside it."""
    relative = Path(recorded)
    if (
        relative.is_absolute()
        or PureWindowsPath(recorded).is_absolute()
        or PureWindowsPath(recorded).drive
        or ".." in relative.parts
        or ".." in PureWindowsPath(recorded).parts
        or not _inside(folder / relative, folder.resolve())
    ):
        raise ValueError(
            f"The calibration record in {folder / 'config.json'} names the plot {recorded!r}, a path that leads "
            "outside the folder; push uploads only the folder's own files. Put the plot in the folder and name it "
            "there relative to the folder (e.g. 'tradeoff.png'), or pass the file explicitly with `plot=` (`--plot`)."
        )
    return folder / relative


def _find_plot(folder: Path, config: TinySaverConfig, plot: str | os.PathLike | None) -> tuple[str, Path] | None:
    """The plot to upload as `(path in repo, local path)`: `plot` if given (as its file name), else the folder's
    `tradeoff.png` (the fixed name `save_calibrated_cascade` writes it under).

    A cascade saved by an earlier version may still name its plot in the calibration record (`"plot"`); that path is
    honoured (and refused when it leads outside the folder) so such folders push as before.
    """
    if plot is not None:
        plot_path = Path(plot)
        if not plot_path.is_file():
            raise FileNotFoundError(f"Plot {plot_path} does not exist; pass the PNG written by the calibration.")
        return plot_path.name, plot_path
    recorded = (config.calibration or {}).get("plot")
    if not isinstance(recorded, str) or not recorded:
        default = folder / TRADEOFF_PLOT_FILE
        if default.is_file() and _inside(default, folder.resolve()):
            return TRADEOFF_PLOT_FILE, default
        return None
    plot_path = _recorded_plot(folder, recorded)
    if plot_path.is_file():
        return plot_path.relative_to(folder).as_posix(), plot_path
    warnings.warn(
        f"The calibration record names the plot {recorded!r}, but it is not in {folder}; the model card will not "
        "show it. Pass `plot=` (or `--plot`) to upload it.",
        UserWarning,
        stacklevel=3,
    )
    return None


def _read_evaluation(folder: Path) -> dict:
    """The held-out results `tinysaver evaluate --save-to-folder` wrote into the folder, or `{}` when there are none."""
    path = folder / EVALUATION_FILE
    if not path.is_file():
        return {}
    try:
        evaluation = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); rerun `tinysaver evaluate --save-to-folder` or delete the file."
        ) from error
    if not isinstance(evaluation, dict):
        raise ValueError(f"{path} must hold a JSON object (the results of `tinysaver evaluate --save-to-folder`).")
    return evaluation


def network_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions huggingface_hub's HTTP client raises when the Hub cannot be reached (refused connection, DNS
    failure, timeout, broken proxy): the transport errors of `httpx` (or the `httpx2` fork some huggingface_hub
    builds use) and of `requests`, whichever are installed."""
    import importlib

    found: list[type[BaseException]] = []
    for module_name, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found += [getattr(module, name) for name in names if isinstance(getattr(module, name, None), type)]
    return tuple(found)


def _explain_network_error(error: BaseException, repo_id: str) -> HubPushError:
    from huggingface_hub import constants

    return HubPushError(
        f"Cannot reach the Hub at {constants.ENDPOINT} to push to {repo_id} ({type(error).__name__}: {error}). "
        "Check the network connection, proxy settings (HTTPS_PROXY) and HF_ENDPOINT, then run the push again; "
        "nothing was uploaded."
    )


def _explain_http_error(error: HfHubHTTPError, repo_id: str) -> HubPushError:
    status = error.response.status_code if error.response is not None else None
    if status == 403:
        return HubPushError(
            f"The Hub refused the upload to {repo_id} (403 Forbidden): the token lacks write access to that repo. "
            "Use a token with the write role (https://huggingface.co/settings/tokens) that belongs to the repo's "
            "namespace or to a member of its organization, then log in again with `hf auth login`."
        )
    if status == 401 or isinstance(error, RepositoryNotFoundError):
        return HubPushError(
            f"The Hub rejected the token while pushing to {repo_id} (401): it is invalid, expired or cannot see the "
            "repo. Run `hf auth login` with a valid write token, or pass `--token` / set HF_TOKEN."
        )
    return HubPushError(f"Pushing to {repo_id} failed: {error}")


def push_cascade(
    folder_or_model: str | os.PathLike | TinySaverForImageClassification,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    plot: str | os.PathLike | None = None,
    card_only: bool = False,
    card_data: TinySaverModelCardData | None = None,
    tags: list[str] | None = None,
    max_shard_size: int | str | None = "50GB",
) -> CommitInfo:
    r"""
    Uploads a cascade to the Hub in one commit: weights, config, processor, remote-code files, a generated model card
    (`README.md`) and the calibration's trade-off plot. When the folder holds `evaluation.json` (written by
    `tinysaver evaluate --save-to-folder`), the card shows those held-out results and lists them in its `model-index`.

    What is uploaded is decided from the folder's contents by name, relative to the folder: its regular files (hidden
    ones skipped), the generated card and the plot. The repo is created when missing. Files of an earlier push that this one does not carry stay in the repo; files
    whose content did not change are not uploaded again. The model card is regenerated from the cascade's config (a
    `README.md` in the folder is not uploaded).

    Args:
        folder_or_model (`str`, `os.PathLike` or [`TinySaverForImageClassification`]):
            A folder written by `save_pretrained`, or the cascade itself (saved to a temporary folder first).
        repo_id (`str`):
            The repo to push to, `namespace/name`.
        token (`str`, *optional*):
            A token with write access; defaults to `HF_TOKEN` or the token saved by `hf auth login`.
        private (`bool`, *optional*):
            Visibility of the repo if it is created (ignored for existing repos).
        commit_message (`str`, *optional*):
            Defaults to "Upload TinySaver cascade" (or "Update model card" with `card_only`).
        commit_description (`str`, *optional*):
            Longer description of the commit.
        revision (`str`, *optional*):
            An existing branch to commit to; defaults to `main`.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request with the commit instead of committing to the branch.
        plot (`str` or `os.PathLike`, *optional*):
            The trade-off plot (PNG) to upload beside the card, under its file name; by default the file named by
            the calibration record's `plot` entry, a path relative to the folder that must stay inside it.
        card_only (`bool`, *optional*, defaults to `False`):
            Upload only the model card (and the plot), e.g. after editing the calibration record.
        card_data ([`~model_card.TinySaverModelCardData`], *optional*):
            Card data to render instead of the one built from the config.
        tags (`list[str]`, *optional*):
            Extra Hub tags for the card.
        max_shard_size (`int` or `str`, *optional*, defaults to `"50GB"`):
            Passed to `save_pretrained` when a model instance is given.

    Returns:
        `huggingface_hub.CommitInfo`: The commit (a `str` holding its URL; `.oid` is its sha, `.pr_url` the pull
        request's URL with `create_pr`).

    Raises:
        [`HubPushError`]: No token, a token rejected by the Hub, one without write access to `repo_id`, or a Hub
        that cannot be reached (no network, wrong `HF_ENDPOINT` or proxy).
        `FileNotFoundError`: The folder has no `config.json`, or `plot` does not exist.
        `ValueError`: The calibration record names a plot outside the folder (an absolute path, `..`, or a link
        that leads out), or the folder holds a link to a file outside it. Only the folder's own files, by their
        names relative to it, are ever uploaded.

    Example:

    ```python
    >>> from hf_tinysaver.hub.push import push_cascade

    >>> commit = push_cascade("./my-cascade", "me/my-cascade")  # doctest: +SKIP
    >>> commit.oid  # doctest: +SKIP
    '7f1d...'
    ```
    """
    with tempfile.TemporaryDirectory(prefix="tinysaver-push-") as staging:
        if isinstance(folder_or_model, (str, os.PathLike)):
            folder = Path(folder_or_model)
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} is not a folder; pass a folder written by `save_pretrained`.")
            config = _load_cascade_config(folder)
        else:
            folder = Path(staging)
            folder_or_model.save_pretrained(folder, max_shard_size=max_shard_size)
            config = folder_or_model.config
        plot_file = _find_plot(folder, config, plot)
        token = resolve_token(token, repo_id)  # after the local checks, which need no token
        plot_in_repo = plot_file[0] if plot_file is not None else None
        if card_data is None:
            card_data = TinySaverModelCardData.from_config(
                config,
                model_id=repo_id,
                plot_file=plot_in_repo,
                tags=[*DEFAULT_TAGS, *(tags or [])],
                evaluation=_read_evaluation(folder),
            )
        elif plot_in_repo is not None and card_data.plot_file is None:
            card_data.plot_file = plot_in_repo
        card_text = str(generate_model_card(config, card_data=card_data))

        operations = [CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card_text.encode())]
        if not card_only:
            operations += [
                CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(path))
                for path_in_repo, path in _folder_files(folder)
                if path_in_repo != plot_in_repo
            ]
        if plot_file is not None:
            operations.append(CommitOperationAdd(path_in_repo=plot_in_repo, path_or_fileobj=str(plot_file[1])))

        api = HfApi()
        try:
            api.create_repo(repo_id, token=token, private=private, exist_ok=True)
            return api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message or ("Update model card" if card_only else "Upload TinySaver cascade"),
                commit_description=commit_description,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )
        except HfHubHTTPError as error:
            raise _explain_http_error(error, repo_id) from error
        except network_error_types() as error:
            raise _explain_network_error(error, repo_id) from error


__all__ = ["HubPushError", "network_error_types", "push_cascade", "resolve_token"]
