"""Stage 4: merge the adapter into the 16-bit base and check the merge is faithful."""

from __future__ import annotations

from prefect import get_run_logger, task

from slmforge import fingerprint as code_version
from slmforge import modeling as M
from slmforge.config import StorageConfig
from slmforge.data import read_jsonl
from slmforge.merging import merge
from tasks.caching import STAGE_CACHE
from tasks.gpu import gpu_slot
from tasks.retry import gpu_retry
from tasks.storage import ArtifactStore, content_hash


def run_merge(adapter: dict, base: dict, dataset: dict, store: ArtifactStore, log=print) -> dict:
    key = f"merged/{content_hash([adapter['key'], base['base']['key'], code_version.fingerprint()])}"
    if not store.exists(key):
        check = read_jsonl(store.get_dir(dataset["key"]) / "test.jsonl")[:4]
        staging = store.staging_dir(key)
        try:
            info = merge(store.get_dir(base["base"]["key"]), store.get_dir(adapter["key"]), staging, check)
            M.load_tokenizer(store.get_dir(adapter["key"])).save_pretrained(staging)
        finally:
            M.free_memory()
        store.commit_dir(staging, key, meta={"merge_check": info})
    meta = store.manifest(key)["meta"]
    log(f"merged model: {store.uri(key)} (max logit diff {meta['merge_check']['max_logit_diff']:.2e})")
    return {"key": key, "uri": store.uri(key), **meta}


@task(name="merge_adapter", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json",
      **gpu_retry())
def merge_adapter(adapter: dict, base: dict, dataset: dict, storage: StorageConfig) -> dict:
    with gpu_slot():
        return run_merge(adapter, base, dataset, ArtifactStore.from_config(storage), get_run_logger().info)
