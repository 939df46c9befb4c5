"""The step before any cache: pin the data and the base model to what they are now.

Never cached and quick (hashes of local files, one HEAD per object, one Hub API call per repo). Its
result is an input of the stages, so their cache keys follow the data, not its name: tonight's rows
at the same S3 path, a new commit on a Hub branch, an edited file in a directory are a new run.
"""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from slmforge import identity as ID
from slmforge.config import FinetuneConfig
from slmforge.storage import ArtifactStore
from tasks.dataset import object_fs


def pin_inputs(cfg: FinetuneConfig, store: ArtifactStore) -> dict:
    """{"data": identity, "model": identity}; DataError / ModelSourceError naming the setting."""
    return {"data": ID.data_identity(cfg.data, object_fs=lambda uri: object_fs(uri, store)),
            "model": ID.model_identity(cfg.model)}


@task(name="resolve_inputs", cache_policy=NO_CACHE, retries=0)
def resolve_inputs(cfg: FinetuneConfig) -> dict:
    logger = get_run_logger()
    inputs = pin_inputs(cfg, ArtifactStore.from_config(cfg.storage))
    logger.info("data: %s; base model: %s", inputs["data"]["label"], inputs["model"]["label"])
    return inputs


def unchanged_since(dataset: dict, store: ArtifactStore) -> str:
    """When the cached dataset was prepared (its output's commit time), for "no new data since …"."""
    created = (store.manifest(dataset["key"]) or {}).get("created")
    return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(created)) if created else "an earlier run"
