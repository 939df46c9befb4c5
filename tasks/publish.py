"""Stage 6: the quality gate, then the adapter, tokenizer, report and model card to the Hub (or, with
no Hub repo configured, a dry run into the store's `published/` prefix).

Idempotent: each result's content hash names its output `published/<hash>/`, whose manifest says
where it went (the Hub commit); the same result again is a no-op that says so. The output is
committed last, so a push that fails after its retries records nothing; runs that publish at once
each commit their own entry (`slmforge.publish_record`). The token is never logged nor written anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from slmforge import publish_record
from slmforge import publishing as P
from slmforge.config import FinetuneConfig
from slmforge.storage import MANIFEST, ArtifactStore, content_hash, sha256_file
from tasks.caching import STAGE_CACHE
from tasks.retry import retry_transient
from tasks.secrets import hub_token_source

RECORD = publish_record.INDEX
EVAL_FILES = ("report.md", "report.json", "loss_curve.png", "key_accuracy_by_part.png",
              "key_accuracy_by_category.png")
ADAPTER_SKIP = {MANIFEST, "README.md"}  # peft's template card is replaced by ours
MERGED_DIR = "merged"
PublishError = P.PublishError


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link when the store is on this filesystem (a merged model costs no copy), else copy.
    A staged file is never written in place afterwards (that would change the store's file too):
    an existing one is unlinked first, and redaction replaces files instead of editing them."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_tree(src_dir: Path, dst_dir: Path, skip: set[str]) -> list[str]:
    names = []
    for f in sorted(src_dir.rglob("*")):
        rel = f.relative_to(src_dir)
        if f.is_file() and rel.as_posix() not in skip:
            _link_or_copy(f, dst_dir / rel)
            names.append(rel.as_posix())
    return names


def _point_adapter_at(config_file: Path, base_ref: str) -> None:
    """peft wrote the training machine's store path as the adapter's base: name the base the model
    card names, so `AutoPeftModelForCausalLM.from_pretrained(repo)` finds it. Replaces the staged file
    (a hard link into the store) instead of writing through it."""
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_ref
    config_file.unlink()
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def result_hash(cfg: FinetuneConfig, adapter: dict, evaluation: dict, merged: dict | None) -> str:
    """What identifies one published result: the adapter, its evaluation, the destination, and the
    merged model when it is pushed too. Not the flow run: the same result from another run is the same."""
    pub = cfg.publish
    target = [pub.hub_endpoint.rstrip("/"), pub.hub_repo, pub.revision] if pub.hub_repo else ["dry-run"]
    return content_hash([adapter["key"], evaluation["key"], target,
                         merged["key"] if pub.push_merged and merged else None])


def run_publish(cfg: FinetuneConfig, dataset: dict, base: dict, adapter: dict, evaluation: dict,
                store: ArtifactStore, run_name: str | None = None, log=print, *, merged: dict | None = None,
                run_id: str | None = None, run_url: str | None = None) -> dict:
    """Gate, stage, push (or dry-run), record. Returns a JSON-able record without any secret."""
    pub = cfg.publish
    summary = evaluation["summary"]
    # `auto` was resolved when the data was read; a dataset record from before that is resolved here
    primary = dataset.get("primary_metric") or cfg.eval.primary_metric
    if primary == "auto":
        primary = "key_accuracy" if summary["base"]["overall"].get("key_accuracy") is not None else "chrf"
    # the gate judges the model that is published: the merged one
    candidate, before = summary["published"]["overall"].get(primary), summary["base"]["overall"].get(primary)
    target = pub.hub_repo or "dry-run"
    record = publish_record.record(store)
    h = result_hash(cfg, adapter, evaluation, merged)
    out = {"published": False, "reason": "", "primary": primary, "base": before, "published_model": candidate,
           "content_hash": h, "target": target}

    if h in record["published"]:
        prev = record["published"][h]
        reason = f"already published as {prev['location']}: nothing to do"
        log(reason)
        return {**out, **prev, "published": True, "reason": reason}

    last_entry = record["latest"].get(target) or {}
    last = last_entry.get("primary_value") if last_entry.get("primary") == primary else None
    ok, reason = P.gate(primary, candidate, before, cfg.eval.min_improvement, last)
    out["reason"] = reason
    if not ok:
        log(reason)
        return out
    if pub.push_merged and not (merged and merged.get("key")):
        raise PublishError("publish.push_merged is set but no merged model record was passed to publish")

    token, token_source = (None, "")
    if pub.hub_repo:
        token, token_source = hub_token_source(pub.token_secret_block)
        if not token:
            raise PublishError(f"publish.hub_repo: {pub.hub_repo} is set but no Hub token was found "
                               f"({token_source})")
    secrets = [token, os.environ.get("HF_TOKEN")]

    src = base["base"]["source"]
    base_id = P.base_model_id(src, cfg.model.source)
    licence = src.get("licence")
    if licence is None and pub.hub_repo and src.get("kind") == "hub" and base_id:
        licence = P.base_licence(base_id, pub.hub_endpoint, token)
    run_info = {"name": run_name, "id": run_id, "url": run_url}
    key = f"published/{h}"
    staging = store.staging_dir(key)
    try:
        _copy_tree(store.get_dir(adapter["key"]), staging, ADAPTER_SKIP)
        _point_adapter_at(staging / "adapter_config.json", base_id or cfg.model.source)
        eval_dir = store.get_dir(evaluation["key"])
        for name in EVAL_FILES:
            _link_or_copy(eval_dir / name, staging / name)
        if pub.push_merged:
            _copy_tree(store.get_dir(merged["key"]), staging / MERGED_DIR, {MANIFEST})
        card = P.model_card(
            repo_id=pub.hub_repo, base_model=base_id, base_label=cfg.model.source, licence=licence,
            metrics_rows=evaluation["table"], summaries=summary, primary=primary,
            config=P.redact(cfg.model_dump(mode="json", exclude={"storage"}), secrets),
            fingerprint=dataset["fingerprint"], dataset=dataset["source"], flow_run=run_info,
            data_identity=dataset.get("identity"), model_identity=base["base"].get("identity"),
            train=adapter.get("train"), calibration=adapter.get("calibration"), merged=pub.push_merged, revision=pub.revision, content_hash=h,
            bundled_note=(f"Trained from slmforge's bundled GGUF build of `{base_id}` (`{cfg.model.source}`, "
                          f"dequantized), so results with the original weights may differ slightly."
                          if src.get("kind") == "gguf" and base_id else None))
        (staging / "README.md").unlink(missing_ok=True)
        (staging / "README.md").write_text(P.redact_text(card, secrets), encoding="utf-8")
        fixed = P.scrub_folder(staging, secrets)
        if fixed:
            log(f"redacted a secret from {', '.join(fixed)} before publishing")
        files = {p.relative_to(staging).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(staging.rglob("*")) if p.is_file()}

        entry = {"target": target, "primary": primary, "primary_value": candidate, "base_value": before, "adapter": adapter["key"],
                 "evaluation": evaluation["key"], "merged": merged["key"] if pub.push_merged else None,
                 "flow_run": run_name, "flow_run_id": run_id, "published_at": time.time()}
        if pub.hub_repo:
            message = P.commit_message(pub.commit_message, run_name, primary, before, candidate)
            pushed = P.push(
                staging, pub.hub_repo, token, pub.hub_endpoint, pub.private, pub.revision, message,
                description=f"slmforge result {h}" + (f", Prefect flow run {run_name}" if run_name else ""),
                # a merged model left by an earlier push must not sit next to a newer adapter
                delete_patterns=None if pub.push_merged else [f"{MERGED_DIR}/*"],
                token_source=token_source, log=log)
            entry.update({"location": pushed["commit_url"], "commit": pushed["commit"], "repo_id": pub.hub_repo,
                          "endpoint": pub.hub_endpoint, "revision": pub.revision, "private": pub.private,
                          "commit_message": message})
            # The store keeps the card and the list of what was pushed, not a second copy of the weights.
            for p in sorted(staging.iterdir()):
                if p.name != "README.md":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            (staging / "pushed_files.json").write_text(json.dumps(files, indent=2))
        else:
            entry.update({"location": store.uri(key), "commit": None})
        entry = P.redact(entry, secrets)
        # last: a failed push records nothing; a run that published the same result meanwhile wins
        entry = store.commit_dir(staging, key, meta={"content_hash": h, **entry})["meta"]
        entry.pop("content_hash", None)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    publish_record.write_index(store)
    log(f"published to {entry['location']}" + ("" if pub.hub_repo else " (dry run: no Hub repo configured)"))
    return P.redact({**out, "published": True, **entry}, secrets)


def _run_info() -> tuple[str | None, str | None, str | None]:
    try:
        name, run_id = flow_run.get_name(), flow_run.get_id()
    except Exception:  # noqa: BLE001
        return None, None, None
    try:
        url = flow_run.ui_url
    except Exception:  # noqa: BLE001 - no UI configured
        url = None
    return name, run_id, url


@task(name="publish", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json",
      retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def publish(cfg: FinetuneConfig, dataset: dict, base: dict, adapter: dict, evaluation: dict,
            merged: dict | None = None) -> dict:
    """Cached like the other stages; on a cache miss the store's published record still makes a
    repeat of the same result a no-op. Pass `merged` (the merge stage's record) for push_merged."""
    logger = get_run_logger()
    store = ArtifactStore.from_config(cfg.storage)
    name, run_id, url = _run_info()
    result = run_publish(cfg, dataset, base, adapter, evaluation, store, name, logger.info,
                         merged=merged, run_id=run_id, run_url=url)
    create_markdown_artifact(
        key="publish",
        markdown=(f"**Published** to `{result['location']}`" if result["published"] else f"**{result['reason']}**")
        + f"\n\n{result['primary']}: base {result['base']}, published model {result['published_model']}",
        description="Quality gate and publish decision",
    )
    return result
