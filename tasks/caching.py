"""Cache policy and result storage shared by the stages.

`INPUTS + TASK_SOURCE + CodeVersion()` (no run id) makes an unchanged stage a cache hit on the
next night, and a retried flow resume at the stage that failed; a change to the core code or the
ML libraries is a new run (TASK_SOURCE alone hashes only the decorated function). Results (the
small JSON records) live in the same store as the artifacts, so wiping the store also forgets the
cache, and a worker on another machine that shares an S3 store shares the cache too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from slmforge import fingerprint as code_version
from slmforge.config import StorageConfig
from slmforge.data import DataError, local_files


@dataclass
class CodeVersion(CachePolicy):
    """Adds the fingerprint of the project's code and the ML libraries' versions to the key, the
    same one the stages put in their store keys: a fix in the core is not served old results."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters, **kwargs) -> str | None:
        return code_version.fingerprint()


STAGE_CACHE = INPUTS + TASK_SOURCE + CodeVersion()


@dataclass
class DataFiles(CachePolicy):
    """Adds the bytes of a local or bundled data source to the key: one changed row, a new run."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters, **kwargs) -> str | None:
        data = inputs.get("data")
        try:
            files = local_files(getattr(data, "source", ""))
        except DataError:  # an unknown bundled name: validation says so, the cache has nothing to hash
            return None
        if files is None:
            return None
        h = hashlib.sha256()
        for f in files:
            h.update(f.read_bytes() if f.is_file() else b"missing")
        return h.hexdigest()


def result_storage(storage: StorageConfig):
    """A saved filesystem block under `<store>/prefect-results` for the tasks' persisted records.

    Prefect requires result storage to be a block saved server-side; its name is derived from the
    store URL so every run on the same store shares it. Credentials stay in the environment.
    """
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    from slmforge.storage import ArtifactStore, content_hash

    store = ArtifactStore.from_config(storage)
    if store.scheme == "file":
        block = LocalFileSystem(basepath=store.path("prefect-results"))
    else:
        settings = {"client_kwargs": {"endpoint_url": storage.endpoint_url}} if storage.endpoint_url else {}
        block = RemoteFileSystem(basepath=store.uri("prefect-results"), settings=settings)
    block.save(f"slmforge-results-{content_hash(store.url, 10)}", overwrite=True)
    return block
