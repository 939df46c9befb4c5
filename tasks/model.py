"""Stage 2: resolve the base model, materialise it once as safetensors, quantize it to 4-bit NF4
and save the quantized checkpoint so training loads it without quantizing again."""

from __future__ import annotations

import time

from prefect import get_run_logger, task

from slmforge import fingerprint as code_version
from slmforge import modeling as M
from slmforge import runtime as R
from slmforge.config import ModelConfig, StorageConfig
from tasks.caching import STAGE_CACHE
from tasks.gpu import gpu_slot
from tasks.retry import crash_on_device_error, gpu_retry
from slmforge.storage import ArtifactStore, content_hash


def base_key(model: ModelConfig, identity: dict | None = None) -> str:
    """Follows the model's pinned identity (its files' bytes, its Hub commit), not only its name."""
    version = (identity or {}).get("version")
    return f"models/base/{content_hash([model.source, model.revision, version, code_version.fingerprint()])}"


def materialise_base(model: ModelConfig, store: ArtifactStore, log=print, identity: dict | None = None) -> dict:
    """`identity` (slmforge.identity.model_identity): a Hub model is read at the commit it pinned."""
    src = M.resolve_source(model.source, (identity or {}).get("revision") or model.revision)
    key = base_key(model, identity)
    if not store.exists(key):
        log(f"materialising {model.source} into {store.uri(key)}")
        staging = store.staging_dir(key)
        info = M.materialise(src, staging)
        store.commit_dir(staging, key, meta={"source": src.describe(), **info})
    return {"key": key, "uri": store.uri(key), "source": src.describe(), **store.manifest(key)["meta"]}


def quantize_base(model: ModelConfig, base: dict, store: ArtifactStore, log=print) -> dict:
    rt = R.for_config(model)
    settings = {"base": base["key"], "4bit": model.load_in_4bit, "quant_type": model.quant_type,
                "double_quant": model.double_quant, "quant_storage": model.quant_storage,
                "compute": rt.compute_dtype, "weights": rt.weights_dtype,
                "device": rt.device, "attn": rt.attn}
    key = f"models/quantized/{content_hash([settings, code_version.fingerprint()])}"
    if not store.exists(key):
        base_dir = store.get_dir(base["key"])
        t0 = time.perf_counter()
        mode = "4bit" if model.load_in_4bit else "weights"
        m = M.load_model(base_dir, mode, rt, quant_type=model.quant_type, double_quant=model.double_quant,
                         quant_storage=model.quant_storage)
        load_s = time.perf_counter() - t0
        footprint = m.get_memory_footprint()
        staging = store.staging_dir(key)
        m.save_pretrained(staging, safe_serialization=True)
        M.load_tokenizer(base_dir).save_pretrained(staging)
        del m
        M.free_memory()
        store.commit_dir(staging, key, meta={**settings, "footprint_bytes": footprint, "load_s": round(load_s, 2)})
        log(f"quantized base: {footprint / 1e6:.0f} MB in memory ({mode}); runtime: {rt.describe()}")
    meta = store.manifest(key)["meta"]
    return {"key": key, "uri": store.uri(key), "footprint_bytes": meta["footprint_bytes"],
            "settings": settings}


@task(name="load_base_model", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json",
      **gpu_retry())
def load_base_model(model: ModelConfig, storage: StorageConfig, identity: dict | None = None) -> dict:
    logger = get_run_logger()
    store = ArtifactStore.from_config(storage)
    base = materialise_base(model, store, logger.info, identity)
    with gpu_slot(), crash_on_device_error():
        quantized = quantize_base(model, base, store, logger.info)
    logger.info("base %s (%s params), quantized footprint %.0f MB", model.source,
                f"{base.get('n_params', 0) / 1e6:.0f}M", quantized["footprint_bytes"] / 1e6)
    return {"base": {**{k: base[k] for k in ("key", "uri", "source", "n_params", "architecture") if k in base},
                     "identity": identity},
            "quantized": quantized}
