"""What a run reads, pinned: each input resolved to an immutable identity before any cache is asked.

A nightly run names moving things: a path an upstream job rewrites, an S3 object refreshed in
place, a Hub branch that gets new commits. A cache keyed on those names would serve yesterday's
data. So the data and the base model are resolved first (seconds, never cached):

- local files and directories (`bundled:`, a path, `file://`, `hf:<dir>`): by their bytes;
- object-store files (`s3://…`, any fsspec URL): by what the store says identifies a version
  (ETag and size, the version id where the bucket versions objects);
- Hub datasets and models: by the commit sha their revision points to; the readers then read
  that sha, not the branch.

The identity is a small JSON-able dict: `version` (one string that changes with the input), `label`
(how the report and the model card name it) and what it was derived from. The stages take it as
an input, so Prefect's cache key follows it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

from slmforge.config import DataConfig, ModelConfig
from slmforge.readers import DataError

HUB_SHA_LEN = 40


def _sha256(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, once per process per (size, time): a local model's weights are hashed once."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def files_identity(paths: list[Path], root: Path | None = None) -> tuple[str, list[dict]]:
    """(digest, entries) of local files by their bytes; a directory counts every file under it
    but hidden ones (`.git`, `.cache`), which `datasets` does not read either."""
    entries = []
    for p in paths:
        if p.is_dir():
            for f in sorted(x for x in p.rglob("*") if x.is_file() and not _is_hidden(x.relative_to(p))):
                entries.append({"path": str(f.relative_to(root or p)), "size": f.stat().st_size, "sha256": _sha256(f)})
        elif p.is_file():
            entries.append({"path": str(p.relative_to(root)) if root else p.name, "size": p.stat().st_size,
                            "sha256": _sha256(p)})
        else:
            entries.append({"path": str(p), "missing": True})
    digest = hashlib.sha256(repr([(e["path"], e.get("sha256")) for e in entries]).encode()).hexdigest()
    return digest, entries


def object_identity(fs, path: str) -> dict:
    """What an object store says identifies this version of an object: ETag, size and, on a
    versioned bucket, the version id. Raises what the filesystem raises (the caller names the URL)."""
    info = fs.info(path)
    etag = str(info.get("ETag") or info.get("etag") or info.get("md5") or "").strip('"')
    entry = {"path": path, "size": info.get("size"), "etag": etag or None}
    if info.get("VersionId") or info.get("version_id"):
        entry["version_id"] = info.get("VersionId") or info.get("version_id")
    if not etag and not entry.get("version_id"):  # a filesystem with no version marker: the bytes are
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        entry["sha256"] = h.hexdigest()
    return entry


def hub_commit(repo_id: str, revision: str | None, repo_type: str, endpoint: str | None = None,
               token: str | None = None) -> str:
    """The commit sha a Hub revision (branch, tag or sha; `main` when None) points to now."""
    from huggingface_hub import HfApi

    if revision and len(revision) == HUB_SHA_LEN and all(c in "0123456789abcdef" for c in revision):
        return revision  # already a commit: immutable
    api = HfApi(endpoint=endpoint, token=token)
    info = (api.dataset_info if repo_type == "dataset" else api.model_info)(repo_id, revision=revision or "main")
    if not info.sha:
        raise ValueError(f"the Hub gave no commit sha for {repo_id}@{revision or 'main'}")
    return info.sha


def _short(version: str) -> str:
    return version[:12]


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def data_identity(cfg: DataConfig, object_fs=None) -> dict:
    """The identity of `data.source` (and of `data.hf_data_files`). `object_fs(url) -> (fs, path)`
    gives the filesystem for an object-store URL (the store's own for its scheme, so its endpoint
    and credentials apply). Raises DataError naming `data.source` when it cannot be read."""
    from slmforge.data import bundled_files

    source = cfg.source.strip()
    out: dict[str, Any] = {"source": source}
    try:
        if source.startswith("bundled:"):
            files, _ = bundled_files(source)
            digest, entries = files_identity(files, files[0].parent)
            out.update(kind="bundled", version=digest, files=entries)
        elif source.startswith("hf:"):
            out.update(_hf_identity(source[3:], cfg, object_fs))
        elif "://" in source and not source.startswith("file://"):
            if object_fs is None:
                import fsspec

                fs, path = fsspec.core.url_to_fs(source)
            else:
                fs, path = object_fs(source)
            entry = object_identity(fs, path)
            version = entry.get("version_id") or f"{entry['etag'] or entry.get('sha256')}:{entry['size']}"
            out.update(kind="object", version=version, files=[entry])
        else:
            path = Path(source.removeprefix("file://")).expanduser()
            if not path.exists():
                raise DataError(f"data.source: file not found: {path}")
            digest, entries = files_identity([path], path.parent if path.is_file() else path)
            out.update(kind="dir" if path.is_dir() else "file", version=digest, files=entries)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - fsspec, s3fs and huggingface_hub raise many types
        raise DataError(f"data.source: cannot read {source}: {_describe(e)}") from None
    out["label"] = label(out)
    return out


def _hf_identity(name: str, cfg: DataConfig, object_fs) -> dict:
    local = Path(name).expanduser()
    if local.is_dir():
        digest, entries = files_identity([local])
        return {"kind": "dir", "version": digest, "files": entries}
    if cfg.hf_data_files:  # a packaged builder (json, csv, parquet) over the named files
        files = [cfg.hf_data_files] if isinstance(cfg.hf_data_files, str) else list(cfg.hf_data_files)
        entries = []
        for f in files:
            if "://" in f:
                import fsspec

                fs, path = object_fs(f) if object_fs else fsspec.core.url_to_fs(f)
                entries.append(object_identity(fs, path))
            else:
                p = Path(f).expanduser()
                if not p.is_file():
                    raise DataError(f"data.hf_data_files: file not found: {p}")
                entries.append({"path": str(p), "size": p.stat().st_size, "sha256": _sha256(p)})
        digest = hashlib.sha256(repr(entries).encode()).hexdigest()
        return {"kind": "files", "version": digest, "files": entries}
    if "/" not in name:  # a packaged builder with no files: nothing that can change
        return {"kind": "builder", "version": name}
    sha = hub_commit(name, cfg.hf_revision, "dataset", token=os.environ.get("HF_TOKEN") or None)
    return {"kind": "hub", "version": sha, "revision": sha, "requested_revision": cfg.hf_revision or "main"}


def model_identity(model: ModelConfig) -> dict:
    """The identity of `model.source`: a bundled or local model by its files' bytes, a Hub id by the
    commit its revision points to (loaders then read that commit). Raises ModelSourceError."""
    from slmforge.modeling import ModelSourceError, resolve_source

    src = resolve_source(model.source, model.revision)
    out: dict[str, Any] = {"source": model.source}
    try:
        if src.kind == "hub":
            sha = hub_commit(src.location, src.revision, "model", token=os.environ.get("HF_TOKEN") or None)
            out.update(kind="hub", version=sha, revision=sha, requested_revision=src.revision or "main")
        else:
            root = Path(src.location)
            files = [root / src.gguf_file] if src.gguf_file else [root]
            digest, entries = files_identity(files, root)
            out.update(kind=src.kind, version=digest, files=entries)
    except Exception as e:  # noqa: BLE001
        raise ModelSourceError(f"model.source: cannot resolve {model.source!r}"
                               f"{f' at revision {model.revision!r}' if model.revision else ''}: {_describe(e)}") from None
    out["label"] = label(out)
    return out


def label(identity: dict) -> str:
    """How a report or a model card names an input: `<source>` at `<commit / etag / sha256>`."""
    kind, version = identity.get("kind"), str(identity.get("version", "?"))
    what = {"hub": "commit", "object": "version"}.get(kind, "sha256")
    return f"`{identity['source']}` at {what} `{_short(version) if kind != 'object' else version}`"
