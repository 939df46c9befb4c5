"""Cache policy and result storage shared by the stages.

`INPUTS + TASK_SOURCE + CodeVersion()` (no run id) makes an unchanged stage a cache hit on the
next night, and a retried flow resume at the stage that failed; a change to the core code or the
ML libraries is a new run (TASK_SOURCE alone hashes only the decorated function). Results (the
small JSON records) live in the same store as the artifacts, so wiping the store also forgets the
cache, and a worker on another machine that shares an S3 store shares the cache too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from slmforge import fingerprint as code_version
from slmforge.config import StorageConfig


@dataclass
class CodeVersion(CachePolicy):
    """Adds the fingerprint of the project's code and the ML libraries' versions to the key, the
    same one the stages put in their store keys: a fix in the core is not served old results."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters, **kwargs) -> str | None:
        return code_version.fingerprint()


STAGE_CACHE = INPUTS + TASK_SOURCE + CodeVersion()


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


class Stages:
    """Runs the flow's cached stages. A cache hit whose outputs are gone from the store (removed by
    gc, or by hand) runs the stage again instead of passing on a missing path; each stage's outputs
    go into the run's record (slmforge.retention), which is what gc keeps. `cached[name]` says
    which stages were served from the cache."""

    def __init__(self, storage: StorageConfig, run_key: str | None, log):
        from slmforge.storage import ArtifactStore

        self.results = result_storage(storage)
        self.store = ArtifactStore.from_config(storage)
        self.run_key, self.log = run_key, log
        self.cached: dict[str, bool] = {}

    def __call__(self, stage):
        from slmforge.retention import present, record_outputs, references

        def run(*args, **kwargs):
            state = stage.with_options(result_storage=self.results)(*args, return_state=True, **kwargs)
            record = state.result()
            cached = state.name == "Cached"
            if cached and (gone := sorted(k for k in references(record) if not present(self.store, k))):
                self.log(f"{stage.name}: its cached result names {', '.join(gone)}, no longer in the store: "
                         "computing it again")
                state = stage.with_options(result_storage=self.results, refresh_cache=True)(
                    *args, return_state=True, **kwargs)
                record, cached = state.result(), False
            self.cached[stage.name] = cached
            if self.run_key:
                record_outputs(self.store, self.run_key, record)
            return record

        return run
