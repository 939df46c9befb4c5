"""Stage 3: QLoRA training on the quantized base; adapter, metrics and loss curve to the store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import task_run as current_task_run

from slmforge import fingerprint as code_version
from slmforge import modeling as M
from slmforge import runtime as R
from slmforge import training as T
from slmforge.checkpoints import (checkpoint_prefix, checkpoint_uploader, one_trainer_per_machine,  # noqa: F401
                                  restore_checkpoint, store_checkpoints)
from slmforge.config import LoraSettings, ModelConfig, TrainConfig, StorageConfig
from slmforge.model_shape import ModelShape
from slmforge.records import read_jsonl
from slmforge.report import loss_chart
from tasks import faults
from tasks.caching import STAGE_CACHE
from tasks.gpu import gpu_slot
from tasks.retry import crash_on_device_error, fresh_failure, gpu_retry, is_out_of_memory, is_transient
from tasks.train_ranks import PROGRESS
from slmforge.storage import ArtifactStore, StoreError, content_hash

# task-run id -> how many times an attempt ran out of memory (retries run in the same process)
_OOM_HALVINGS: dict[str, int] = {}
MIN_MICRO_BATCH = 1



class TrainingMemoryError(RuntimeError):
    """Out of memory even at the smallest micro-batch: retrying cannot help (not retried)."""

    retryable = False


def micro_batch_after_ooms(cfg: TrainConfig, halvings: int) -> tuple[int, int]:
    """Halve the micro-batch and double accumulation per out-of-memory retry: same effective batch.
    The micro-batch is kept a divisor of train.batch_size (6 -> 3 -> 1), so the product is exact."""
    target = max(MIN_MICRO_BATCH, cfg.batch_size >> halvings)
    micro = max(d for d in range(MIN_MICRO_BATCH, target + 1) if cfg.batch_size % d == 0)
    return micro, cfg.grad_accum * (cfg.batch_size // micro)


def adapter_key(dataset: dict, base: dict, lora: LoraSettings, cfg: TrainConfig) -> str:
    """Derived from everything that changes the adapter (the code and libraries too); how often it
    checkpoints does not."""
    settings = cfg.model_dump(exclude={"save_steps", "node_rank", "rdzv_endpoint"})
    if cfg.packing:  # packed rows are data.max_length tokens long, even where no record was cut
        settings["pack_length"] = dataset.get("max_length")
    parts = [dataset["train_fingerprint"], base["quantized"]["key"], lora.model_dump(), settings,
             code_version.fingerprint()]
    return f"adapters/{content_hash(parts)}"


def fit_to_gpu_memory(store: ArtifactStore, base: dict, dataset: dict, lora: LoraSettings, cfg: TrainConfig,
                      rt: R.Runtime, micro: int, accum: int, halvings: int, log=print, hw: R.Hardware | None = None):
    """`runtime.plan_memory` for this model on this GPU: each out-of-memory retry halves the largest
    micro-batch it may choose. Returns (micro, accum, runtime with the chosen checkpointing)."""
    config = json.loads((store.get_dir(base["quantized"]["key"]) / "config.json").read_text())
    share = micro * accum
    plan = R.plan_memory(ModelShape.from_config(config), hw or R.Hardware.probe(), micro_batch=micro, grad_accum=accum,
                         cap=max(MIN_MICRO_BATCH, share >> halvings), seq_len=dataset.get("max_length") or 512,
                         lora_r=lora.r, checkpointing=cfg.gradient_checkpointing,
                         label_smoothing=cfg.label_smoothing)
    log(f"memory plan: {plan.reason}")
    rt = replace(rt, gradient_checkpointing=plan.gradient_checkpointing,
                 reasons={**rt.reasons, "gradient_checkpointing": plan.reason})
    return plan.micro_batch, plan.grad_accum, rt


def run_training(dataset: dict, base: dict, model_cfg: ModelConfig, lora: LoraSettings, cfg: TrainConfig,
                 store: ArtifactStore, progress=None, halvings: int = 0, log=print, attempt: int = 1) -> dict:
    """Train (or resume) the adapter and commit it to the store: in this process, or with
    `train.processes`/`nnodes` in several, launched by torchrun (`launch_ranks`). Checkpoints go to
    `checkpoints/<adapter key>/checkpoint-N/` every `cfg.save_steps` steps, and a re-run with the same
    inputs, here or on another machine, resumes from the newest complete one. A second run of the same
    inputs on this machine waits for the first and returns the adapter it committed."""
    key = adapter_key(dataset, base, lora, cfg)
    if store.exists(key):
        return {"key": key, "uri": store.uri(key), **store.manifest(key)["meta"]}
    work = store.cache_dir / "checkpoints" / key  # local working copy; the store holds the durable one
    with one_trainer_per_machine(work, log):
        if store.exists(key):  # committed by the run this one waited for
            return {"key": key, "uri": store.uri(key), **store.manifest(key)["meta"]}
        return _train_and_commit(key, work, dataset, base, model_cfg, lora, cfg, store, progress, halvings, log,
                                 attempt)


def _train_and_commit(key: str, work: Path, dataset: dict, base: dict, model_cfg: ModelConfig, lora: LoraSettings,
                      cfg: TrainConfig, store: ArtifactStore, progress, halvings: int, log, attempt: int) -> dict:
    """`run_training`'s body, under the adapter's lock."""
    micro, accum = micro_batch_after_ooms(cfg, halvings)
    plan = R.plan_processes(cfg, micro_batch=micro)
    if plan.distributed:
        micro, accum = plan.micro_batch, plan.grad_accum
        log(f"processes: {plan.reason} ({plan.backend})")
    work.mkdir(parents=True, exist_ok=True)
    resume_step = restore_checkpoint(store, checkpoint_prefix(key), work, log)
    rt = R.for_config(model_cfg, cfg)
    if rt.on_gpu:  # the micro-batch and checkpointing the free GPU memory allows, same effective batch
        micro, accum, rt = fit_to_gpu_memory(store, base, dataset, lora, cfg, rt, micro, accum, halvings, log)
    log(f"runtime: {rt.describe()}")
    if plan.distributed:
        staging = store.staging_dir(key)
        job = {"adapter_key": key, "dataset_key": dataset["key"], "quantized_key": base["quantized"]["key"],
               "model": model_cfg.model_dump(), "lora": lora.model_dump(), "train": cfg.model_dump(),
               "store": {"url": store.url, "endpoint_url": store.endpoint_url}, "backend": plan.backend,
               "micro_batch": micro, "grad_accum": accum, "max_length": dataset.get("max_length"),
               "gradient_checkpointing": rt.gradient_checkpointing,
               "resume_step": resume_step, "attempt": attempt, "staging": str(staging),
               "result": str(work / "result.json"), "errors": str(work / "errors")}
        try:
            result = T.TrainResult(**launch_ranks(job, plan, cfg, store, work, log, progress))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        loss_chart(result.loss_curve, staging / "loss_curve.png")
    else:
        data_dir = store.get_dir(dataset["key"])
        model_dir = store.get_dir(base["quantized"]["key"])
        upload = checkpoint_uploader(store, key, work, micro, accum, log=log,
                                     after_upload=faults.after_checkpoint(resume_step))
        model = M.load_model(model_dir, "saved", rt)
        tokenizer = M.load_tokenizer(model_dir)
        fault_hook = faults.in_training_step(model, attempt, accum, log)
        try:
            faults.at_model_loaded(attempt, micro)
            peft_model, result = T.train(model, tokenizer, read_jsonl(data_dir / "train.jsonl"),
                                         read_jsonl(data_dir / "validation.jsonl") or None, lora, cfg, work,
                                         progress=progress, micro_batch=micro, grad_accum=accum,
                                         save_steps=cfg.save_steps, on_checkpoint=upload,
                                         max_length=dataset.get("max_length"), rt=rt)
            staging = store.staging_dir(key)
            T.save_adapter(peft_model, tokenizer, staging, result)
            loss_chart(result.loss_curve, staging / "loss_curve.png")
            del peft_model
        finally:
            if fault_hook is not None:
                fault_hook.remove()
            del model
            M.free_memory()
    train = {k: v for k, v in result.to_dict().items() if k != "loss_curve"}
    train.update(oom_retries=halvings, effective_batch=micro * accum * result.world_size, attempt=attempt)
    meta = {"train": train, "fingerprint": dataset["fingerprint"]}
    store.commit_dir(staging, key, meta=meta)
    try:  # the adapter is in: its checkpoints are no longer needed
        store.remove(checkpoint_prefix(key))
    except StoreError as e:
        log(f"could not remove the checkpoints of {key}: {e}")
    shutil.rmtree(work, ignore_errors=True)
    log(f"adapter: {store.uri(key)}")
    return {"key": key, "uri": store.uri(key), **meta}


class RankError(RuntimeError):
    """A training process failed with an error that has no retry meaning; the message names the rank."""


# What a failed rank's error becomes in the stage, so the one retry policy judges it as if it had
# been raised here (an OOM shrinks the micro-batch, a CUDA error crashes the run, ...).
_RANK_ERRORS = {"OutOfMemoryError": torch.OutOfMemoryError, "MemoryError": MemoryError,
                "AcceleratorError": torch.AcceleratorError, "TrainingMemoryError": TrainingMemoryError}


def rank_failure(errors: Path, returncode: int, tail: list[str]) -> BaseException:
    """The error of the first rank that failed (its own file), or torchrun's last lines."""
    found = sorted((json.loads(p.read_text()) for p in Path(errors).glob("rank-*.error.json")),
                   key=lambda e: str(e["rank"]))
    if not found:
        return RankError(f"torchrun exited {returncode} with no rank error recorded:\n" + "\n".join(tail[-15:]))
    e = found[0]
    message = f"rank {e['rank']}: {e['type']}: {e['message']}"
    if e["type"] == "StoreError":
        return StoreError(message, transient=bool(e.get("transient")))
    return _RANK_ERRORS.get(e["type"], RankError)(message)


def torchrun_command(plan: R.ProcessPlan, cfg: TrainConfig, job: str, node_rank: int | None = None) -> list[str]:
    """PyTorch's elastic launcher for this node (or, with `node_rank`, for another node)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={plan.per_node}",
           f"--nnodes={cfg.nnodes}", "--tee=3"]  # each rank's lines prefixed [default<rank>]:
    if cfg.nnodes == 1:
        cmd.append("--standalone")  # a rendezvous on a free local port
    else:
        cmd += [f"--node-rank={cfg.node_rank if node_rank is None else node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={cfg.rdzv_endpoint}", f"--rdzv-id={Path(job).stem}"]
    return cmd + ["-m", "tasks.train_ranks", job]


def launch_ranks(job: dict, plan: R.ProcessPlan, cfg: TrainConfig, store: ArtifactStore, work: Path, log,
                 progress) -> dict:
    """Run the ranks under torchrun and wait: their output goes to `log` line by line (rank 0's
    progress to `progress`); a failed rank fails the stage with its own error. Returns rank 0's
    TrainResult as a dict; the adapter is in job["staging"]."""
    shutil.rmtree(job["errors"], ignore_errors=True)
    Path(job["result"]).unlink(missing_ok=True)
    job_file = work / "job.json"
    job_file.write_text(json.dumps(job))
    if cfg.nnodes > 1:  # the other nodes read the same job from the store
        job_key = f"jobs/{job['adapter_key'].split('/')[-1]}.json"
        store.write_json(job_key, job)
        for node in range(cfg.nnodes):
            if node != cfg.node_rank:
                other = torchrun_command(plan, cfg, store.uri(job_key), node_rank=node)
                log(f"node {node} of {cfg.nnodes} runs: {' '.join(other[1:])}")
    env = {**os.environ, faults.LAUNCHER_ENV: str(os.getpid()), "TQDM_DISABLE": "1"}
    if plan.backend == "gloo":  # share this machine's cores between the ranks
        env.setdefault("OMP_NUM_THREADS", str(max(1, torch.get_num_threads() // plan.per_node)))
    cmd = torchrun_command(plan, cfg, str(job_file))
    log(f"launching {plan.world} training processes: {' '.join(cmd[1:])}")
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if PROGRESS in line:
                p = json.loads(line.split(PROGRESS, 1)[1])
                if progress:
                    progress(p["step"], p["total"], p["logs"])
                continue
            tail = (tail + [line])[-40:]
            if line.strip():
                log(line)
    if proc.returncode != 0:
        raise rank_failure(Path(job["errors"]), proc.returncode, tail)
    return json.loads(Path(job["result"]).read_text())


def memory_advice(cfg: TrainConfig, lora: LoraSettings, base: dict, store: ArtifactStore, max_tokens: int) -> str:
    """What would fit, from the memory estimator: micro-batch 1 with and without gradient checkpointing
    against this device's memory. Best effort: an empty string when it cannot be estimated."""
    try:
        from slmforge.memory import GB, ModelShape, qlora_training_bytes

        config = json.loads((store.get_dir(base["quantized"]["key"]) / "config.json").read_text())
        shape = ModelShape.from_config(config)
        est = {checkpointing: qlora_training_bytes(shape, r=lora.r, target_modules=lora.target_modules,
                                                   seq_len=max_tokens, batch_size=1,
                                                   gradient_checkpointing=checkpointing,
                                                   full_logits=cfg.label_smoothing > 0)["total"] / GB
               for checkpointing in (False, True)}
        have = ""
        if torch.cuda.is_available():
            have = f"; this GPU has {torch.cuda.get_device_properties(0).total_memory / GB:.1f} GB"
        return (f" The memory estimator puts micro-batch 1 x {max_tokens} tokens at {est[False]:.2f} GB without "
                f"and {est[True]:.2f} GB with gradient checkpointing{have}.")
    except Exception:  # noqa: BLE001
        return ""


@task(name="train_qlora", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json",
      **gpu_retry())
def train_qlora(dataset: dict, base: dict, model: ModelConfig, lora: LoraSettings, train: TrainConfig,
                storage: StorageConfig) -> dict:
    """Retried on transient faults only. On out of memory the retry halves the micro-batch and doubles
    accumulation (same effective batch) down to micro-batch 1, then fails saying what would fit.
    A retry or a re-run resumes from the newest checkpoint in the store."""
    logger = get_run_logger()
    store = ArtifactStore.from_config(storage)
    run_id = str(current_task_run.id)
    attempt = current_task_run.run_count or 1
    halvings = _OOM_HALVINGS.get(run_id, 0)
    micro, accum = micro_batch_after_ooms(train, halvings)
    if attempt > 1:
        logger.info("attempt %d: micro-batch %d x accumulation %d", attempt, micro, accum)
    artifact = create_progress_artifact(progress=0.0, description="QLoRA training steps")
    last = {"pct": -1}

    def progress(step: int, total: int, logs: dict | None) -> None:
        if logs:
            logger.info("step %d/%d loss %.4f lr %.2e", step, total, logs["loss"], logs.get("learning_rate", 0))
        pct = 5 * (100 * step // max(total, 1) // 5)  # 20 updates: each one is a call to the Prefect API
        if pct != last["pct"]:
            last["pct"] = pct
            update_progress_artifact(artifact_id=artifact, progress=pct)

    failure: BaseException | None = None
    try:
        with gpu_slot(), crash_on_device_error():
            record = run_training(dataset, base, model, lora, train, store, progress,
                                  halvings=halvings, log=logger.info, attempt=attempt)
    except Exception as exc:
        if not is_transient(exc):
            traceback.clear_frames(exc.__traceback__)
            raise
        # A retry runs in this same process. The exception's traceback holds the failed attempt's
        # model, optimizer and batch (and clearing its frames is not enough: measured, the model
        # stayed alive), so it is not kept: a fresh exception of the same kind carries the message.
        failure = fresh_failure(exc)
    if failure is not None:
        M.free_memory()
        if not is_out_of_memory(failure):
            raise failure
        if micro <= MIN_MICRO_BATCH:
            tokens = dataset.get("stats", {}).get("train", {}).get("max_tokens") or 512
            raise TrainingMemoryError(
                f"train.batch_size: out of memory even at micro-batch {micro} x accumulation {accum} "
                f"(gradient checkpointing {'on' if R.for_config(model, train).gradient_checkpointing else 'off'})."
                f"{memory_advice(train, lora, base, store, tokens)} Turn on train.gradient_checkpointing, lower "
                "data.max_length or lora.r, or use a larger GPU.")
        _OOM_HALVINGS[run_id] = halvings + 1
        nxt, nxt_accum = micro_batch_after_ooms(train, halvings + 1)
        logger.warning("out of memory at micro-batch %d x accumulation %d; the retry uses micro-batch %d x "
                       "accumulation %d (effective batch %d unchanged)", micro, accum, nxt, nxt_accum, nxt * nxt_accum)
        raise failure
    _OOM_HALVINGS.pop(run_id, None)
    t = record["train"]
    logger.info("trained %d steps (%.2f epochs) in %.0fs, final train loss %.4f, adapter %s, micro-batch %d x "
                "accumulation %d%s", t["steps"], t["epochs"], t["seconds"], t["train_loss"], t["adapter_dtype"],
                t["micro_batch"], t["grad_accum"],
                f", resumed from step {t['resumed_from_step']}" if t.get("resumed_from_step") else "")
    return record
