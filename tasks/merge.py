"""Stage 4: merge the adapter into the base it was trained on, then check that the saved, reloaded
model (what gets published) reproduces the trained model (the adapter on the 4-bit base)."""

from __future__ import annotations

import shutil

import torch

from prefect import get_run_logger, task

from slmforge import fingerprint as code_version
from slmforge import merging as G
from slmforge import modeling as M
from slmforge.config import EvalConfig, MergeConfig, ModelConfig, StorageConfig
from slmforge.records import read_jsonl
from slmforge.runtime import for_config
from tasks.caching import STAGE_CACHE
from tasks import faults
from tasks.retry import gpu_retry, run_gpu_stage
from slmforge.storage import ArtifactStore, content_hash


def check_records(store: ArtifactStore, dataset: dict, n: int) -> list[dict]:
    """Held-out prompts for the check: validation first (the test split stays for evaluation)."""
    data_dir = store.get_dir(dataset["key"])
    records = read_jsonl(data_dir / "validation.jsonl") or read_jsonl(data_dir / "test.jsonl")
    return records[:n]


def run_merge(adapter: dict, base: dict, dataset: dict, cfg: MergeConfig, eval_cfg: EvalConfig,
              store: ArtifactStore, log=print, model_cfg: ModelConfig = ModelConfig()) -> dict:
    # everything that decides the merged weights and the check's figures (greedy answers depend on the batch's padding)
    key = f"merged/{content_hash([adapter['key'], base['quantized']['key'], base['base']['key'], cfg.model_dump(), model_cfg.model_dump(), eval_cfg.max_new_tokens, eval_cfg.batch_size, code_version.fingerprint()])}"
    if not store.exists(key):
        staging = store.staging_dir(key)
        quantized_dir, adapter_dir = store.get_dir(base["quantized"]["key"]), store.get_dir(adapter["key"])
        trained = published = None
        rt = for_config(model_cfg)
        log(f"merging into the {cfg.into} base; runtime: {rt.describe()}")
        try:
            info = G.merge(quantized_dir, store.get_dir(base["base"]["key"]), adapter_dir, staging, cfg.into,
                           save_dtype=rt.weights_torch_dtype if rt.on_gpu else torch.bfloat16, rt=rt)
            tokenizer = M.load_tokenizer(adapter_dir)
            tokenizer.save_pretrained(staging)
            faults.kill_point("merge", store.cache_dir, log)
            # the check reads the files that will be committed, both sides in float32 on rt's device
            check_rt = G.check_runtime(rt)
            published = M.load_model(staging, "weights", check_rt)
            trained = G.load_trained(quantized_dir, adapter_dir, check_rt)
            check = G.check_published(trained, published, tokenizer, check_records(store, dataset, cfg.check_items),
                                      eval_cfg.max_new_tokens, eval_cfg.batch_size, cfg.max_logit_diff,
                                      cfg.min_answer_agreement)
        finally:
            del trained, published
            M.free_memory()
        if not check["within_tolerance"]:
            if cfg.into == "quantized":
                shutil.rmtree(staging, ignore_errors=True)
                raise G.MergeError(f"merge: the published model does not reproduce the trained model: "
                                   f"{G.describe_check(check)}; not published (merge.max_logit_diff, "
                                   "merge.min_answer_agreement set the tolerances)")
            log(f"merge.into=original: the published model differs from the trained one, as expected when "
                f"merging into the original weights: {G.describe_check(check)}")
        # what it was merged from: compare measures a merged model in 4-bit as it was trained and is
        # served (these on the 4-bit base), not by quantizing the merged weights again
        trained_from = {"adapter": adapter["key"], "quantized_base": base["quantized"]["key"]}
        store.commit_dir(staging, key, meta={"merge": info, "merge_check": check, "runtime": rt.to_dict(),
                                             "trained_from": trained_from})
    meta = store.manifest(key)["meta"]
    log(f"merged model: {store.uri(key)}; {G.describe_check(meta['merge_check'])}")
    return {"key": key, "uri": store.uri(key), **meta}


@task(name="merge_adapter", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json",
      **gpu_retry())
def merge_adapter(adapter: dict, base: dict, dataset: dict, model: ModelConfig, merge: MergeConfig,
                  eval: EvalConfig, storage: StorageConfig) -> dict:
    return run_gpu_stage(run_merge, adapter, base, dataset, merge, eval, ArtifactStore.from_config(storage),
                         get_run_logger().info, model)
