"""The artifact store: fsspec over `file://` (default) or `s3://` (s3fs).

Every stage output is a directory under a key derived from the stage's inputs. Files go up first
and `MANIFEST.json` (file list, sizes, sha256) goes last, so an output is either complete or
invisible: readers trust only what a manifest lists and verify it. This module imports no
Prefect, so the ML core can use it on a bare GPU machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import fsspec

MANIFEST = "MANIFEST.json"
T = TypeVar("T")


class StoreError(RuntimeError):
    """The store cannot be reached or holds something unusable; the message names the URL/key."""


def content_hash(obj: Any, n: int = 16) -> str:
    """Stable short hash of a JSON-able object: the cache/output key of a stage."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def stage_key(stage: str, inputs: Any) -> str:
    return f"{stage}/{content_hash(inputs)}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _transient(exc: BaseException) -> bool:
    """Connection resets, timeouts and 5xx are worth retrying; a 403 or a missing bucket is not."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return True
    text = f"{type(exc).__name__} {exc}"
    return any(s in text for s in ("500", "502", "503", "504", "Timeout", "Connect", "SlowDown"))


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.5) -> T:
    """Run a store operation, retrying transient faults with exponential backoff and jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == attempts or not _transient(exc):
                raise StoreError(f"{what}: {type(exc).__name__}: {exc}") from exc
            time.sleep(base_delay * 2 ** (attempt - 1) * (0.5 + random.random()))
    raise AssertionError("unreachable")


class ArtifactStore:
    def __init__(self, url: str, endpoint_url: str | None = None, cache_dir: str | Path | None = None):
        self.url = url.rstrip("/")
        scheme, _, rest = self.url.partition("://")
        self.scheme = scheme
        if scheme == "file":
            self.root = str(Path(rest).expanduser().resolve())
            self.fs = fsspec.filesystem("file")
        elif scheme == "s3":
            self.root = rest
            kwargs: dict[str, Any] = {}
            endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
            if endpoint:
                kwargs["client_kwargs"] = {"endpoint_url": endpoint}
            self.fs = fsspec.filesystem("s3", **kwargs)
        else:
            self.root = rest
            self.fs = fsspec.filesystem(scheme)
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "slmforge" / content_hash(self.url, 12))

    @classmethod
    def from_config(cls, storage) -> "ArtifactStore":
        return cls(storage.url, storage.endpoint_url)

    # -- paths -------------------------------------------------------------------------------
    def path(self, key: str) -> str:
        return f"{self.root}/{key}".rstrip("/")

    def uri(self, key: str) -> str:
        return f"{self.scheme}://{self.path(key)}"

    def local_path(self, key: str) -> Path | None:
        """The output's directory on this machine when the store is local (no copy needed)."""
        return Path(self.path(key)) if self.scheme == "file" else None

    # -- health ------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Write and delete a probe object, so a wrong URL or credential fails before any model loads."""
        probe = self.path(f".probe-{os.getpid()}-{random.randrange(1 << 30)}")

        def go():
            if self.scheme == "file":
                Path(self.root).mkdir(parents=True, exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)

        try:
            with_retries(go, f"store {self.url} is not writable", attempts=3, base_delay=0.3)
        except StoreError as e:
            raise StoreError(f"storage.url: {e}") from None

    # -- directories with manifests -----------------------------------------------------------
    def exists(self, key: str) -> bool:
        return with_retries(lambda: self.fs.exists(self.path(f"{key}/{MANIFEST}")), f"checking {self.uri(key)}")

    def manifest(self, key: str) -> dict | None:
        if not self.exists(key):
            return None
        return self.read_json(f"{key}/{MANIFEST}")

    def put_dir(self, local_dir: Path, key: str, meta: dict | None = None) -> dict:
        """Upload a directory; the manifest goes last. Leftovers of a crashed earlier attempt are removed first."""
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
        entries = [
            {"path": p.relative_to(local_dir).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in files
        ]
        manifest = {"key": key, "files": entries, "meta": meta or {}, "created": time.time()}
        dest = self.path(key)
        same_place = self.scheme == "file" and Path(dest).resolve() == local_dir.resolve()
        if not same_place:
            self.discard_partial(key, force=True)
            for p, e in zip(files, entries):
                target = f"{dest}/{e['path']}"
                with_retries(lambda p=p, target=target: self._put_file(p, target), f"uploading {self.uri(key)}/{e['path']}")
        self.write_json(f"{key}/{MANIFEST}", manifest)
        return manifest

    def _put_file(self, src: Path, target: str) -> None:
        if self.scheme == "file":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{target}.tmp-{os.getpid()}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
        else:
            self.fs.put_file(str(src), target)

    def staging_dir(self, key: str) -> Path:
        """A local directory to build an output in. For a local store it is a temporary sibling of
        the final directory, renamed into place by `commit_dir` (cheap and atomic)."""
        if self.scheme == "file":
            d = Path(self.path(key) + f".tmp-{os.getpid()}")
        else:
            d = self.cache_dir / "staging" / f"{key.replace('/', '_')}-{os.getpid()}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def commit_dir(self, staging: Path, key: str, meta: dict | None = None) -> dict:
        """Make a staged output visible: rename (local) or upload (remote), then write the manifest."""
        if self.scheme == "file":
            final = Path(self.path(key))
            if final.exists():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            manifest_tmp = staging / MANIFEST
            manifest_tmp.unlink(missing_ok=True)
            os.replace(staging, final)
            return self.put_dir(final, key, meta)
        manifest = self.put_dir(staging, key, meta)
        shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def discard_partial(self, key: str, force: bool = False) -> bool:
        """Remove an output that has files but no manifest (a crash mid-write). Returns True if removed."""
        dest = self.path(key)
        has_files = with_retries(lambda: self.fs.exists(dest), f"checking {self.uri(key)}")
        if has_files and (force or not self.exists(key)):
            with_retries(lambda: self.fs.rm(dest, recursive=True), f"removing partial {self.uri(key)}")
            return True
        return False

    def get_dir(self, key: str, verify: bool = True) -> Path:
        """A local directory holding a manifested output, verified against its manifest."""
        manifest = self.manifest(key)
        if manifest is None:
            raise StoreError(f"{self.uri(key)} is missing or incomplete (no {MANIFEST})")
        local = self.local_path(key)
        if local is None:
            local = self.cache_dir / key
            stamp = local / MANIFEST
            if not (stamp.exists() and json.loads(stamp.read_text())["created"] == manifest["created"]):
                if local.exists():
                    shutil.rmtree(local)
                for e in manifest["files"]:
                    target = local / e["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with_retries(
                        lambda e=e, target=target: self.fs.get_file(self.path(f"{key}/{e['path']}"), str(target)),
                        f"downloading {self.uri(key)}/{e['path']}",
                    )
                stamp.write_text(json.dumps(manifest))
        if verify:
            for e in manifest["files"]:
                p = local / e["path"]
                if not p.is_file() or p.stat().st_size != e["size"]:
                    raise StoreError(f"{self.uri(key)}/{e['path']}: size differs from its manifest")
        return local

    # -- small JSON records --------------------------------------------------------------------
    def write_json(self, key: str, obj: Any) -> str:
        blob = json.dumps(obj, indent=2, ensure_ascii=False, default=str).encode()
        target = self.path(key)

        def go():
            if self.scheme == "file":
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                tmp = f"{target}.tmp-{os.getpid()}"
                Path(tmp).write_bytes(blob)
                os.replace(tmp, target)
            else:
                with self.fs.open(target, "wb") as f:  # one PUT: atomic on S3
                    f.write(blob)

        with_retries(go, f"writing {self.uri(key)}")
        return self.uri(key)

    def read_json(self, key: str, default: Any = None) -> Any:
        target = self.path(key)
        if not with_retries(lambda: self.fs.exists(target), f"checking {self.uri(key)}"):
            return default

        def go():
            with self.fs.open(target, "rb") as f:
                return json.loads(f.read().decode())

        return with_retries(go, f"reading {self.uri(key)}")

    def put_file(self, src: Path, key: str) -> str:
        with_retries(lambda: self._put_file(Path(src), self.path(key)), f"uploading {self.uri(key)}")
        return self.uri(key)
