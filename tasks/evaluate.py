"""Stage 5: the base, the trained and the published model on the held-out split; report, charts, samples.

Names, everywhere in reports, tables and charts: `base` (before fine-tuning), `trained` (the adapter
on the 4-bit base: what training produced), `published` (the merged model the publish stage pushes
and the gate judges)."""

from __future__ import annotations

import json
import platform

import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from slmforge import fingerprint as code_version
from slmforge import modeling as M
from slmforge import report as R
from slmforge.config import EvalConfig, ModelConfig, StorageConfig
from slmforge.records import read_jsonl
from slmforge.evaluation import evaluate_model
from slmforge.calibration import describe as describe_calibration
from slmforge.merging import describe_check, load_trained
from slmforge.runtime import for_config
from tasks.caching import STAGE_CACHE
from tasks import faults
from tasks.retry import gpu_retry, run_gpu_stage
from slmforge.storage import ArtifactStore, content_hash


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers
    import trl

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "trl": trl.__version__, "bitsandbytes": bitsandbytes.__version__}


def hardware() -> dict:
    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
    import os

    return {"device": f"CPU ({platform.processor() or platform.machine()})", "cpu_threads": torch.get_num_threads(),
            "cores": os.cpu_count()}


def run_evaluation(dataset: dict, base: dict, merged: dict, adapter: dict, cfg: EvalConfig, store: ArtifactStore,
                   log=print, run_config: dict | None = None, model_cfg: ModelConfig = ModelConfig()) -> dict:
    key = f"eval/{content_hash([dataset['key'], base['base']['key'], merged['key'], cfg.model_dump(), model_cfg.model_dump(), code_version.fingerprint()])}"
    if store.exists(key):
        return {"key": key, "uri": store.uri(key), **store.manifest(key)["meta"]}
    test = read_jsonl(store.get_dir(dataset["key"]) / "test.jsonl")
    rt = for_config(model_cfg)
    log(f"runtime: {rt.describe()}")
    candidates = [("base", lambda: M.load_model(store.get_dir(base["base"]["key"]), "weights", rt))]
    if cfg.adapter_on_4bit:
        candidates.append(("trained", lambda: load_trained(store.get_dir(base["quantized"]["key"]),
                                                           store.get_dir(adapter["key"]), rt)))
    candidates.append(("published", lambda: M.load_model(store.get_dir(merged["key"]), "weights", rt)))
    tokenizer = M.load_tokenizer(store.get_dir(merged["key"]))
    # The base's answers depend only on the base, the test split, generation and the code: a run that
    # changes only training (another seed, learning rate, epochs) reuses them instead of generating again.
    base_key = (f"eval/base/{content_hash([dataset['key'], base['base']['key'], cfg.max_new_tokens, cfg.batch_size, cfg.generation_batch_size, cfg.seed, model_cfg.model_dump(), code_version.fingerprint()])}"
                ".json")
    results = {}
    for name, load in candidates:
        if name == "base" and (cached := store.read_json(base_key)) is not None:
            log(f"base: reusing its evaluation on the same test split ({store.uri(base_key)})")
            results[name] = cached
            continue
        model = load()
        log(f"evaluating {name} on {len(test)} held-out questions")
        results[name] = evaluate_model(model, tokenizer, test, cfg.max_new_tokens, cfg.batch_size, cfg.seed,
                                       generation_batch_size=cfg.generation_batch_size)
        if name == "base":
            store.write_json(base_key, results[name])
        del model
        M.free_memory()
    summaries = {n: r["summary"]["overall"] for n, r in results.items()}
    staging = store.staging_dir(key)
    R.loss_chart(adapter.get("loss_curve") or json.loads(
        (store.get_dir(adapter["key"]) / "train_metrics.json").read_text())["loss_curve"], staging / "loss_curve.png")
    R.bars_chart(results, staging / "key_accuracy_by_part.png", "by_part")
    R.bars_chart(results, staging / "key_accuracy_by_category.png", "by_category")
    faults.kill_point("evaluate", store.cache_dir, log)
    table = R.comparison_rows(summaries)
    samples = R.samples_table(results, cfg.samples)
    report = {
        "summary": {n: r["summary"] for n, r in results.items()},
        "items": {n: r["items"] for n, r in results.items()},
        "generation": {"do_sample": False, "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.generation_batch_size,
                       "seed": cfg.seed, "dtype": rt.weights_dtype},
        "runtime": rt.to_dict(),
        "dataset": {"key": dataset["key"], "fingerprint": dataset["fingerprint"], "source": dataset["source"],
                    "identity": dataset.get("identity")},
        "model_identity": base["base"].get("identity"),
        "model": base["base"]["source"],
        "config": run_config,
        "merge": merged.get("merge"),
        "merge_check": merged.get("merge_check"),
        "train": adapter.get("train"),
        "calibration": adapter.get("calibration"),
        "versions": versions(),
        "hardware": hardware(),
    }
    (staging / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    md = markdown_report(report, table, results, samples)
    (staging / "report.md").write_text(md, encoding="utf-8")
    meta = {"summary": {n: r["summary"] for n, r in results.items()}, "table": table, "samples": samples,
            "primary": dataset.get("primary_metric") or cfg.primary_metric, "base_evaluation": base_key}
    store.commit_dir(staging, key, meta=meta)
    return {"key": key, "uri": store.uri(key), **meta}


def markdown_report(report: dict, table: list[dict], results: dict, samples: list[dict]) -> str:
    t = report.get("train") or {}
    return "\n\n".join([
        "# slmforge fine-tune report",
        f"Model {(report.get('model_identity') or {}).get('label') or '`' + report['model']['location'] + '`'}; "
        f"data {(report['dataset'].get('identity') or {}).get('label') or '`' + report['dataset']['source'] + '`'} "
        f"(fingerprint `{report['dataset']['fingerprint']}`); "
        f"{t.get('steps', '?')} steps, final train loss {t.get('train_loss', '?')}.",
        "Models: `base` before fine-tuning; `trained`, the adapter on the 4-bit base (what training produced, "
        "with its calibration); `published`, the merged model that is published and that the gate judges.",
        *([f"Calibration: {describe_calibration(report['calibration'])}; folded into the adapter's "
           f"`{report['calibration']['module']}`."] if report.get("calibration") else []),
        "## Before / after (held-out split)", R.markdown_table(table),
        *([f"## Published model against the trained model\n\nMerged into the "
           f"{(report.get('merge') or {}).get('into', '?')} base, saved in {(report.get('merge') or {}).get('dtype', '?')} "
           f"and reloaded; {describe_check(report['merge_check'])}."] if report.get("merge_check") else []),
        "## Key accuracy per test part", R.markdown_table(R.group_table(results, "by_part")),
        *[f"### All metrics, test part `{part}`\n\n" + R.markdown_table(R.comparison_rows(
            {n: r["summary"]["by_part"][part] for n, r in results.items()}))
          for part in results[next(iter(results))]["summary"]["by_part"]],
        "## Key accuracy per category", R.markdown_table(R.group_table(results, "by_category")),
        "![loss curve](loss_curve.png)\n\n![by part](key_accuracy_by_part.png)\n\n"
        "![by category](key_accuracy_by_category.png)",
        "## Samples", R.markdown_table(samples),
        "## Reproduce", f"Generation: `{json.dumps(report['generation'])}`\n\nVersions: `{json.dumps(report['versions'])}`"
        f"\n\nHardware: `{json.dumps(report['hardware'])}`",
    ])


@task(name="evaluate", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json", **gpu_retry())
def evaluate(dataset: dict, base: dict, merged: dict, adapter: dict, model: ModelConfig, eval: EvalConfig,
             storage: StorageConfig, run_config: dict | None = None) -> dict:
    logger = get_run_logger()
    store = ArtifactStore.from_config(storage)
    record = run_gpu_stage(run_evaluation, dataset, base, merged, adapter, eval, store, logger.info, run_config, model)
    create_table_artifact(key="before-after", table=record["table"], description="Held-out metrics: base, trained (adapter on 4-bit), published (merged)")
    create_table_artifact(key="samples", table=record["samples"], description="Side-by-side answers")
    create_markdown_artifact(key="finetune-report", markdown=(
        f"Report: `{record['uri']}/report.md`\n\n" + R.markdown_table(record["table"])),
        description="Fine-tune evaluation report")
    return record
