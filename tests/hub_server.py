"""A tiny local stand-in for the Hugging Face Hub HTTP API, for tests.

Stdlib only. It speaks enough of the Hub protocol for the real ``huggingface_hub``
client (checked against huggingface_hub 2.4) to run ``create_repo``, ``upload_folder`` /
``upload_file`` / ``create_commit`` over plain git-LFS (set ``HF_HUB_DISABLE_XET=1``),
``repo_info`` / ``model_info`` / ``dataset_info``, ``list_repo_files`` / ``list_repo_tree``,
``create_branch``, ``delete_repo`` and ``hf_hub_download``.

Usage::

    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.url, token=hub.token)
        api.create_repo("me/demo", exist_ok=True, private=True)
        info = api.upload_folder(repo_id="me/demo", folder_path=folder)
        assert hub.file_bytes("me/demo", "adapter_model.safetensors") == expected

Endpoints (paths as the client sends them; ``{t}`` is ``models`` or ``datasets``; the
URL prefix ``{p}`` is empty for models and ``datasets/`` for datasets):

* ``POST   /api/repos/create``                                  create (409 + ``url`` if it exists)
* ``DELETE /api/repos/delete``                                  delete
* ``POST   /api/validate-yaml``                                 README front-matter check
* ``GET    /api/whoami-v2``                                     who owns the token
* ``GET    /api/{t}/{ns}/{name}[/revision/{rev}]``              repo info (id, sha, siblings, private)
* ``GET    /api/{t}/{ns}/{name}/tree/{rev}[/{path}]``           file listing (``?recursive=true``)
* ``POST   /api/{t}/{ns}/{name}/preupload/{rev}``               upload modes (lfs / regular) + remote oids
* ``POST   /api/{t}/{ns}/{name}/commit/{rev}``                  NDJSON commit
* ``POST   /api/{t}/{ns}/{name}/branch/{branch}``               create a branch
* ``POST   /{p}{ns}/{name}.git/info/lfs/objects/batch``         git-lfs batch API (upload)
* ``POST   /{p}{ns}/{name}.git/info/lfs/objects/verify``        git-lfs verify
* ``PUT    /_lfs/upload/{oid}?ticket=...``                      upload href (like a presigned URL, no auth)
* ``GET|HEAD /{p}{ns}/{name}/resolve/{rev}/{path}``             file download

Storage under ``root_dir``: ``objects/<sha256>`` holds every blob (regular and LFS), and
``repos/<t>/<ns>/<name>/repo.json`` holds a repo's metadata, branches and commit list
(each commit: oid, parent, summary, description, date, added, deleted and the full
``files`` snapshot ``{path: {"sha256", "size", "lfs", "blob_id"}}``). A new ``LocalHub`` on
an existing ``root_dir`` picks the repos up again.

Like the Hub, creating a repo makes an ``initial commit`` holding a ``.gitattributes``.
"""

from __future__ import annotations

import base64
import collections
import copy
import datetime as _dt
import fnmatch
import hashlib
import http.server
import json
import os
import re
import secrets
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["LocalHub", "LoggedRequest", "git_blob_id"]

LoggedRequest = collections.namedtuple("LoggedRequest", ["method", "path", "status"])

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub sends files >= 10 MB to LFS
_LFS_CONTENT_TYPE = "application/vnd.git-lfs+json"
_REPO_TYPES = {"models": "model", "datasets": "dataset"}
_URL_PREFIX = {"model": "", "dataset": "datasets/"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")

DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
        "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
        "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
        "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
        "*.zst", "*tfevents*", "*.gguf",
    )
)


def git_blob_id(data: bytes) -> str:
    """git's object id of a blob (what the Hub reports as the oid of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _split_repo_id(repo_id: str) -> tuple[str, str]:
    if repo_id.count("/") != 1:
        raise ValueError(f"repo_id must look like 'namespace/name', got {repo_id!r}")
    ns, name = repo_id.split("/")
    return ns, name


def _type_of(repo_type: str | None) -> str:
    repo_type = repo_type or "model"
    if repo_type not in ("model", "dataset"):
        raise ValueError(f"LocalHub only handles model and dataset repos, got {repo_type!r}")
    return repo_type


class HubError(Exception):
    """Raised inside a handler to answer an error the way the Hub does."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra or {}


def _repo_not_found(status: int = 404) -> HubError:
    return HubError(status, "Repository not found", code="RepoNotFound")


class LocalHub:
    """Local fake of the Hugging Face Hub API backed by ``root_dir``.

    Public attributes: ``root_dir``, ``token``, ``username``, ``fail_commits`` (how many of the
    next authorized commit POSTs still answer 500; may be changed at any time), ``url`` /
    ``base_url`` (set by :meth:`start`), ``request_log`` (list of ``LoggedRequest(method,
    path, status)``; ``path`` has no query string) and ``server_errors`` (tracebacks of
    unexpected handler crashes, which answer 500).
    """

    def __init__(
        self,
        root_dir: str | os.PathLike,
        token: str = "hf_test_token",
        fail_commits: int = 0,
        username: str = "user",
    ) -> None:
        self.root_dir = Path(root_dir)
        self.token = token
        self.username = username
        self.fail_commits = int(fail_commits)
        self.request_log: list[LoggedRequest] = []
        self.server_errors: list[str] = []
        self.base_url: str | None = None
        self._lock = threading.RLock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._upload_tickets: dict[str, tuple[tuple[str, str], str, int]] = {}
        self._commit_counter = 0
        self._objects_dir.mkdir(parents=True, exist_ok=True)
        self._repos: dict[tuple[str, str], dict[str, Any]] = {}
        self._load_repos()

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str | None:
        return self.base_url

    def start(self) -> str:
        """Start serving on a free port of 127.0.0.1; return the base URL."""
        if self._server is not None:
            return self.base_url  # type: ignore[return-value]
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self.base_url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        """Stop serving (the data stays on disk)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "LocalHub":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (_type_of(repo_type), repo_id) in self._repos

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> str:
        """Create a repo directly (no HTTP); return its URL. No-op if it exists."""
        repo_type = _type_of(repo_type)
        with self._lock:
            if (repo_type, repo_id) not in self._repos:
                self._create_repo(repo_type, repo_id, private)
        return self._repo_url(repo_type, repo_id)

    def commits(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[dict]:
        """Commits reachable from ``revision``, oldest first (the Hub's ``initial commit`` included).

        Each is a dict with ``oid``, ``parent``, ``summary``, ``description``, ``date``,
        ``added`` (paths written), ``deleted`` (paths removed) and ``files`` (snapshot after the
        commit: ``{path: {"sha256", "size", "lfs", "blob_id"}}``).
        """
        with self._lock:
            repo = self._get_repo(_type_of(repo_type), repo_id)
            by_oid = {c["oid"]: c for c in repo["commits"]}
            oid = self._resolve_rev(repo, revision)
            chain = []
            while oid is not None:
                commit = by_oid[oid]
                chain.append(copy.deepcopy(commit))
                oid = commit["parent"]
            return chain[::-1]

    def head(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> str | None:
        """Commit oid that ``revision`` points to."""
        with self._lock:
            return self._resolve_rev(self._get_repo(_type_of(repo_type), repo_id), revision)

    def list_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[str]:
        with self._lock:
            repo = self._get_repo(_type_of(repo_type), repo_id)
            return sorted(self._tree(repo, revision))

    def file_bytes(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        """Current bytes of ``path`` at ``revision``; KeyError if the repo/file is missing."""
        with self._lock:
            repo = self._get_repo(_type_of(repo_type), repo_id)
            entry = self._tree(repo, revision).get(path)
            if entry is None:
                raise KeyError(f"{path!r} not in {repo_id} at {revision}")
            return self._object_path(entry["sha256"]).read_bytes()

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return bool(self._get_repo(_type_of(repo_type), repo_id)["private"])

    def requests(self, method: str | None = None, contains: str | None = None) -> list[LoggedRequest]:
        """Filtered copy of :attr:`request_log`."""
        with self._lock:
            log = list(self.request_log)
        return [
            r for r in log if (method is None or r.method == method) and (contains is None or contains in r.path)
        ]

    # ------------------------------------------------------------------ storage

    @property
    def _objects_dir(self) -> Path:
        return self.root_dir / "objects"

    def _object_path(self, sha256: str) -> Path:
        return self._objects_dir / sha256

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        ns, name = _split_repo_id(repo_id)
        return self.root_dir / "repos" / f"{repo_type}s" / ns / name

    def _load_repos(self) -> None:
        for meta in sorted((self.root_dir / "repos").glob("*/*/*/repo.json")):
            repo = json.loads(meta.read_text())
            self._repos[(repo["type"], repo["id"])] = repo

    def _save_repo(self, repo: dict) -> None:
        folder = self._repo_dir(repo["type"], repo["id"])
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "repo.json.tmp"
        tmp.write_text(json.dumps(repo, indent=1, sort_keys=True))
        os.replace(tmp, folder / "repo.json")

    def _store_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        target = self._object_path(sha)
        if not target.exists():
            fd, tmp = tempfile.mkstemp(dir=self._objects_dir, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        return sha

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.base_url}/{_URL_PREFIX[repo_type]}{repo_id}"

    def _get_repo(self, repo_type: str, repo_id: str) -> dict:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r}")
        return repo

    @staticmethod
    def _resolve_rev(repo: dict, revision: str) -> str | None:
        if revision in repo["refs"]:
            return repo["refs"][revision]
        if _COMMIT_RE.match(revision) and any(c["oid"] == revision for c in repo["commits"]):
            return revision
        raise KeyError(f"unknown revision {revision!r}")

    @staticmethod
    def _tree(repo: dict, revision: str) -> dict[str, dict]:
        oid = LocalHub._resolve_rev(repo, revision)
        if oid is None:
            return {}
        for commit in repo["commits"]:
            if commit["oid"] == oid:
                return commit["files"]
        raise KeyError(oid)

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> dict:
        now = _now()
        repo = {
            "type": repo_type,
            "id": repo_id,
            "private": bool(private),
            "createdAt": now,
            "refs": {"main": None},
            "commits": [],
            "lfs_objects": [],
        }
        self._repos[(repo_type, repo_id)] = repo
        content = DEFAULT_GITATTRIBUTES.encode()
        sha = self._store_bytes(content)
        entry = {"sha256": sha, "size": len(content), "lfs": False, "blob_id": git_blob_id(content)}
        self._add_commit(repo, "main", "initial commit", "", {".gitattributes": entry}, [".gitattributes"], [])
        return repo

    def _add_commit(
        self, repo: dict, branch: str, summary: str, description: str, files: dict, added: list, deleted: list
    ) -> dict:
        parent = repo["refs"].get(branch)
        self._commit_counter += 1
        seed = json.dumps(
            [repo["type"], repo["id"], parent, summary, description, files, _now(), self._commit_counter,
             secrets.token_hex(8)],
            sort_keys=True,
        ).encode()
        commit = {
            "oid": hashlib.sha1(seed).hexdigest(),
            "parent": parent,
            "branch": branch,
            "summary": summary,
            "description": description,
            "date": _now(),
            "added": sorted(added),
            "deleted": sorted(deleted),
            "files": files,
        }
        repo["commits"].append(commit)
        repo["refs"][branch] = commit["oid"]
        repo["lastModified"] = commit["date"]
        self._save_repo(repo)
        return commit

    def _lfs_patterns(self, files: dict) -> list[str]:
        entry = files.get(".gitattributes")
        if entry is None:
            return []
        text = self._object_path(entry["sha256"]).read_text(errors="replace")
        patterns = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
                patterns.append(parts[0])
        return patterns

    @staticmethod
    def _matches(path: str, patterns: list[str]) -> bool:
        base = path.rsplit("/", 1)[-1]
        for pattern in patterns:
            target = path if "/" in pattern else base
            if fnmatch.fnmatchcase(target, pattern.lstrip("/")):
                return True
        return False


# ====================================================================== HTTP handler


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: LocalHub  # set on a per-server subclass
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 60  # idle keep-alive connections end after this

    # -------------------------------------------------------------- plumbing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self._req_path = split.path
        self._query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self._body_consumed = False
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        try:
            try:
                self._route(method, segments)
            finally:
                self._drain_body()
        except HubError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # pragma: no cover - surfaced through hub.server_errors
            self.hub.server_errors.append(traceback.format_exc())
            self._send_error(HubError(500, "Internal Error (LocalHub crashed, see hub.server_errors)"))

    def _iter_body(self) -> Iterator[bytes]:
        """Yield the request body (Content-Length or chunked), once."""
        if self._body_consumed:
            return
        self._body_consumed = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        raise ConnectionResetError("client went away")
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline(65537)  # CRLF after the chunk
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    raise ConnectionResetError("client went away")
                remaining -= len(chunk)
                yield chunk

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _drain_body(self) -> None:
        for _ in self._iter_body():
            pass

    def _read_json(self) -> Any:
        raw = self._read_body()
        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise HubError(400, "Invalid JSON body") from None

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json; charset=utf-8", head_only: bool = False) -> None:
        with self.hub._lock:
            self.hub.request_log.append(LoggedRequest(self.command, self._req_path, status))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body and not head_only and self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None,
                   content_type: str = "application/json; charset=utf-8") -> None:
        self._send(status, json.dumps(payload).encode(), headers, content_type)

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json(err.status, {"error": err.message, **err.extra}, headers)

    # -------------------------------------------------------------- auth

    def _auth_state(self) -> str:
        """'ok', 'missing' or 'invalid'."""
        header = self.headers.get("Authorization")
        if not header:
            return "missing"
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(value.strip(), self.hub.token):
            return "ok"
        return "invalid"

    def _require_write(self) -> None:
        if self._auth_state() != "ok":
            raise HubError(401, INVALID_CREDENTIALS)

    def _check_read(self) -> None:
        """A bad token is refused anywhere, as on the Hub (a missing one is fine here)."""
        if self._auth_state() == "invalid":
            raise HubError(401, INVALID_CREDENTIALS)

    def _repo_for_read(self, repo_type: str, repo_id: str) -> dict:
        self._check_read()
        state = self._auth_state()
        repo = self.hub._repos.get((repo_type, repo_id))
        if repo is None:
            raise _repo_not_found(401 if state == "missing" else 404)
        if repo["private"] and state != "ok":
            raise _repo_not_found(401)
        return repo

    def _repo_for_write(self, repo_type: str, repo_id: str) -> dict:
        self._require_write()
        repo = self.hub._repos.get((repo_type, repo_id))
        if repo is None:
            raise _repo_not_found(404)
        return repo

    @staticmethod
    def _rev_or_404(repo: dict, revision: str) -> str | None:
        try:
            return LocalHub._resolve_rev(repo, revision)
        except KeyError:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound") from None

    @staticmethod
    def _branch_or_404(repo: dict, revision: str) -> str:
        if revision not in repo["refs"]:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return revision

    # -------------------------------------------------------------- routing

    def _route(self, method: str, seg: list[str]) -> None:
        hub = self.hub
        with hub._lock:
            if seg[:1] == ["api"]:
                return self._route_api(method, seg[1:])
            if method == "PUT" and len(seg) == 3 and seg[:2] == ["_lfs", "upload"]:
                return self._lfs_put(seg[2])
            # git-lfs endpoints: /{p}{ns}/{name}.git/info/lfs/objects/{batch|verify}
            repo_type = "model"
            rest = seg
            if rest[:1] == ["datasets"]:
                repo_type, rest = "dataset", rest[1:]
            if (
                method == "POST" and len(rest) == 6 and rest[1].endswith(".git")
                and rest[2:5] == ["info", "lfs", "objects"]
            ):
                repo_id = f"{rest[0]}/{rest[1][:-4]}"
                if rest[5] == "batch":
                    return self._lfs_batch(repo_type, repo_id)
                if rest[5] == "verify":
                    return self._lfs_verify(repo_type, repo_id)
            # downloads: /{p}{ns}/{name}/resolve/{rev}/{path...}
            if method in ("GET", "HEAD") and len(rest) >= 5 and rest[2] == "resolve":
                return self._resolve(repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]))
        raise HubError(404, f"LocalHub: no route for {method} {self._req_path}")

    def _route_api(self, method: str, seg: list[str]) -> None:
        if method == "POST" and seg == ["repos", "create"]:
            return self._create_repo()
        if method == "DELETE" and seg == ["repos", "delete"]:
            return self._delete_repo()
        if method == "POST" and seg == ["validate-yaml"]:
            return self._validate_yaml()
        if method == "GET" and seg == ["whoami-v2"]:
            return self._whoami()
        if len(seg) >= 3 and seg[0] in _REPO_TYPES:
            repo_type = _REPO_TYPES[seg[0]]
            repo_id = f"{seg[1]}/{seg[2]}"
            rest = seg[3:]
            if method == "GET" and not rest:
                return self._repo_info(repo_type, repo_id, "main")
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._repo_info(repo_type, repo_id, rest[1])
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]))
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo_type, repo_id, rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo_type, repo_id, rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                return self._create_branch(repo_type, repo_id, rest[1])
        raise HubError(404, f"LocalHub: no route for {method} {self._req_path}")

    # -------------------------------------------------------------- repos

    def _create_repo(self) -> None:
        self._require_write()
        payload = self._read_json() or {}
        name = payload.get("name")
        namespace = payload.get("organization") or self.hub.username
        repo_type = payload.get("type") or "model"
        if repo_type not in ("model", "dataset"):
            raise HubError(400, f"LocalHub does not handle repo type {repo_type!r}")
        if not isinstance(name, str) or not _NAME_RE.match(name) or not _NAME_RE.match(namespace):
            raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        private = payload.get("private")
        if payload.get("visibility") is not None:
            private = payload["visibility"] != "public"
        repo_id = f"{namespace}/{name}"
        url = self.hub._repo_url(repo_type, repo_id)
        if (repo_type, repo_id) in self.hub._repos:
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        self.hub._create_repo(repo_type, repo_id, bool(private))
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        self._require_write()
        payload = self._read_json() or {}
        namespace = payload.get("organization") or self.hub.username
        repo_type = payload.get("type") or "model"
        key = (repo_type, f"{namespace}/{payload.get('name')}")
        if key not in self.hub._repos:
            raise _repo_not_found(404)
        del self.hub._repos[key]
        meta = self.hub._repo_dir(*key) / "repo.json"
        meta.unlink(missing_ok=True)
        self._send(200)

    def _whoami(self) -> None:
        if self._auth_state() != "ok":
            raise HubError(401, INVALID_CREDENTIALS)
        name = self.hub.username
        self._send_json(200, {
            "type": "user", "id": "0" * 24, "name": name, "fullname": name, "email": None,
            "orgs": [], "isPro": False, "canPay": False,
            "auth": {"type": "access_token", "accessToken": {"displayName": "localhub", "role": "write"}},
        })

    def _validate_yaml(self) -> None:
        self._check_read()
        payload = self._read_json() or {}
        content = payload.get("content") or ""
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and not any(line.strip() == "---" for line in lines[1:]):
            message = "Invalid YAML front matter: missing closing '---'"
            raise HubError(400, message, extra={"errors": [{"message": message}]})
        self._send_json(200, {"errors": [], "warnings": []})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo_for_read(repo_type, repo_id)
        sha = self._rev_or_404(repo, revision)
        files = LocalHub._tree(repo, revision)
        with_blobs = str(self._query.get("blobs", "")).lower() in ("1", "true")
        siblings = []
        for path in sorted(files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                entry = files[path]
                sibling.update(size=entry["size"], blobId=entry["blob_id"])
                if entry["lfs"]:
                    pointer = _lfs_pointer(entry["sha256"], entry["size"])
                    sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"], "pointerSize": len(pointer)}
            siblings.append(sibling)
        ns = repo_id.split("/")[0]
        self._send_json(200, {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id if repo_type == "model" else None,
            "author": ns,
            "sha": sha,
            "lastModified": repo.get("lastModified") or repo["createdAt"],
            "createdAt": repo["createdAt"],
            "private": repo["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        })

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo_for_read(repo_type, repo_id)
        self._rev_or_404(repo, revision)
        files = LocalHub._tree(repo, revision)
        recursive = str(self._query.get("recursive", "")).lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound")
        entries: dict[str, dict] = {}
        for file_path in sorted(files):
            if not file_path.startswith(prefix):
                continue
            relative = file_path[len(prefix):]
            parts = relative.split("/")
            for depth in range(1, len(parts)):  # folders on the way
                if not recursive and depth > 1:
                    break
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, {
                    "type": "directory", "path": folder, "size": 0,
                    "oid": hashlib.sha1(folder.encode()).hexdigest(),
                })
            if not recursive and len(parts) > 1:
                continue
            entry = files[file_path]
            item: dict[str, Any] = {"type": "file", "path": file_path, "size": entry["size"], "oid": entry["blob_id"]}
            if entry["lfs"]:
                pointer = _lfs_pointer(entry["sha256"], entry["size"])
                item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": len(pointer)}
            entries[file_path] = item
        self._send_json(200, [entries[k] for k in sorted(entries)])

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self._repo_for_write(repo_type, repo_id)
        payload = self._read_json() or {}
        if branch in repo["refs"]:
            if payload.get("exist_ok") or self._query.get("exist_ok"):
                return self._send_json(200, {})
            raise HubError(409, f"Reference already exists: {branch}")
        start = payload.get("startingPoint") or "main"
        repo["refs"][branch] = self._rev_or_404(repo, start)
        self.hub._save_repo(repo)
        self._send_json(200, {})

    # -------------------------------------------------------------- downloads

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo_for_read(repo_type, repo_id)
        sha = self._rev_or_404(repo, revision)
        entry = LocalHub._tree(repo, revision).get(path)
        if entry is None:
            raise HubError(404, "Entry not found", code="EntryNotFound")
        data = self.hub._object_path(entry["sha256"]).read_bytes()
        etag = entry["sha256"] if entry["lfs"] else entry["blob_id"]
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": sha or "", "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers["X-Linked-Etag"] = f'"{entry["sha256"]}"'
            headers["X-Linked-Size"] = str(entry["size"])
        self._send(200, data, headers, content_type="application/octet-stream")

    # -------------------------------------------------------------- uploads

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo_for_write(repo_type, repo_id)
        payload = self._read_json() or {}
        if self._query.get("create_pr"):
            raise HubError(400, "LocalHub does not support create_pr")
        self._branch_or_404(repo, revision)
        files = LocalHub._tree(repo, revision)
        patterns = self.hub._lfs_patterns(files)
        answers = []
        for item in payload.get("files") or []:
            path = item.get("path")
            size = int(item.get("size") or 0)
            try:
                sample = base64.b64decode(item.get("sample") or "")
            except ValueError:
                raise HubError(400, f"Invalid sample for {path}") from None
            is_lfs = size >= LFS_SIZE_THRESHOLD or b"\x00" in sample or LocalHub._matches(path, patterns)
            answer: dict[str, Any] = {"path": path, "uploadMode": "lfs" if is_lfs else "regular", "shouldIgnore": False}
            current = files.get(path)
            if current is not None:
                answer["oid"] = current["sha256"] if current["lfs"] else current["blob_id"]
            answers.append(answer)
        self._send_json(200, {"files": answers, "commitOid": repo["refs"].get(revision)})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo_for_write(repo_type, repo_id)
        payload = self._read_json() or {}
        if payload.get("operation") != "upload":
            raise HubError(400, "LocalHub only implements the 'upload' LFS operation")
        known = set(repo["lfs_objects"])
        verify_href = f"{self.hub._repo_url(repo_type, repo_id)}.git/info/lfs/objects/verify"
        objects = []
        for obj in payload.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": str(oid), "size": int(size or 0),
                                "error": {"code": 422, "message": "Invalid oid or size"}})
                continue
            if oid in known and self.hub._object_path(oid).exists():
                objects.append({"oid": oid, "size": size})  # already there: no actions
                continue
            ticket = secrets.token_urlsafe(16)
            self.hub._upload_tickets[ticket] = ((repo_type, repo_id), oid, size)
            objects.append({
                "oid": oid,
                "size": size,
                "authenticated": True,
                "actions": {
                    "upload": {"href": f"{self.hub.base_url}/_lfs/upload/{oid}?ticket={ticket}"},
                    "verify": {"href": verify_href, "header": {}},
                },
            })
        self._send_json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        content_type=_LFS_CONTENT_TYPE)

    def _lfs_put(self, oid: str) -> None:
        ticket = self.hub._upload_tickets.get(self._query.get("ticket", ""))
        if ticket is None or ticket[1] != oid:
            raise HubError(403, "Invalid or expired upload ticket")
        key, _, size = ticket
        hasher = hashlib.sha256()
        received = 0
        fd, tmp = tempfile.mkstemp(dir=self.hub._objects_dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in self._iter_body():
                    hasher.update(chunk)
                    received += len(chunk)
                    out.write(chunk)
            if hasher.hexdigest() != oid or received != size:
                raise HubError(400, f"Uploaded content does not match oid {oid} / size {size}")
            os.replace(tmp, self.hub._object_path(oid))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        del self.hub._upload_tickets[self._query["ticket"]]
        repo = self.hub._repos.get(key)
        if repo is not None and oid not in repo["lfs_objects"]:
            repo["lfs_objects"].append(oid)
            self.hub._save_repo(repo)
        self._send(200, headers={"ETag": f'"{oid}"'})

    def _lfs_verify(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo_for_write(repo_type, repo_id)
        payload = self._read_json() or {}
        oid, size = payload.get("oid"), payload.get("size")
        path = self.hub._object_path(str(oid))
        if oid not in repo["lfs_objects"] or not path.exists() or path.stat().st_size != size:
            raise HubError(404, f"Object {oid} not found")
        self._send_json(200, {"success": True}, content_type=_LFS_CONTENT_TYPE)

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        repo = self._repo_for_write(repo_type, repo_id)
        raw = self._read_body()
        if hub.fail_commits > 0:
            hub.fail_commits -= 1
            raise HubError(500, "Internal Error - We're working hard to fix this as soon as possible!")
        if self._query.get("create_pr"):
            raise HubError(400, "LocalHub does not support create_pr")
        self._branch_or_404(repo, revision)
        lines = []
        for line in raw.decode("utf-8").splitlines():
            if line.strip():
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    raise HubError(400, "Invalid NDJSON line in commit payload") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0].get("value") or {}
        summary = header.get("summary")
        if not summary:
            raise HubError(400, "Commit summary is required")
        head = repo["refs"].get(revision)
        parent = header.get("parentCommit")
        if parent is not None and parent != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = copy.deepcopy(LocalHub._tree(repo, revision))
        added: list[str] = []
        deleted: list[str] = []
        for item in lines[1:]:
            key, value = item.get("key"), item.get("value") or {}
            path = value.get("path")
            if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
                raise HubError(400, f"Invalid path in commit: {path!r}")
            if key == "file":
                encoding = value.get("encoding", "base64")
                content = value.get("content", "")
                try:
                    data = base64.b64decode(content) if encoding == "base64" else content.encode("utf-8")
                except ValueError:
                    raise HubError(400, f"Invalid base64 content for {path}") from None
                sha = hub._store_bytes(data)
                files[path] = {"sha256": sha, "size": len(data), "lfs": False, "blob_id": git_blob_id(data)}
                added.append(path)
            elif key == "lfsFile":
                oid = value.get("oid")
                if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str):
                    raise HubError(400, f"Unsupported LFS pointer for {path}")
                obj = hub._object_path(oid)
                owned = oid in repo["lfs_objects"] or any(
                    f["lfs"] and f["sha256"] == oid for c in repo["commits"] for f in c["files"].values()
                )
                if not owned or not obj.exists():
                    raise HubError(
                        400, f"Your push was rejected because an LFS pointer pointed to a file that does not exist"
                             f" ({path}, oid {oid})"
                    )
                size = obj.stat().st_size
                if value.get("size") is not None and int(value["size"]) != size:
                    raise HubError(400, f"LFS size mismatch for {path}")
                pointer = _lfs_pointer(oid, size)
                files[path] = {"sha256": oid, "size": size, "lfs": True, "blob_id": git_blob_id(pointer)}
                added.append(path)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, "A file with this name doesn't exist", code="EntryNotFound")
                del files[path]
                deleted.append(path)
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                gone = [p for p in files if p.startswith(prefix)]
                if not gone:
                    raise HubError(404, "A folder with this name doesn't exist", code="EntryNotFound")
                for p in gone:
                    del files[p]
                deleted.extend(gone)
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        commit = hub._add_commit(repo, revision, summary, header.get("description") or "", files, added, deleted)
        self._send_json(200, {
            "commitUrl": f"{hub._repo_url(repo_type, repo_id)}/commit/{commit['oid']}",
            "commitOid": commit["oid"],
            "success": True,
            "hookOutput": "",
        })


def use_local_hub(mp, token: str, home: Path) -> None:
    """Point huggingface_hub at a LocalHub for a test: the token in HF_TOKEN, no Xet, online, its own
    HF_HOME, and slmforge's push retries without waiting (`mp`: a pytest MonkeyPatch)."""
    import huggingface_hub.constants as hc

    from slmforge import publishing

    mp.setenv("HF_TOKEN", token)
    mp.setenv("HF_HUB_DISABLE_XET", "1")
    mp.setenv("HF_HUB_OFFLINE", "0")
    mp.setenv("HF_HOME", str(home))
    mp.setattr(hc, "HF_HUB_DISABLE_XET", True)
    mp.setattr(hc, "HF_HUB_OFFLINE", False)
    mp.setattr(publishing, "PUSH_BASE_DELAY", 0.01)
