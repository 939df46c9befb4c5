"""The store's retention: the run record each finetune run keeps, and gc as a flow step.

The flow records itself as running when it starts (`begin`), each stage adds its outputs
(`tasks.caching.Stages`), and the end marks it completed; a failed or crashed run is marked by the
flow's hooks. `collect_garbage` then applies `retention` (slmforge.retention.collect).
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from slmforge import retention as RT
from slmforge.config import FinetuneConfig, RetentionConfig, StorageConfig
from slmforge.storage import ArtifactStore


def begin(storage: StorageConfig, run_id: str | None, name: str | None) -> str | None:
    return RT.begin_run(ArtifactStore.from_config(storage), run_id, name) if run_id else None


def finish(storage: StorageConfig, run_key: str | None, status: str = "completed") -> None:
    if run_key:
        RT.record_outputs(ArtifactStore.from_config(storage), run_key, [], status=status)


def mark_ended(flow, flow_run, state) -> None:
    """Flow hook (on_failure, on_crashed): a run that ended badly no longer counts as running, so
    gc does not keep protecting what was written since it started."""
    try:
        cfg = flow_run.parameters.get("cfg")
        cfg = cfg if isinstance(cfg, FinetuneConfig) else FinetuneConfig.model_validate(cfg or {})
        store = ArtifactStore.from_config(cfg.storage)
        for r in RT.runs(store):
            if r.get("run_id") == str(flow_run.id):
                RT.record_outputs(store, r["key"], [], status=state.name.lower())
    except Exception:  # noqa: BLE001 - a hook must not hide the run's own failure
        pass


@task(name="collect_garbage", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
def collect_garbage(retention: RetentionConfig, storage: StorageConfig, dry_run: bool = False) -> dict:
    """Remove what the retention settings do not keep; says what it freed."""
    logger = get_run_logger()
    result = RT.collect(ArtifactStore.from_config(storage), retention.keep_last_runs, retention.keep_published,
                        retention.min_age_hours, dry_run=dry_run, log=logger.info)
    create_markdown_artifact(key="store-gc", markdown=f"```\n{result.summary()}\n```",
                             description="What the store's retention removed")
    return {"removed": [o.key for o in result.removed], "freed_bytes": result.freed, "kept": result.kept}
