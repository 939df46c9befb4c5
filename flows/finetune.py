"""The fine-tuning flow: prepare → load 4-bit base → QLoRA → calibrate → merge → evaluate → publish.

Reads like the tutorial's numbered steps. Each stage is a cached Prefect task that passes store
keys, never models; an unchanged stage is a cache hit, and a retried run resumes at the stage
that failed.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from slmforge.config import FinetuneConfig
from tasks.caching import result_storage
from tasks.calibrate import calibrate
from tasks.dataset import prepare_dataset
from tasks.evaluate import evaluate
from tasks.merge import merge_adapter
from tasks.model import load_base_model
from tasks.publish import publish
from tasks.secrets import load_store_credentials
from tasks.train import train_qlora
from tasks.validate import validate_inputs


@flow(name="finetune")
def finetune(cfg: FinetuneConfig = FinetuneConfig()) -> dict:
    """QLoRA-fine-tune a small LM on Q&A data and publish it if it beats the base."""
    logger = get_run_logger()
    if load_store_credentials():  # docker/kubernetes pools name the Secret blocks; never the values
        logger.info("store credentials: read from the work pool's Secret blocks")
    validate_inputs(cfg)  # seconds: settings, store, model source, Hub token — before any weights load
    results = result_storage(cfg.storage)

    def stage(t):
        return t.with_options(result_storage=results)

    dataset = stage(prepare_dataset)(cfg.data, cfg.model, cfg.storage)
    base = stage(load_base_model)(cfg.model, cfg.storage)
    trained = stage(train_qlora)(dataset, base, cfg.model, cfg.lora, cfg.train, cfg.storage)
    adapter = stage(calibrate)(trained, base, dataset, cfg.model, cfg.calibrate, cfg.eval, cfg.storage)
    merged = stage(merge_adapter)(adapter, base, dataset, cfg.model, cfg.merge, cfg.eval, cfg.storage)
    report = stage(evaluate)(dataset, base, merged, adapter, cfg.model, cfg.eval, cfg.storage,
                             run_config=cfg.model_dump(exclude={"publish", "storage"}))
    published = stage(publish)(cfg, dataset, base, adapter, report, merged=merged)

    logger.info("report: %s/report.md", report["uri"])
    return {"dataset": dataset["uri"], "base": base["base"]["uri"], "quantized": base["quantized"]["uri"],
            "adapter": adapter["uri"], "merged": merged["uri"], "report": report["uri"],
            "table": report["table"], "publish": published}


if __name__ == "__main__":
    finetune()
