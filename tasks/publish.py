"""Stage 6: the quality gate, then the model card and adapter to the Hub (or, with no Hub repo
configured, a dry run into the store's `published/` prefix)."""

from __future__ import annotations

import shutil

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from slmforge import publishing as P
from slmforge.config import FinetuneConfig
from tasks.caching import STAGE_CACHE
from tasks.storage import ArtifactStore, content_hash

RECORD = "published/record.json"


def run_publish(cfg: FinetuneConfig, dataset: dict, base: dict, adapter: dict, evaluation: dict,
                store: ArtifactStore, run_name: str | None = None, log=print) -> dict:
    primary = cfg.eval.primary_metric
    summary = evaluation["summary"]
    tuned, before = summary["fine-tuned"]["overall"].get(primary), summary["base"]["overall"].get(primary)
    record = store.read_json(RECORD, default={"published": {}, "latest": None})
    target = cfg.publish.hub_repo or "dry-run"
    last = (record.get("latest") or {}).get(target, {}).get("primary_value") if isinstance(record.get("latest"), dict) else None
    ok, reason = P.gate(primary, tuned, before, cfg.eval.min_improvement, last)
    result_hash = content_hash([adapter["key"], evaluation["key"], target, cfg.publish.revision])
    out = {"published": False, "reason": reason, "primary": primary, "base": before, "fine_tuned": tuned,
           "content_hash": result_hash, "target": target}
    if not ok:
        log(reason)
        return out
    if result_hash in record["published"]:
        prev = record["published"][result_hash]
        log(f"already published as {prev['location']}: nothing to do")
        return {**out, "published": True, "reason": "already published", **prev}
    key = f"published/{result_hash}"
    staging = store.staging_dir(key)
    adapter_dir = store.get_dir(adapter["key"])
    for f in adapter_dir.iterdir():
        if f.is_file() and f.name not in ("MANIFEST.json",):
            shutil.copy2(f, staging / f.name)
    eval_dir = store.get_dir(evaluation["key"])
    for name in ("report.md", "report.json", "loss_curve.png", "key_accuracy_by_part.png",
                 "key_accuracy_by_category.png"):
        shutil.copy2(eval_dir / name, staging / name)
    card = P.model_card(
        repo_id=cfg.publish.hub_repo, base_model=base["base"]["source"]["location"] if base["base"]["source"]["kind"] == "hub"
        else cfg.model.source, licence=base["base"]["source"].get("licence"), metrics_rows=evaluation["table"],
        summary_tuned=summary["fine-tuned"], primary=primary, config=cfg.model_dump(exclude={"storage"}),
        fingerprint=dataset["fingerprint"], flow_run=run_name, dataset=dataset["source"])
    (staging / "README.md").write_text(card, encoding="utf-8")
    if cfg.publish.hub_repo:
        token = P.hub_token(cfg.publish.token_secret_block)
        message = f"slmforge {run_name or 'run'}: {primary} {before:.3f} -> {tuned:.3f}"
        commit = P.push(staging, cfg.publish.hub_repo, token, cfg.publish.hub_endpoint, cfg.publish.private,
                        cfg.publish.revision, message)
        location = f"{cfg.publish.hub_endpoint.rstrip('/')}/{cfg.publish.hub_repo}/commit/{commit}"
        shutil.rmtree(staging, ignore_errors=True)
        entry = {"location": location, "commit": commit}
    else:
        store.commit_dir(staging, key, meta={"content_hash": result_hash})
        entry = {"location": store.uri(key), "commit": None}
    entry.update({"primary": primary, "primary_value": tuned, "adapter": adapter["key"], "flow_run": run_name})
    record["published"][result_hash] = entry
    record["latest"] = {**(record.get("latest") or {}), target: entry}
    store.write_json(RECORD, record)  # last: a failed push leaves the record unchanged
    log(f"published to {entry['location']}" + ("" if cfg.publish.hub_repo else " (dry run: no Hub repo configured)"))
    return {**out, "published": True, **entry}


@task(name="publish", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json",
      retries=2, retry_delay_seconds=10)
def publish(cfg: FinetuneConfig, dataset: dict, base: dict, adapter: dict, evaluation: dict) -> dict:
    """Cached like the other stages; on a cache miss the store's published record still makes a
    repeat of the same result a no-op."""
    logger = get_run_logger()
    store = ArtifactStore.from_config(cfg.storage)
    result = run_publish(cfg, dataset, base, adapter, evaluation, store, flow_run.get_name(), logger.info)
    create_markdown_artifact(
        key="publish",
        markdown=(f"**Published** to `{result['location']}`" if result["published"] else f"**{result['reason']}**")
        + f"\n\n{result['primary']}: base {result['base']}, fine-tuned {result['fine_tuned']}",
        description="Quality gate and publish decision",
    )
    return result
