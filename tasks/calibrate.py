"""Stage 3b: calibration. Fit a temperature T, and with `calibrate.method: vector` a per-dimension
scale from 1/T, on the validation split's answers with the trained model (the adapter on the 4-bit
base), and fold it into a copy of the adapter's final norm; the merge, the evaluation and the Hub
push then all use that adapter (`slmforge/calibration.py` says why)."""

from __future__ import annotations

from prefect import get_run_logger, task

from slmforge import calibration as C
from slmforge import fingerprint as code_version
from slmforge import modeling as M
from slmforge.config import CalibrateConfig, EvalConfig, ModelConfig, StorageConfig
from slmforge.merging import load_trained
from slmforge.records import read_jsonl
from slmforge.runtime import for_config
from slmforge.storage import ArtifactStore, content_hash
from tasks.caching import STAGE_CACHE
from tasks.retry import gpu_retry, run_gpu_stage


def calibrated_key(adapter: dict, base: dict, dataset: dict, cfg: CalibrateConfig, eval_cfg: EvalConfig,
                   model_cfg: ModelConfig) -> str:
    """Everything that decides the calibrated adapter: the vector's pull and iterations only when the
    method is `vector` (a temperature run that changes them reuses its output); the batch, since it
    decides the padding and so the last bits of the fit."""
    settings = cfg.model_dump(exclude={"l2", "steps"} if cfg.method == "temperature" else None)
    return f"calibrated/{content_hash([adapter['key'], base['quantized']['key'], dataset['key'], settings, eval_cfg.batch_size, model_cfg.model_dump(), code_version.fingerprint()])}"


def run_calibration(adapter: dict, base: dict, dataset: dict, cfg: CalibrateConfig, eval_cfg: EvalConfig,
                    store: ArtifactStore, log=print, model_cfg: ModelConfig = ModelConfig()) -> dict:
    """The calibrated adapter's record (`calibrated/<key>`, with the trained adapter's metadata and
    `calibration`), or the trained adapter's own record when calibration is off or has no data."""
    if not cfg.enabled:
        log("calibrate.enabled=false: the adapter is merged and published as trained")
        return adapter
    records = read_jsonl(store.get_dir(dataset["key"]) / "validation.jsonl")[:cfg.items]
    if not records:
        log("no validation split: no temperature fitted; the adapter is merged and published as trained")
        return adapter
    key = calibrated_key(adapter, base, dataset, cfg, eval_cfg, model_cfg)
    if not store.exists(key):
        adapter_dir = store.get_dir(adapter["key"])
        rt = for_config(model_cfg)
        model = load_trained(store.get_dir(base["quantized"]["key"]), adapter_dir, rt)
        try:
            pad = M.load_tokenizer(adapter_dir).pad_token_id
            if cfg.method == "vector":
                fit = C.fit_vector(model, records, eval_cfg.batch_size, pad, cfg.l2, cfg.steps)
                folded = C.fold_vector(model, fit.pop("scale"), records[0]["input_ids"])
            else:
                fit = C.fit_temperature(model, records, eval_cfg.batch_size, pad)
                folded = C.fold_temperature(model, fit["temperature"], records[0]["input_ids"])
        finally:
            del model
            M.free_memory()
        staging = store.staging_dir(key)
        C.write_calibrated_adapter(adapter_dir, staging, folded)
        meta = {k: v for k, v in adapter.items() if k not in ("key", "uri")}
        meta.update(trained_adapter=adapter["key"],
                    calibration={**fit, "module": folded["module"], "form": folded["form"]})
        store.commit_dir(staging, key, meta=meta)
    meta = store.manifest(key)["meta"]
    log(f"{C.describe(meta['calibration'])}; calibrated adapter: {store.uri(key)}")
    return {"key": key, "uri": store.uri(key), **meta}


@task(name="calibrate", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json", **gpu_retry())
def calibrate(adapter: dict, base: dict, dataset: dict, model: ModelConfig, calibrate: CalibrateConfig,
              eval: EvalConfig, storage: StorageConfig) -> dict:
    return run_gpu_stage(run_calibration, adapter, base, dataset, calibrate, eval, ArtifactStore.from_config(storage),
                         get_run_logger().info, model)
