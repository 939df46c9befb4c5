"""The artifact store: fsspec over `file://` (default) or `s3://` (s3fs).

Every stage output is a directory under a key derived from the stage's inputs. Files go up first
and `MANIFEST.json` (file list, sizes, sha256) goes last, so an output is either complete or
invisible: readers trust only what a manifest lists and verify it. This module imports no
Prefect, so the ML core can use it on a bare GPU machine.

Runs that share a store (a nightly and a manual run, two workers, two configs sharing a dataset)
may write the same key at once. A complete output is never deleted or replaced: the first commit
wins and later writers of the key adopt it. On `file://` an output is built in a private staging
directory that already holds its manifest and is renamed into place (a rename onto an existing
directory fails, so it cannot replace one). On object stores each writer uploads into its own
`<key>/.data-<time>-<id>/` and commits with one conditional PUT of the manifest (`If-None-Match: *`,
honoured by AWS S3 and SeaweedFS); the manifest names that data directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec

from slmforge.store_calls import StoreError, with_retries

MANIFEST = "MANIFEST.json"
DATA_PREFIX = ".data-"
# An object-store writer's data directory that no manifest names is left alone this long (it may
# be another run's upload in progress), then treated as a crashed upload and removed.
STALE_UPLOAD_S = 6 * 3600


def content_hash(obj: Any, n: int = 16) -> str:
    """Stable short hash of a JSON-able object: the cache/output key of a stage."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _mismatch(local: Path, manifest: dict, full: bool) -> str | None:
    """The first file that does not match its manifest entry, as `path: what differs`."""
    for e in manifest["files"]:
        p = local / e["path"]
        if not p.is_file():
            return f"{e['path']}: missing although its manifest lists it"
        if p.stat().st_size != e["size"]:
            return f"{e['path']}: size differs from its manifest ({p.stat().st_size} != {e['size']} bytes)"
        if full and sha256_file(p) != e["sha256"]:
            return f"{e['path']}: sha256 differs from its manifest"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(parent: Path, prefix: str) -> None:
    """Remove `<prefix><pid>-<id>` staging leftovers of processes that no longer run (a crash mid-write)."""
    if not parent.is_dir():
        return
    for d in parent.glob(prefix + "*"):
        pid = d.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)


def _cached_copy_ok(local: Path, manifest: dict, check_sizes: bool = True) -> bool:
    """A local copy of this very output (its stamp: the manifest's creation time), complete by size."""
    stamp = local / MANIFEST
    try:
        if json.loads(stamp.read_text())["created"] != manifest["created"]:
            return False
    except (OSError, ValueError, KeyError):
        return False
    return not check_sizes or _mismatch(local, manifest, full=False) is None


def _writer_tag() -> str:
    """This writer's private suffix: the pid (for the crash sweep) and a random part (threads, hosts)."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _upload_age_s(name: str) -> float | None:
    """Seconds since an object-store writer's `.data-<unix time>-<id>` directory was started."""
    stamp = name[len(DATA_PREFIX):].split("-", 1)[0] if name.startswith(DATA_PREFIX) else ""
    return time.time() - int(stamp) if stamp.isdigit() else None


def _manifest_entries(local_dir: Path) -> tuple[list[Path], list[dict]]:
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    return files, [{"path": p.relative_to(local_dir).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
                   for p in files]


class ArtifactStore:
    def __init__(self, url: str, endpoint_url: str | None = None, cache_dir: str | Path | None = None):
        self.url = url.rstrip("/")
        scheme, _, rest = self.url.partition("://")
        self.scheme = scheme
        self.endpoint_url = None
        if scheme == "file":
            self.root = str(Path(rest).expanduser().resolve())
            self.fs = fsspec.filesystem("file")
        elif scheme == "s3":
            self.root = rest
            # One try per call in botocore and s3fs: `with_retries` is the one retry layer (backoff,
            # jitter, a bounded total), so a store that is down fails in seconds, not minutes.
            # No listings cache: other runs write the same store, and a cached listing taken during
            # another writer's upload made `exists()` deny its manifest afterwards (seen in CI: a
            # committed publish entry missing from the record). Every check asks the server.
            kwargs: dict[str, Any] = {"use_listings_cache": False, "config_kwargs": {
                "connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 1, "mode": "standard"}}}
            endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
            if endpoint:
                kwargs["client_kwargs"] = {"endpoint_url": endpoint}
                self.endpoint_url = endpoint
            self.fs = fsspec.filesystem("s3", **kwargs)
            self.fs.retries = 1  # s3fs's own retry loop (a class attribute, not an argument)
        else:
            self.root = rest
            self.fs = fsspec.filesystem(scheme)
        cache_root = os.environ.get("SLMFORGE_CACHE_DIR") or Path.home() / ".cache" / "slmforge"
        self.cache_dir = Path(cache_dir or Path(cache_root) / content_hash(self.url, 12))

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
        """Upload a directory (left in place) as one output and return the manifest that is live
        under the key: this one, or the one another writer committed first."""
        local_dir = Path(local_dir)
        if self.scheme == "file":
            return self.upload_dir(local_dir, key, meta)
        if (existing := self.manifest(key)) is not None:
            return existing
        data = f"{DATA_PREFIX}{int(time.time())}-{uuid.uuid4().hex[:12]}"
        files, entries = _manifest_entries(local_dir)
        try:
            for p, e in zip(files, entries):
                target = self.path(f"{key}/{data}/{e['path']}")
                with_retries(lambda p=p, target=target: self._put_file(p, target),
                             f"uploading {self.uri(key)}/{e['path']}")
            manifest = {"key": key, "data": data, "files": entries, "meta": meta or {}, "created": time.time()}
            blob = json.dumps(manifest, indent=2, ensure_ascii=False, default=str).encode()
            won = with_retries(lambda: self._create(f"{key}/{MANIFEST}", blob), f"committing {self.uri(key)}")
        except BaseException:
            self._forget(f"{key}/{data}")
            raise
        if won:
            return manifest
        self._forget(f"{key}/{data}")  # another writer committed first: its output stands
        return self.manifest(key)

    def _create(self, key: str, blob: bytes) -> bool:
        """Write an object only if it does not exist yet (one conditional PUT). False: it already existed."""
        try:
            self.fs.pipe_file(self.path(key), blob, mode="create")
            return True
        except Exception:
            # a 412 (SeaweedFS: EINVAL "pre-conditions ... did not hold") or FileExistsError; anything
            # else is re-raised for `with_retries` to judge
            self.fs.invalidate_cache(self.path(key))
            if self.fs.exists(self.path(key)):
                return False
            raise

    def _forget(self, key: str) -> None:
        """Best effort, one try: remove this writer's own uncommitted files. No manifest names them,
        so readers never see them; `discard_partial` removes them later if this fails."""
        try:
            self.fs.rm(self.path(key), recursive=True)
        except Exception:  # noqa: BLE001 - the store is down or the files are already gone
            pass

    def _put_file(self, src: Path, target: str) -> None:
        if self.scheme == "file":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{target}.tmp-{_writer_tag()}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
        else:
            self.fs.put_file(str(src), target)

    def staging_dir(self, key: str) -> Path:
        """A private local directory to build an output in. For a local store it is a sibling of the
        final directory, renamed into place by `commit_dir` (cheap and atomic)."""
        if self.scheme == "file":
            d = Path(self.path(key) + f".tmp-{_writer_tag()}")
            _sweep_stale(d.parent, Path(self.path(key)).name + ".tmp-")
        else:
            d = self.cache_dir / "staging" / f"{key.replace('/', '_')}-{_writer_tag()}"
            _sweep_stale(d.parent, key.replace("/", "_") + "-")
        d.mkdir(parents=True)
        return d

    def upload_dir(self, local_dir: Path, key: str, meta: dict | None = None) -> dict:
        """Copy a local directory (left in place) into the store as one manifested output."""
        if self.scheme == "file":
            staging = self.staging_dir(key)
            shutil.rmtree(staging)
            shutil.copytree(local_dir, staging, ignore=shutil.ignore_patterns(MANIFEST))
            return self.commit_dir(staging, key, meta)
        return self.put_dir(Path(local_dir), key, meta)

    def children(self, prefix: str) -> list[str]:
        """Names directly under a prefix that hold something ([] when there is none). On an object
        store only objects count: an emptied "directory" some servers keep listing is no output."""
        base = self.path(prefix)

        def go():
            try:
                if self.scheme == "file":  # not the writers' private `.tmp-` siblings
                    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
                    return [n for n in names if ".tmp-" not in n]
                self.fs.invalidate_cache(base)  # another process (an earlier attempt) may have written
                return list({p[len(base) + 1:].split("/", 1)[0] for p in self.fs.find(base)
                             if p.startswith(base + "/")})
            except FileNotFoundError:
                return []

        return sorted(with_retries(go, f"listing {self.uri(prefix)}"))

    def remove(self, key: str) -> None:
        """Delete an output (manifest first, so it never looks complete while half-deleted)."""
        target = self.path(key)
        if not with_retries(lambda: self.fs.exists(target), f"checking {self.uri(key)}"):
            return
        manifest = self.path(f"{key}/{MANIFEST}")
        if with_retries(lambda: self.fs.exists(manifest), f"checking {self.uri(key)}"):
            with_retries(lambda: self.fs.rm(manifest), f"removing {self.uri(key)}/{MANIFEST}")
        with_retries(lambda: self.fs.rm(target, recursive=True), f"removing {self.uri(key)}")

    def commit_dir(self, staging: Path, key: str, meta: dict | None = None) -> dict:
        """Make a staged output visible, or adopt the output another writer committed first (the
        staging directory is consumed either way). Returns the manifest live under the key."""
        if self.scheme != "file":
            try:
                return self.put_dir(staging, key, meta)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        final = Path(self.path(key))
        files, entries = _manifest_entries(staging)
        manifest = {"key": key, "files": entries, "meta": meta or {}, "created": time.time()}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str))
        final.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                os.rename(staging, final)  # fails if `final` exists and is not empty: never replaces
                return manifest
            except OSError:
                if self.exists(key):
                    shutil.rmtree(staging, ignore_errors=True)
                    return self.manifest(key)
                self.discard_partial(key)  # a crash of an older version left files without a manifest
        raise StoreError(f"committing {self.uri(key)}: {final} appeared again without a manifest")

    def discard_partial(self, key: str, force: bool = False) -> bool:
        """Remove what a crashed writer left under a key that has no manifest: on `file://` the whole
        directory (writers build elsewhere and rename, so it is no upload in progress); on an object
        store the writers' data directories older than STALE_UPLOAD_S, or all of them with `force`.
        A committed output is never touched. Returns True if something was removed."""
        if self.exists(key):
            return False
        dest = self.path(key)
        if self.scheme == "file":
            if Path(dest).exists():
                aside = Path(f"{dest}.tmp-{_writer_tag()}")
                os.replace(dest, aside)  # out of the way in one step, then deleted
                shutil.rmtree(aside, ignore_errors=True)
                return True
            return False
        removed = False
        for name in self.children(key):
            age = _upload_age_s(name)
            if force or age is None or age > STALE_UPLOAD_S:
                with_retries(lambda name=name: self.fs.rm(f"{dest}/{name}", recursive=True),
                             f"removing partial {self.uri(key)}/{name}")
                removed = True
        return removed

    def get_dir(self, key: str, verify: bool | str = True) -> Path:
        """A local directory holding a manifested output, verified against its manifest: sizes by
        default (cheap), sha256 too with `verify="full"`. A downloaded copy that fails the check
        (a damaged cache) is fetched again once before the mismatch is reported."""
        manifest = self.manifest(key)
        if manifest is None:
            raise StoreError(f"{self.uri(key)} is missing or incomplete (no {MANIFEST})")
        local = self.local_path(key)
        if local is not None:
            problem = _mismatch(local, manifest, full=verify == "full") if verify else None
            if problem:
                raise StoreError(f"{self.uri(key)}/{problem}")
            return local
        local = self.cache_dir / key
        for attempt in (1, 2):
            if not _cached_copy_ok(local, manifest, check_sizes=False):
                self._download(key, manifest, local)
            problem = _mismatch(local, manifest, full=verify == "full") if verify else None
            if not problem:
                return local
            shutil.rmtree(local, ignore_errors=True)
        raise StoreError(f"{self.uri(key)}/{problem}")

    def _download(self, key: str, manifest: dict, local: Path) -> None:
        """Into a private directory renamed into place, so another process reading the same cache
        never sees a half-written copy."""
        tmp = local.parent / f"{local.name}.tmp-{_writer_tag()}"
        _sweep_stale(local.parent, f"{local.name}.tmp-")
        src = f"{key}/{manifest['data']}" if manifest.get("data") else key
        try:
            for e in manifest["files"]:
                target = tmp / e["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                with_retries(
                    lambda e=e, target=target: self.fs.get_file(self.path(f"{src}/{e['path']}"), str(target)),
                    f"downloading {self.uri(key)}/{e['path']}",
                )
            (tmp / MANIFEST).write_text(json.dumps(manifest))  # the stamp: a complete copy
            if _cached_copy_ok(local, manifest):
                return  # another process put the same copy in place meanwhile, and may be reading it
            if local.exists():  # an older or damaged copy: moved aside in one step, then deleted
                aside = local.parent / f"{local.name}.tmp-{_writer_tag()}"
                try:
                    os.replace(local, aside)
                    shutil.rmtree(aside, ignore_errors=True)
                except OSError:
                    pass
            try:
                os.rename(tmp, local)
            except OSError:  # another process put its complete copy in place meanwhile
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- small JSON records --------------------------------------------------------------------
    def write_json(self, key: str, obj: Any) -> str:
        blob = json.dumps(obj, indent=2, ensure_ascii=False, default=str).encode()
        target = self.path(key)

        def go():
            if self.scheme == "file":
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                tmp = f"{target}.tmp-{_writer_tag()}"
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
