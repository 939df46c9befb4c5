"""Stage 3: QLoRA training on the quantized base; adapter, metrics and loss curve to the store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import task_run as current_task_run

from slmforge import modeling as M
from slmforge import training as T
from slmforge.config import LoraSettings, ModelConfig, TrainConfig, StorageConfig
from slmforge.data import read_jsonl
from slmforge.report import loss_chart
from tasks.caching import STAGE_CACHE
from tasks.retry import gpu_retry
from tasks.storage import ArtifactStore, content_hash

# task-run id -> how many times an attempt ran out of memory (retries run in the same process)
_OOM_HALVINGS: dict[str, int] = {}
MIN_MICRO_BATCH = 1


def micro_batch_after_ooms(cfg: TrainConfig, halvings: int) -> tuple[int, int]:
    """Halve the micro-batch and double accumulation per out-of-memory retry: same effective batch."""
    micro = max(MIN_MICRO_BATCH, cfg.batch_size >> halvings)
    return micro, cfg.grad_accum * (cfg.batch_size // micro)


def run_training(dataset: dict, base: dict, model_cfg: ModelConfig, lora: LoraSettings, cfg: TrainConfig,
                 store: ArtifactStore, progress=None, halvings: int = 0, log=print) -> dict:
    key = f"adapters/{content_hash([dataset['fingerprint'], base['quantized']['key'], lora.model_dump(), cfg.model_dump()])}"
    if store.exists(key):
        return {"key": key, "uri": store.uri(key), **store.manifest(key)["meta"]}
    data_dir = store.get_dir(dataset["key"])
    train_recs = read_jsonl(data_dir / "train.jsonl")
    val_recs = read_jsonl(data_dir / "validation.jsonl")
    model_dir = store.get_dir(base["quantized"]["key"])
    micro, accum = micro_batch_after_ooms(cfg, halvings)
    work = store.cache_dir / "checkpoints" / key  # survives a retry: training resumes from here
    work.mkdir(parents=True, exist_ok=True)
    compute = M.resolve_compute_dtype(model_cfg.compute_dtype)
    model = M.load_model(model_dir, "saved", compute_dtype=compute, attn=M.resolve_attn(model_cfg.attn_implementation))
    tokenizer = M.load_tokenizer(model_dir)
    try:
        peft_model, result = T.train(model, tokenizer, train_recs, val_recs or None, lora, cfg, work,
                                     progress=progress, micro_batch=micro, grad_accum=accum)
        staging = store.staging_dir(key)
        T.save_adapter(peft_model, tokenizer, staging, result)
        loss_chart(result.loss_curve, staging / "loss_curve.png")
    finally:
        del model
        M.free_memory()
    meta = {"train": {k: v for k, v in result.to_dict().items() if k != "loss_curve"},
            "fingerprint": dataset["fingerprint"]}
    store.commit_dir(staging, key, meta=meta)
    shutil.rmtree(work, ignore_errors=True)
    log(f"adapter: {store.uri(key)}")
    return {"key": key, "uri": store.uri(key), **meta}


@task(name="train_qlora", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json",
      **gpu_retry())
def train_qlora(dataset: dict, base: dict, model: ModelConfig, lora: LoraSettings, train: TrainConfig,
                storage: StorageConfig) -> dict:
    logger = get_run_logger()
    store = ArtifactStore.from_config(storage)
    run_id = str(current_task_run.id)
    artifact = create_progress_artifact(progress=0.0, description="QLoRA training steps")
    last = {"pct": -1}

    def progress(step: int, total: int, logs: dict | None) -> None:
        if logs:
            logger.info("step %d/%d loss %.4f lr %.2e", step, total, logs["loss"], logs.get("learning_rate", 0))
        pct = round(100 * step / max(total, 1))
        if pct != last["pct"]:
            last["pct"] = pct
            update_progress_artifact(artifact_id=artifact, progress=pct)

    try:
        record = run_training(dataset, base, model, lora, train, store, progress,
                              halvings=_OOM_HALVINGS.get(run_id, 0), log=logger.info)
    except Exception as exc:
        if "out of memory" in str(exc).lower():
            _OOM_HALVINGS[run_id] = _OOM_HALVINGS.get(run_id, 0) + 1
            micro, accum = micro_batch_after_ooms(train, _OOM_HALVINGS[run_id])
            logger.warning("out of memory; the retry uses micro-batch %d x accumulation %d", micro, accum)
        M.free_memory()
        raise
    t = record["train"]
    logger.info("trained %d steps (%.2f epochs) in %.0fs, final train loss %.4f, adapter %s", t["steps"],
                t["epochs"], t["seconds"], t["train_loss"], t["adapter_dtype"])
    return record
