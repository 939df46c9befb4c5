"""What each process of a multi-process train stage runs: `python -m torch.distributed.run ... -m
tasks.train_ranks JOB.json` (the train stage starts it; on other nodes, the command it logs).

Each rank loads the 4-bit base on its own device (`device_map={"": local_rank}`: a whole replica
per GPU, never layers split over GPUs) and trains with DDP through the same `training.train` as a
single process; the trainer splits every optimizer step's batch over the ranks. Global rank 0 alone
writes: checkpoints to the store, then the adapter into the stage's staging directory and
`result.json`. A rank that fails writes `rank-N.error.json` (its exception's type and message) so
the stage can fail with that rank's error and retry as the one retry policy says.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from slmforge import modeling as M
from slmforge import runtime as R
from slmforge import training as T
from slmforge.checkpoints import checkpoint_prefix, checkpoint_uploader, restore_checkpoint
from slmforge.config import LoraSettings, ModelConfig, TrainConfig
from slmforge.records import read_jsonl
from slmforge.storage import ArtifactStore
from tasks import faults

PROGRESS = "slmforge-progress"  # rank 0's progress lines, read back by the train stage


def _progress(step: int, total: int, logs: dict | None) -> None:
    print(f"{PROGRESS} {json.dumps({'step': step, 'total': total, 'logs': logs})}", flush=True)


def run(job: dict) -> None:
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    node_rank = int(os.environ.get("GROUP_RANK", 0))
    model_cfg, train_cfg = ModelConfig(**job["model"]), TrainConfig(**job["train"])
    rt = R.for_config(model_cfg, train_cfg, local_rank=local_rank)
    if "gradient_checkpointing" in job:  # the launching stage's memory plan (tasks.train.fit_to_gpu_memory)
        rt = replace(rt, gradient_checkpointing=job["gradient_checkpointing"])
    if rt.on_gpu:
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(job["backend"])
    store = ArtifactStore(job["store"]["url"], job["store"].get("endpoint_url"))
    key = job["adapter_key"]
    work = store.cache_dir / "checkpoints" / key
    work.mkdir(parents=True, exist_ok=True)
    if node_rank > 0 and local_rank == 0:  # node 0's stage restored it already
        restore_checkpoint(store, checkpoint_prefix(key), work)
    data_dir = store.get_dir(job["dataset_key"])  # per node, into its own cache (atomic, shared by its ranks)
    model_dir = store.get_dir(job["quantized_key"])
    torch.distributed.barrier()
    upload = None
    if rank == 0:
        upload = checkpoint_uploader(store, key, work, job["micro_batch"], job["grad_accum"],
                                     log=lambda m: print(m, flush=True),
                                     after_upload=faults.after_checkpoint(job["resume_step"]))
    model = M.load_model(model_dir, "saved", rt)
    tokenizer = M.load_tokenizer(model_dir)
    hook = faults.in_training_step(model, job["attempt"], job["grad_accum"]) if rank == 0 else None
    if rank == 0:
        faults.at_model_loaded(job["attempt"], job["micro_batch"])
    peft_model, result = T.train(
        model, tokenizer, read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "validation.jsonl") or None,
        LoraSettings(**job["lora"]), train_cfg, work, progress=_progress if rank == 0 else None,
        micro_batch=job["micro_batch"], grad_accum=job["grad_accum"], save_steps=train_cfg.save_steps,
        on_checkpoint=upload, max_length=job.get("max_length"), rt=rt)
    if hook is not None:
        hook.remove()
    if rank == 0:
        staging = Path(job["staging"])
        T.save_adapter(peft_model, tokenizer, staging, result)
        (Path(job["result"])).write_text(json.dumps(result.to_dict()))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def read_job(where: str) -> dict:
    """The job file the stage wrote (this node), or its copy in the store (`<store>/jobs/<key>.json`,
    other nodes; the store's credentials and endpoint come from this node's environment)."""
    if "://" not in where:
        return json.loads(Path(where).read_text())
    url, key = where.rsplit("/jobs/", 1)
    return ArtifactStore(url).read_json(f"jobs/{key}")


def main(argv: list[str]) -> int:
    job = read_job(argv[0])
    try:
        run(job)
    except BaseException as exc:
        rank = os.environ.get("RANK", "?")
        error = {"rank": rank, "type": type(exc).__name__, "message": str(exc),
                 "transient": getattr(exc, "transient", None), "traceback": traceback.format_exc()}
        Path(job["errors"]).mkdir(parents=True, exist_ok=True)
        (Path(job["errors"]) / f"rank-{rank}.error.json").write_text(json.dumps(error))
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
