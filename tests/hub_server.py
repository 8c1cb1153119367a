"""A local server that speaks the Hugging Face Hub's HTTP API, so that uploads can be tested without internet.

The real `huggingface_hub` client (and transformers through it) talks to it through `HF_ENDPOINT`, exactly as it talks
to huggingface.co: create repo, repo info, validate-yaml, preupload, the ndjson commit endpoint, the Git LFS batch API
with the upload itself going to a separate "storage" origin (like the Hub's signed S3 URLs), file resolution with the
headers the client caches on, tree listing, paths-info, refs and commit history. Every commit gets a new sha, `main`
follows the latest one, and older commits stay resolvable. What it receives is kept (metadata in memory, file contents
on disk) so that a test can compare uploaded bytes with the local files.

Not covered: the Xet storage protocol (the client falls back to LFS when `HF_HUB_DISABLE_XET` is set, which
[`HubClientEnvironment`] does), gitignore rules, tags and branches other than `main` and pull-request refs, discussions,
and pagination (listings come in one page).
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import hmac
import http.server
import json
import mimetypes
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

DEFAULT_USER = "tester"
DEFAULT_TOKEN = "hf_tinysaver_fake_hub_write_token"

# The `.gitattributes` the Hub writes into every new model repo: matching files must be stored with Git LFS.
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
    "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz",
    "*.zip", "*.zst", "*tfevents*",
)  # fmt: skip
# Files above this size must go through LFS even when they are text (the Hub's limit for plain git blobs).
REGULAR_FILE_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 2 * 1024**3

_REPO_TYPE_BY_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX_BY_REPO_TYPE = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_YAML_BLOCK_PATTERN = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
_LFS_POINTER_TEMPLATE = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
_MAX_HEADER_LINE = 4096


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def needs_lfs(path: str, size: int, sample: bytes) -> bool:
    """Whether the Hub stores a file with Git LFS: `.gitattributes` pattern, over 10 MiB, or binary (a NUL byte in
    its first 512 bytes, git's own test)."""
    name = path.rsplit("/", 1)[-1]
    matches_pattern = any(fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(name, pattern) for pattern in LFS_PATTERNS)
    return matches_pattern or size > REGULAR_FILE_MAX_BYTES or b"\0" in sample[:512]


@dataclass(frozen=True)
class RepoEntry:
    """One file of one commit."""

    path: str
    size: int
    git_oid: str
    lfs_sha256: str | None = None

    @property
    def is_lfs(self) -> bool:
        return self.lfs_sha256 is not None

    @property
    def pointer(self) -> bytes:
        return _LFS_POINTER_TEMPLATE.format(oid=self.lfs_sha256, size=self.size).encode()

    def to_tree_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size, "path": self.path}
        if self.is_lfs:
            entry["lfs"] = {"oid": self.lfs_sha256, "size": self.size, "pointerSize": len(self.pointer)}
        return entry


@dataclass(frozen=True)
class Commit:
    """A commit as the fake Hub keeps it: the full file listing, and the operations received, in order.

    `operations` lists `(key, path)` pairs with the ndjson keys the client sent (`"file"` for content inlined in the
    commit, `"lfsFile"` for a reference to an object uploaded through the LFS batch API, `"deletedFile"`, ...).
    """

    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: MappingProxyType
    operations: tuple[tuple[str, str], ...] = ()


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    num_pull_requests: int = 0

    def find_commit(self, revision: str) -> Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if f"refs/heads/{revision}" in self.refs:
            return self.commits[self.refs[f"refs/heads/{revision}"]]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [oid for oid in self.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return self.commits[matches[0]]
        return None

    def history(self, revision: str = "main") -> list[Commit]:
        commit = self.find_commit(revision)
        history = []
        while commit is not None and len(history) <= len(self.commits):
            history.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return history


@dataclass(frozen=True)
class RequestRecord:
    """One request the fake Hub answered: `server` is `"hub"` or `"storage"` (the LFS object store)."""

    server: str
    method: str
    path: str
    status: int


class HubError(Exception):
    """An error answered to the client the way the Hub does: status, JSON `{"error": ...}` and `X-Error-*` headers."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})

    def to_response(self) -> _Response:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.error_code:
            headers["X-Error-Code"] = self.error_code
        return _Response.json(self.status, {"error": self.message}, headers)


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict | None = None, content_type: str = "application/json"):
        return cls(status, json.dumps(payload).encode(), {"Content-Type": content_type, **(headers or {})})


class FakeHub:
    """A Hugging Face Hub stand-in on 127.0.0.1 for tests and offline examples, driven by the real client.

    Two HTTP servers run in background threads: the Hub API (`endpoint`) and an object store for LFS contents
    (`storage_endpoint`, a different origin, so the client handles it like the Hub's CDN and S3 URLs: no token is sent
    there, uploads and downloads use signed URLs).

    Args:
        storage_dir (`str` or `os.PathLike`):
            Folder where received file contents are written.
        tokens (`dict[str, str]`, *optional*):
            Valid access tokens and the user each one belongs to. Defaults to `{DEFAULT_TOKEN: DEFAULT_USER}`. A user
            may write to repos of its own namespace only.
        refuse_uploads (`bool`, *optional*, defaults to `False`):
            Answer every write with 403, as the Hub does for a read-only token. Can be changed while running.
        max_request_bytes (`int`, *optional*):
            Larger request bodies are refused with 413.

    Example:

    ```python
    >>> import tempfile
    >>> from huggingface_hub import HfApi
    >>> from hub_server import DEFAULT_TOKEN, FakeHub

    >>> with tempfile.TemporaryDirectory() as tmp, FakeHub(f"{tmp}/hub") as hub:
    ...     with hub.client_environment(f"{tmp}/hf_home", token=DEFAULT_TOKEN):
    ...         api = HfApi()
    ...         _ = api.create_repo("tester/demo")
    ...         _ = api.upload_file(path_or_fileobj=b"hello", path_in_repo="hello.txt", repo_id="tester/demo")
    ...     hub.file_bytes("tester/demo", "hello.txt")
    b'hello'
    ```
    """

    def __init__(
        self,
        storage_dir: str | os.PathLike,
        *,
        tokens: dict[str, str] | None = None,
        refuse_uploads: bool = False,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ):
        self.storage_dir = Path(storage_dir)
        self.tokens = dict(tokens) if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USER}
        self.refuse_uploads = refuse_uploads
        self.max_request_bytes = max_request_bytes
        self.requests: list[RequestRecord] = []
        self.lfs_uploads: list[str] = []
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lfs_sizes: dict[str, int] = {}
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(32)
        self._commit_salt = secrets.token_hex(8)
        self._servers: dict[str, _Server] = {}
        self._threads: list[threading.Thread] = []

    # ----------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> FakeHub:
        """Binds both servers to free ports on 127.0.0.1 and serves them in daemon threads."""
        if self._servers:
            return self
        (self.storage_dir / "objects" / "git").mkdir(parents=True, exist_ok=True)
        (self.storage_dir / "objects" / "lfs").mkdir(parents=True, exist_ok=True)
        for role in ("hub", "storage"):
            server = _Server(("127.0.0.1", 0), _Handler, hub=self, role=role)
            thread = threading.Thread(target=server.serve_forever, name=f"fake-hub-{role}", daemon=True)
            self._servers[role] = server
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> None:
        """Stops both servers and closes the connections the client keeps alive."""
        for server in self._servers.values():
            server.shutdown()
            server.close_live_connections()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """The URL to use as `HF_ENDPOINT`."""
        return self._url("hub")

    @property
    def storage_endpoint(self) -> str:
        """The URL of the LFS object store (a different origin than `endpoint`)."""
        return self._url("storage")

    def _url(self, role: str) -> str:
        if role not in self._servers:
            raise RuntimeError("The fake Hub is not running: call `start()` or use it as a context manager.")
        host, port = self._servers[role].server_address[:2]
        return f"http://{host}:{port}"

    def client_environment(
        self, hf_home: str | os.PathLike, token: str | None = DEFAULT_TOKEN
    ) -> HubClientEnvironment:
        """Points huggingface_hub and transformers in this process at this server; see [`HubClientEnvironment`]."""
        return HubClientEnvironment(self.endpoint, hf_home, token=token)

    # -------------------------------------------------------------------------------------------- inspection

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self._lock:
            if (repo_type, repo_id) not in self._repos:
                raise KeyError(f"No {repo_type} repo {repo_id!r} on the fake Hub; it has {sorted(self._repos)}.")
            return self._repos[(repo_type, repo_id)]

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """The history of `revision`, newest first."""
        with self._lock:
            return self.repo(repo_id, repo_type).history(revision)

    def file_bytes(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        """The content of a file as stored at `revision` (a branch, `refs/pr/N` or a commit sha)."""
        with self._lock:
            commit = self.repo(repo_id, repo_type).find_commit(revision)
            if commit is None or path not in commit.files:
                raise KeyError(f"{path!r} is not in {repo_id}@{revision}.")
            return self._read_entry(commit.files[path])

    # ------------------------------------------------------------------------------------------------ storage

    def _git_object_path(self, oid: str) -> Path:
        return self.storage_dir / "objects" / "git" / oid

    def _lfs_object_path(self, sha256: str) -> Path:
        return self.storage_dir / "objects" / "lfs" / sha256

    @staticmethod
    def _write_atomic(path: Path, content: bytes) -> None:
        if path.exists():
            return
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".incoming-", delete=False) as tmp:
            tmp.write(content)
        os.replace(tmp.name, path)

    def _read_entry(self, entry: RepoEntry) -> bytes:
        if entry.is_lfs:
            return self._lfs_object_path(entry.lfs_sha256).read_bytes()
        return self._git_object_path(entry.git_oid).read_bytes()

    def _store_regular(self, path: str, content: bytes) -> RepoEntry:
        oid = _git_blob_oid(content)
        self._write_atomic(self._git_object_path(oid), content)
        return RepoEntry(path=path, size=len(content), git_oid=oid)

    def _lfs_entry(self, path: str, sha256: str) -> RepoEntry:
        size = self._lfs_sizes[sha256]
        pointer = _LFS_POINTER_TEMPLATE.format(oid=sha256, size=size).encode()
        return RepoEntry(path=path, size=size, git_oid=_git_blob_oid(pointer), lfs_sha256=sha256)

    def _sign(self, action: str, oid: str, size: int) -> str:
        return hmac.new(self._secret, f"{action}:{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    def _check_signature(self, query: dict[str, list[str]], action: str, oid: str) -> int:
        try:
            size = int(query["size"][0])
            signature = query["signature"][0]
        except (KeyError, ValueError, IndexError):
            raise HubError(403, "Missing or malformed signature in the storage URL.") from None
        if not hmac.compare_digest(signature, self._sign(action, oid, size)):
            raise HubError(403, "The signature of this storage URL does not match.")
        return size

    # ------------------------------------------------------------------------------------------ auth helpers

    def _user(self, headers) -> str | None:
        authorization = headers.get("Authorization")
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _require_writer(self, headers, namespace: str, what: str) -> str:
        user = self._user(headers)
        if user is None:
            raise HubError(401, f"You must be authenticated to {what}: send a token with the write role.")
        if self.refuse_uploads:
            raise HubError(403, f"You don't have write access to {what}: this token is read-only.")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to write in the namespace {namespace!r} (user {user!r}).")
        return user

    def _readable_repo(self, headers, repo_type: str, repo_id: str) -> Repo:
        user = self._user(headers)
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and repo_id.split("/")[0] != user):
            raise HubError(404, f"Repository Not Found for url: {repo_type} {repo_id}.", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.find_commit(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------------------------------------ routing

    def handle(self, role: str, method: str, segments: list[str], query: dict, headers, body: bytes) -> _Response:
        with self._lock:
            if role == "storage":
                return self._handle_storage(method, segments, query, headers, body)
            return self._handle_hub(method, segments, query, headers, body)

    def _handle_hub(self, method: str, segments: list[str], query: dict, headers, body: bytes) -> _Response:
        if segments[:1] == ["api"]:
            rest = segments[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami(headers)
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo(headers, _json_body(body))
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml(_json_body(body))
            if len(rest) >= 3 and rest[0] in _REPO_TYPE_BY_PLURAL:
                repo_type, repo_id, action = _REPO_TYPE_BY_PLURAL[rest[0]], f"{rest[1]}/{rest[2]}", rest[3:]
                return self._repo_api(method, repo_type, repo_id, action, query, headers, body)
        repo_type, segments = _strip_repo_type_prefix(segments)
        if len(segments) == 6 and segments[1].endswith(".git") and segments[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{segments[0]}/{segments[1][: -len('.git')]}"
            if segments[5] == "batch" and method == "POST":
                return self._lfs_batch(headers, repo_type, repo_id, _json_body(body))
            if segments[5] == "verify" and method == "POST":
                return self._lfs_verify(headers, repo_type, repo_id, _json_body(body))
        if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id, revision, path = f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:])
            return self._resolve(headers, repo_type, repo_id, revision, path)
        raise HubError(404, f"Sorry, the fake Hub does not serve {method} /{'/'.join(segments)}.")

    def _repo_api(self, method, repo_type, repo_id, action, query, headers, body) -> _Response:
        if method == "GET" and action == []:
            return self._repo_info(headers, repo_type, repo_id, "main", query)
        if method == "GET" and len(action) == 2 and action[0] == "revision":
            return self._repo_info(headers, repo_type, repo_id, action[1], query)
        if method == "GET" and len(action) >= 2 and action[0] == "tree":
            return self._tree(headers, repo_type, repo_id, action[1], "/".join(action[2:]), query)
        if method == "POST" and len(action) == 2 and action[0] == "paths-info":
            return self._paths_info(headers, repo_type, repo_id, action[1], parse_qs(body.decode()))
        if method == "GET" and action == ["refs"]:
            return self._refs(headers, repo_type, repo_id)
        if method == "GET" and len(action) == 2 and action[0] == "commits":
            return self._commit_history(headers, repo_type, repo_id, action[1])
        if method == "POST" and len(action) == 2 and action[0] == "preupload":
            return self._preupload(headers, repo_type, repo_id, action[1], _json_body(body))
        if method == "POST" and len(action) == 2 and action[0] == "commit":
            return self._commit(headers, repo_type, repo_id, action[1], query, body)
        raise HubError(404, f"Sorry, the fake Hub does not serve {method} {'/'.join(action)} on a repo.")

    # ---------------------------------------------------------------------------------------------- endpoints

    def _whoami(self, headers) -> _Response:
        user = self._user(headers)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        role = "read" if self.refuse_uploads else "write"
        access_token = {"displayName": "fake-hub", "role": role}
        return _Response.json(
            200, {"type": "user", "name": user, "fullname": user, "orgs": [], "auth": {"accessToken": access_token}}
        )

    def _create_repo(self, headers, payload: dict) -> _Response:
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX_BY_REPO_TYPE:
            raise HubError(400, f"Invalid repo type {repo_type!r}.")
        user = self._user(headers)
        namespace = payload.get("organization") or user
        name = payload.get("name") or ""
        if namespace is None:
            raise HubError(401, "You must be authenticated to create a repo: send a token with the write role.")
        if not _REPO_NAME_PATTERN.match(name) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name {name!r}: use letters, digits, '-', '_' and '.'.")
        repo_id = f"{namespace}/{name}"
        self._require_writer(headers, namespace, f"create {repo_id}")
        url = f"{self.endpoint}/{_URL_PREFIX_BY_REPO_TYPE[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self._repos:
            return _Response.json(409, {"error": f"You already created this {repo_type} repo", "url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
        attributes = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS)
        entry = self._store_regular(".gitattributes", attributes.encode())
        self._add_commit(repo, "main", "initial commit", "", namespace, {entry.path: entry}, (("file", entry.path),))
        self._repos[(repo_type, repo_id)] = repo
        return _Response.json(200, {"url": url, "name": repo_id, "id": secrets.token_hex(12)})

    def _validate_yaml(self, payload: dict) -> _Response:
        content = payload.get("content")
        if not isinstance(content, str):
            raise HubError(400, "validate-yaml expects a string `content`.")
        match = _YAML_BLOCK_PATTERN.search(content)
        if match is None:
            return _Response.json(200, {"errors": [], "warnings": [{"message": "Empty or missing yaml metadata"}]})
        try:
            metadata = yaml.safe_load(match.group(2))
        except yaml.YAMLError as error:
            return _Response.json(400, {"errors": [{"message": f"Invalid YAML in the metadata block: {error}"}]})
        errors = [{"message": message} for message in validate_model_card_metadata(metadata)]
        return _Response.json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _repo_info(self, headers, repo_type, repo_id, revision, query) -> _Response:
        repo = self._readable_repo(headers, repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        with_blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for entry in sorted(commit.files.values(), key=lambda entry: entry.path):
            sibling: dict[str, Any] = {"rfilename": entry.path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.is_lfs:
                    sibling["lfs"] = {
                        "size": entry.size,
                        "sha256": entry.lfs_sha256,
                        "pointerSize": len(entry.pointer),
                    }
            siblings.append(sibling)
        card_data = self._card_metadata(commit)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(card_data.get("tags") or []),
            "siblings": siblings,
            "usedStorage": sum(entry.size for entry in commit.files.values()),
        }
        if card_data:
            info["cardData"] = card_data
        if repo_type == "model":
            info["modelId"] = repo_id
            info["library_name"] = card_data.get("library_name")
            info["pipeline_tag"] = card_data.get("pipeline_tag")
            config = self._json_file(commit, "config.json")
            if isinstance(config, dict):
                keys = ("architectures", "model_type", "auto_map")
                info["config"] = {key: config[key] for key in keys if key in config}
        return _Response.json(200, info)

    def _card_metadata(self, commit: Commit) -> dict[str, Any]:
        if "README.md" not in commit.files:
            return {}
        match = _YAML_BLOCK_PATTERN.search(self._read_entry(commit.files["README.md"]).decode(errors="replace"))
        try:
            metadata = yaml.safe_load(match.group(2)) if match else None
        except yaml.YAMLError:
            return {}
        return metadata if isinstance(metadata, dict) else {}

    def _json_file(self, commit: Commit, path: str) -> Any:
        if path not in commit.files:
            return None
        try:
            return json.loads(self._read_entry(commit.files[path]))
        except ValueError:
            return None

    def _tree_entries(self, commit: Commit, path: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        files = sorted((entry for entry in commit.files.values() if entry.path.startswith(prefix)), key=_path_key)
        if prefix and not files:
            raise HubError(404, f"{path} does not exist on {commit.oid}", "EntryNotFound")
        entries, seen_folders = [], set()
        for entry in files:
            relative_parts = entry.path[len(prefix) :].split("/")
            for depth in range(1, len(relative_parts)):
                folder = prefix + "/".join(relative_parts[:depth])
                if folder not in seen_folders and (recursive or depth == 1):
                    seen_folders.add(folder)
                    entries.append(
                        {"type": "directory", "oid": _git_blob_oid(folder.encode()), "size": 0, "path": folder}
                    )
            if recursive or len(relative_parts) == 1:
                entries.append(entry.to_tree_json())
        return entries

    def _tree(self, headers, repo_type, repo_id, revision, path, query) -> _Response:
        commit = self._commit_at(self._readable_repo(headers, repo_type, repo_id), revision)
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        return _Response.json(200, self._tree_entries(commit, path, recursive))

    def _paths_info(self, headers, repo_type, repo_id, revision, form: dict[str, list[str]]) -> _Response:
        commit = self._commit_at(self._readable_repo(headers, repo_type, repo_id), revision)
        folders = {
            "/".join(entry.path.split("/")[:depth])
            for entry in commit.files.values()
            for depth in range(1, entry.path.count("/") + 1)
        }
        result = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                result.append(commit.files[path].to_tree_json())
            elif path in folders:
                result.append({"type": "directory", "oid": _git_blob_oid(path.encode()), "size": 0, "path": path})
        return _Response.json(200, result)

    def _refs(self, headers, repo_type, repo_id) -> _Response:
        repo = self._readable_repo(headers, repo_type, repo_id)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in repo.refs.items()
            if not name.startswith("refs/")
        ]
        pull_requests = [
            {"name": name, "ref": name, "targetCommit": oid}
            for name, oid in repo.refs.items()
            if name.startswith("refs/pr/")
        ]
        return _Response.json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": pull_requests})

    def _commit_history(self, headers, repo_type, repo_id, revision) -> _Response:
        repo = self._readable_repo(headers, repo_type, repo_id)
        self._commit_at(repo, revision)
        history = [
            {
                "id": commit.oid,
                "title": commit.title,
                "message": commit.message,
                "date": commit.date,
                "authors": [{"user": commit.author}],
            }
            for commit in repo.history(revision)
        ]
        return _Response.json(200, history)

    def _writable_repo(self, headers, repo_type, repo_id, what: str) -> Repo:
        repo = self._readable_repo(headers, repo_type, repo_id)
        self._require_writer(headers, repo_id.split("/")[0], what)
        return repo

    def _preupload(self, headers, repo_type, repo_id, revision, payload: dict) -> _Response:
        repo = self._writable_repo(headers, repo_type, repo_id, f"upload to {repo_id}")
        commit = self._commit_at(repo, revision)
        answers = []
        for item in payload.get("files") or []:
            path, size = _clean_repo_path(item.get("path")), int(item.get("size", 0))
            sample = base64.b64decode(item.get("sample") or "")
            existing = commit.files.get(path)
            remote_oid = None
            if existing is not None:
                remote_oid = existing.lfs_sha256 if existing.is_lfs else existing.git_oid
            mode = "lfs" if needs_lfs(path, size, sample) else "regular"
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": remote_oid})
        return _Response.json(200, {"files": answers, "commitOid": commit.oid})

    def _commit(self, headers, repo_type, repo_id, revision, query, body: bytes) -> _Response:
        repo = self._writable_repo(headers, repo_type, repo_id, f"commit to {repo_id}")
        author = self._user(headers)
        base = self._commit_at(repo, revision)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a `header` line.")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != base.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        operations = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = _clean_repo_path(value.get("path"))
            if key == "file":
                content = base64.b64decode(value.get("content", ""))
                if needs_lfs(path, len(content), content[:512]):
                    raise HubError(
                        400,
                        f"Your push was rejected because {path} is a binary or large file: upload it with Git LFS "
                        "(the preupload endpoint answers `uploadMode: lfs` for it).",
                    )
                files[path] = self._store_regular(path, content)
            elif key == "lfsFile":
                oid = value.get("oid", "")
                if oid not in self._lfs_sizes:
                    raise HubError(
                        422,
                        f"LFS object {oid} for {path} was not uploaded; upload it through the LFS batch API first.",
                    )
                if value.get("size") is not None and int(value["size"]) != self._lfs_sizes[oid]:
                    raise HubError(
                        422, f"LFS object {oid} for {path} has size {self._lfs_sizes[oid]}, not {value['size']}."
                    )
                files[path] = self._lfs_entry(path, oid)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                removed = [name for name in files if name.startswith(path.rstrip("/") + "/")]
                if not removed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for name in removed:
                    del files[name]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}.")
            operations.append((key, path))
        ref, pull_request_url = revision, None
        if query.get("create_pr", ["0"])[0] in ("1", "true"):
            repo.num_pull_requests += 1
            ref = f"refs/pr/{repo.num_pull_requests}"
            pull_request_url = (
                f"{self.endpoint}/{_URL_PREFIX_BY_REPO_TYPE[repo_type]}{repo_id}/discussions/{repo.num_pull_requests}"
            )
            repo.refs[ref] = base.oid
        elif repo.find_commit(revision) is not None and revision not in repo.refs:
            raise HubError(400, f"Can only commit to a branch; {revision} is a commit sha.")
        commit = self._add_commit(
            repo, ref, header.get("summary") or "", header.get("description") or "", author, files, tuple(operations)
        )
        commit_url = f"{self.endpoint}/{_URL_PREFIX_BY_REPO_TYPE[repo_type]}{repo_id}/commit/{commit.oid}"
        return _Response.json(
            200,
            {"success": True, "commitOid": commit.oid, "commitUrl": commit_url, "pullRequestUrl": pull_request_url},
        )

    def _add_commit(self, repo: Repo, ref: str, title: str, message: str, author: str, files: dict, operations):
        parent = repo.refs.get(ref)
        listing = sorted((entry.path, entry.git_oid) for entry in files.values())
        digest_input = json.dumps([self._commit_salt, parent, title, message, listing, len(repo.commits)])
        oid = hashlib.sha1(digest_input.encode()).hexdigest()
        commit = Commit(oid, parent, title, message, author, _now(), MappingProxyType(dict(files)), operations)
        repo.commits[oid] = commit
        repo.refs[ref] = oid
        return commit

    def _lfs_batch(self, headers, repo_type, repo_id, payload: dict) -> _Response:
        repo = self._readable_repo(headers, repo_type, repo_id)
        if payload.get("operation") != "upload":
            raise HubError(422, "The fake Hub's LFS batch API only serves `upload` operations.")
        self._require_writer(headers, repo.repo_id.split("/")[0], f"upload to {repo_id}")
        objects = []
        for item in payload.get("objects") or []:
            oid, size = str(item.get("oid", "")), item.get("size")
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
                objects.append(
                    {
                        "oid": oid,
                        "size": size if isinstance(size, int) else -1,
                        "error": {"code": 422, "message": "Invalid oid or size."},
                    }
                )
            elif size > self.max_request_bytes:
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "Object too large."}})
            elif self._lfs_sizes.get(oid) == size:
                objects.append({"oid": oid, "size": size, "authenticated": True})
            else:
                query = f"size={size}&signature={self._sign('upload', oid, size)}"
                verify_url = (
                    f"{self.endpoint}/{_URL_PREFIX_BY_REPO_TYPE[repo_type]}{repo_id}.git/info/lfs/objects/verify"
                )
                actions = {
                    "upload": {"href": f"{self.storage_endpoint}/upload/{oid}?{query}"},
                    "verify": {"href": verify_url},
                }
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        return _Response.json(
            200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json"
        )

    def _lfs_verify(self, headers, repo_type, repo_id, payload: dict) -> _Response:
        self._writable_repo(headers, repo_type, repo_id, f"upload to {repo_id}")
        oid, size = payload.get("oid"), payload.get("size")
        if self._lfs_sizes.get(oid) != size:
            raise HubError(404, f"LFS object {oid} of size {size} was not received by the storage.")
        return _Response.json(200, {"success": True}, content_type="application/vnd.git-lfs+json")

    def _resolve(self, headers, repo_type, repo_id, revision, path) -> _Response:
        repo = self._readable_repo(headers, repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        common = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.git_oid}"', "Accept-Ranges": "bytes"}
        if entry.is_lfs:
            signature = self._sign("download", entry.lfs_sha256, entry.size)
            location = f"{self.storage_endpoint}/objects/{entry.lfs_sha256}?size={entry.size}&signature={signature}"
            location += f"&filename={quote(path.rsplit('/', 1)[-1])}"
            redirect_headers = {
                **common,
                "Location": location,
                "X-Linked-Etag": f'"{entry.lfs_sha256}"',
                "X-Linked-Size": str(entry.size),
                "Content-Type": "text/plain; charset=utf-8",
            }
            return _Response(302, f"Found. Redirecting to {location}".encode(), redirect_headers)
        content_type = mimetypes.guess_type(path)[0] or "text/plain; charset=utf-8"
        return _Response(200, self._read_entry(entry), {**common, "Content-Type": content_type})

    def _handle_storage(self, method: str, segments: list[str], query: dict, headers, body: bytes) -> _Response:
        if len(segments) == 2 and segments[0] == "upload" and method == "PUT":
            oid = segments[1]
            expected_size = self._check_signature(query, "upload", oid)
            actual = hashlib.sha256(body).hexdigest()
            if len(body) != expected_size or actual != oid:
                raise HubError(400, f"Uploaded content has sha256 {actual} and {len(body)} bytes; expected {oid}.")
            self._write_atomic(self._lfs_object_path(oid), body)
            self._lfs_sizes[oid] = expected_size
            self.lfs_uploads.append(oid)
            return _Response(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        if len(segments) == 2 and segments[0] == "objects" and method in ("GET", "HEAD"):
            oid = segments[1]
            size = self._check_signature(query, "download", oid)
            if self._lfs_sizes.get(oid) != size:
                raise HubError(404, f"No object {oid} in storage.")
            return _ranged(self._lfs_object_path(oid).read_bytes(), oid, query, headers.get("Range"))
        raise HubError(404, f"The storage does not serve {method} /{'/'.join(segments)}.")


def validate_model_card_metadata(metadata: Any) -> list[str]:
    """The checks the Hub's `validate-yaml` endpoint makes on a model card's metadata that matter here.

    Returns:
        One message per problem; empty when the metadata is valid.
    """
    if metadata is None:
        return []
    if not isinstance(metadata, dict):
        return ["The metadata block must be a YAML mapping."]
    errors = []
    for key in ("license", "library_name", "pipeline_tag"):
        if key in metadata and not isinstance(metadata[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "base_model"):
        value = metadata.get(key)
        values = [value] if isinstance(value, str) else value
        if key in metadata and not (isinstance(values, list) and all(isinstance(item, str) for item in values)):
            errors.append(f'"{key}" must be a string or a list of strings')
        elif key == "base_model" and values and not all(re.fullmatch(r"[\w.-]+/[\w.-]+", item) for item in values):
            errors.append('"base_model" must list Hub model ids (namespace/name)')
    model_index = metadata.get("model-index")
    if model_index is not None:
        try:
            for model in model_index:
                assert isinstance(model["name"], str)
                for result in model["results"]:
                    assert isinstance(result["task"]["type"], str)
                    assert isinstance(result["dataset"]["type"], str) and isinstance(result["dataset"]["name"], str)
                    for metric in result["metrics"]:
                        assert isinstance(metric["type"], str) and "value" in metric
        except (AssertionError, KeyError, TypeError):
            errors.append(
                '"model-index" must list {name, results: [{task: {type}, dataset: {type, name}, '
                "metrics: [{type, value}]}]}"
            )
    return errors


def _ranged(content: bytes, oid: str, query: dict, range_header: str | None) -> _Response:
    """Serves `content`, or the single byte range asked for (`bytes=start-` or `bytes=start-end`)."""
    headers = {"Content-Type": "application/octet-stream", "ETag": f'"{oid}"', "Accept-Ranges": "bytes"}
    filename = query.get("filename", [None])[0]
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
    if match is None:
        return _Response(200, content, headers)
    start = int(match.group(1))
    end = min(int(match.group(2)) if match.group(2) else len(content) - 1, len(content) - 1)
    if start > end:
        return _Response(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"})
    headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
    return _Response(206, content[start : end + 1], headers)


def _json_body(body: bytes) -> dict:
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        raise HubError(400, "The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise HubError(400, "The request body must be a JSON object.")
    return payload


def _clean_repo_path(path: Any) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/") or "\\" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}.")
    return path


def _path_key(entry: RepoEntry) -> tuple:
    return tuple(entry.path.split("/"))


def _strip_repo_type_prefix(segments: list[str]) -> tuple[str, list[str]]:
    if segments[:1] == ["datasets"]:
        return "dataset", segments[1:]
    if segments[:1] == ["spaces"]:
        return "space", segments[1:]
    return "model", segments


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, address, handler, *, hub: FakeHub, role: str):
        super().__init__(address, handler)
        self.hub = hub
        self.role = role
        self._live: set[socket.socket] = set()
        self._live_lock = threading.Lock()

    def track(self, connection: socket.socket, alive: bool) -> None:
        with self._live_lock:
            (self._live.add if alive else self._live.discard)(connection)

    def close_live_connections(self) -> None:
        with self._live_lock:
            for connection in list(self._live):
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self._live.clear()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1"
    # Idle keep-alive connections are dropped after this many seconds, so that no handler thread outlives a test.
    timeout = 30
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, alive=True)

    def finish(self) -> None:
        self.server.track(self.connection, alive=False)
        super().finish()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature of the base class
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _read_body(self) -> bytes:
        limit = self.server.hub.max_request_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size_line = self.rfile.readline(_MAX_HEADER_LINE)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(_MAX_HEADER_LINE) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > limit:
                    raise HubError(413, f"Request body over {limit} bytes.")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(_MAX_HEADER_LINE)
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            raise HubError(413, f"Request body over {limit} bytes.")
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        segments = [unquote(segment) for segment in split.path.split("/")[1:]]
        if segments and segments[-1] == "" and len(segments) > 1:
            segments = segments[:-1]
        try:
            body = self._read_body()
        except (HubError, ValueError) as error:
            self.close_connection = True
            response = error.to_response() if isinstance(error, HubError) else HubError(400, str(error)).to_response()
            self._send(method, response)
            return
        try:
            response = self.server.hub.handle(
                self.server.role, method, segments, parse_qs(split.query), self.headers, body
            )
        except HubError as error:
            response = error.to_response()
        except Exception as error:  # a bug of the fake Hub: answer it instead of dropping the connection
            print(f"fake Hub: error on {method} {self.path}: {error!r}", file=sys.stderr)
            response = HubError(500, f"Fake Hub internal error: {error!r}").to_response()
        self._send(method, response)

    def _send(self, method: str, response: _Response) -> None:
        # Recorded before answering, so the log follows the order in which the client saw the answers.
        self.server.hub.requests.append(RequestRecord(self.server.role, method, self.path, response.status))
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)


class HubClientEnvironment:
    """Points `huggingface_hub` and `transformers`, in this process, at a fake Hub, and restores everything on exit.

    Both libraries read `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_OFFLINE` and friends once, at import time, so setting
    environment variables is not enough: this also patches `huggingface_hub.constants`, the default `HfApi`, the
    transformers modules cache and transformers' shared `HfApi`. Xet is disabled so that uploads take the LFS path,
    which the fake Hub serves. Use it as a context manager.

    Args:
        endpoint (`str`):
            The fake Hub's URL.
        hf_home (`str` or `os.PathLike`):
            A fresh folder to use as `HF_HOME` (cache, token file, remote-code modules).
        token (`str`, *optional*):
            Exported as `HF_TOKEN`; `None` leaves the client without a token.
    """

    def __init__(self, endpoint: str, hf_home: str | os.PathLike, token: str | None = DEFAULT_TOKEN):
        self.endpoint = endpoint.rstrip("/")
        self.hf_home = Path(hf_home)
        self.token = token
        self._saved_attributes: list[tuple[Any, str, Any]] = []
        self._saved_environment: dict[str, str | None] = {}
        self._added_sys_path: str | None = None

    def _set_attribute(self, target: Any, name: str, value: Any) -> None:
        self._saved_attributes.append((target, name, getattr(target, name)))
        setattr(target, name, value)

    def _set_environment(self, name: str, value: str | None) -> None:
        self._saved_environment.setdefault(name, os.environ.get(name))
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def set_offline(self, offline: bool) -> None:
        """Switches the Hub client to offline mode (only the local cache is used) or back."""
        from huggingface_hub import constants

        self._set_environment("HF_HUB_OFFLINE", "1" if offline else None)
        self._set_attribute(constants, "HF_HUB_OFFLINE", offline)

    def set_token(self, token: str | None) -> None:
        """Changes (or removes, with `None`) the token the client sends."""
        self._set_environment("HF_TOKEN", token)

    def __enter__(self) -> HubClientEnvironment:
        import huggingface_hub.hf_api
        from huggingface_hub import constants

        hub_cache = self.hf_home / "hub"
        modules_cache = self.hf_home / "modules"
        hub_cache.mkdir(parents=True, exist_ok=True)
        self._set_environment("HF_ENDPOINT", self.endpoint)
        self._set_environment("HF_HOME", str(self.hf_home))
        self._set_environment("HF_HUB_CACHE", str(hub_cache))
        self._set_environment("HF_MODULES_CACHE", str(modules_cache))
        self._set_environment("HF_HUB_DISABLE_XET", "1")
        self._set_environment("HF_HUB_DISABLE_TELEMETRY", "1")
        self._set_environment("HUGGING_FACE_HUB_TOKEN", None)
        self.set_token(self.token)
        constant_values = {
            "ENDPOINT": self.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": self.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HOME": str(self.hf_home),
            "HF_HUB_CACHE": str(hub_cache),
            "HUGGINGFACE_HUB_CACHE": str(hub_cache),
            "HF_ASSETS_CACHE": str(self.hf_home / "assets"),
            "HF_XET_CACHE": str(self.hf_home / "xet"),
            "HF_TOKEN_PATH": str(self.hf_home / "token"),
            "HF_STORED_TOKENS_PATH": str(self.hf_home / "stored_tokens"),
        }
        for name, value in constant_values.items():
            self._set_attribute(constants, name, value)
        self.set_offline(False)
        self._set_attribute(huggingface_hub.hf_api.api, "endpoint", self.endpoint)
        self._patch_transformers(str(modules_cache))
        return self

    def _patch_transformers(self, modules_cache: str) -> None:
        try:
            import transformers.dynamic_module_utils
            import transformers.utils
            import transformers.utils.hub
        except ImportError:
            return
        self._set_attribute(transformers.utils.hub, "_hf_api", None)
        for module in (transformers.utils.hub, transformers.utils, transformers.dynamic_module_utils):
            self._set_attribute(module, "HF_MODULES_CACHE", modules_cache)
        if modules_cache not in sys.path:
            self._added_sys_path = modules_cache

    def __exit__(self, *exc_info) -> None:
        for target, name, value in reversed(self._saved_attributes):
            setattr(target, name, value)
        for name, value in self._saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if self._added_sys_path is not None and self._added_sys_path in sys.path:
            sys.path.remove(self._added_sys_path)
        with contextlib.suppress(ImportError):
            import transformers.utils.hub

            transformers.utils.hub._hf_api = None
        self._saved_attributes.clear()
        self._saved_environment.clear()


__all__ = [
    "DEFAULT_TOKEN",
    "DEFAULT_USER",
    "LFS_PATTERNS",
    "Commit",
    "FakeHub",
    "HubClientEnvironment",
    "HubError",
    "RepoEntry",
    "RequestRecord",
    "needs_lfs",
    "validate_model_card_metadata",
]
