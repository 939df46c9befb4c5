"""The fine-tuning flow: prepare → load 4-bit base → QLoRA → calibrate → merge → evaluate → publish.

Reads like the tutorial's numbered steps. The data and the base model are pinned first (a file's
bytes, an object's ETag, a Hub commit), so tonight's data is a new run and unchanged data is not.
Each stage is a cached Prefect task that passes store keys, never models; an unchanged stage is a
cache hit, and a retried run resumes at the stage that failed. Last, the store's retention policy
removes what no recent run or published model needs.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from slmforge.config import FinetuneConfig
from slmforge.storage import ArtifactStore
from tasks.caching import Stages
from tasks.calibrate import calibrate
from tasks.dataset import prepare_dataset
from tasks.evaluate import evaluate
from tasks.merge import merge_adapter
from tasks.model import load_base_model
from tasks.publish import publish
from tasks.resolve import resolve_inputs, unchanged_since
from tasks.retention import begin, collect_garbage, finish, mark_ended
from tasks.secrets import load_store_credentials
from tasks.train import train_qlora
from tasks.validate import validate_inputs


@flow(name="finetune", on_failure=[mark_ended], on_crashed=[mark_ended])
def finetune(cfg: FinetuneConfig = FinetuneConfig()) -> dict:
    """QLoRA-fine-tune a small LM on Q&A data and publish it if it beats the base."""
    logger = get_run_logger()
    if load_store_credentials():  # docker/kubernetes pools name the Secret blocks; never the values
        logger.info("store credentials: read from the work pool's Secret blocks")
    validate_inputs(cfg)  # seconds: settings, store, model source, Hub token — before any weights load
    inputs = resolve_inputs(cfg)  # seconds, never cached: the data and the base model as they are now
    run = begin(cfg.storage, flow_run.get_id(), flow_run.get_name())
    stage = Stages(cfg.storage, run, logger.info)

    dataset = stage(prepare_dataset)(cfg.data, cfg.model, cfg.storage, inputs, cfg.eval.primary_metric)
    since = unchanged_since(dataset, ArtifactStore.from_config(cfg.storage)) if stage.cached["prepare_dataset"] else None
    if since:
        logger.info("no new data since %s (%s)", since, inputs["data"]["label"])
    base = stage(load_base_model)(cfg.model, cfg.storage, inputs["model"])
    trained = stage(train_qlora)(dataset, base, cfg.model, cfg.lora, cfg.train, cfg.storage)
    adapter = stage(calibrate)(trained, base, dataset, cfg.model, cfg.calibrate, cfg.eval, cfg.storage)
    merged = stage(merge_adapter)(adapter, base, dataset, cfg.model, cfg.merge, cfg.eval, cfg.storage)
    report = stage(evaluate)(dataset, base, merged, adapter, cfg.model, cfg.eval, cfg.storage,
                             run_config=cfg.model_dump(exclude={"publish", "storage"}))
    published = stage(publish)(cfg, dataset, base, adapter, report, merged=merged)

    if all(stage.cached.values()):
        line = f"no new data since {since}: nothing trained (every stage served from the cache)"
    else:
        line = f"trained on {inputs['data']['label']} from {inputs['model']['label']}" if not stage.cached["train_qlora"] else \
            "the adapter was served from the cache: evaluation or publishing settings changed"
    logger.info(line)
    create_markdown_artifact(key="nightly", markdown=f"**{line}**\n\n{published.get('reason', '')}",
                             description="What this run did with tonight's data")
    finish(cfg.storage, run)
    if cfg.retention.after_run:
        collect_garbage(cfg.retention, cfg.storage)
    logger.info("report: %s/report.md", report["uri"])
    return {"dataset": dataset["uri"], "base": base["base"]["uri"], "quantized": base["quantized"]["uri"],
            "adapter": adapter["uri"], "merged": merged["uri"], "report": report["uri"],
            "table": report["table"], "publish": published, "nightly": line}


if __name__ == "__main__":
    finetune()
