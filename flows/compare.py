"""The comparison flow: models × precisions on quality, memory and speed (the tutorial's exercise 1).

1. check the store, read the evaluation set — seconds, before any weights load
2. each model: its source made loadable (GGUF/Hub: materialised once into the store), then one
   `benchmark` task per precision under the `gpu` concurrency limit, memory freed after each; a
   failure becomes that model's or that row's error
   - run from a deployment, with `cfg.per_model_deployment` on the server: each model is its own
     flow run of `compare-model` on the GPU pool (fanned out: N workers measure N models at once),
     and this flow only waits and collects
   - otherwise (a local run): one model after another in this flow run
3. the table, the markdown report, CSV/JSON and the quality-vs-memory chart under `compare/<hash>/`
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from slmforge.benchmarking import load_average
from slmforge.compare_config import CompareConfig
from slmforge.modeling import on_gpu
from slmforge.storage import ArtifactStore
from tasks.compare import (benchmark, compare_key, compare_report, error_row, fan_out_deployment,
                           measure_on_pool, part, prepare_eval_set, resolve_model, write_part)
from tasks.gpu import limit_exists
from tasks.secrets import load_store_credentials


def _failure(state) -> str:
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException):
        msg = str(exc).removeprefix("model.source: ")
        return msg if type(exc).__name__ == "ModelSourceError" else f"{type(exc).__name__}: {msg}"
    return state.message or state.name


def _gpu_limit(cfg: CompareConfig, logger) -> str | None:
    limit = cfg.concurrency_limit if cfg.concurrency_limit and limit_exists(cfg.concurrency_limit) else None
    if cfg.concurrency_limit and not limit:
        logger.info("no concurrency limit %r on this Prefect server (`slmforge up` creates it): models are measured "
                    "one after another but do not wait for other runs' GPU work", cfg.concurrency_limit)
    return limit


def measure_here(spec: str, cfg: CompareConfig, examples: list[dict], limit: str | None) -> dict:
    """One model in this flow run: its source, then every precision (`tasks.compare.part`)."""
    logger = get_run_logger()
    state = resolve_model.with_options(task_run_name=f"resolve-{spec}"[:100])(spec, cfg, return_state=True)
    entry = state.result() if state.is_completed() else {"spec": spec, "kind": "error", "error": _failure(state)}
    if entry["kind"] == "error":
        logger.warning("%s: cannot be used: %s", spec, entry["error"])
        return part(entry, [error_row(entry, "all", entry["error"])], examples)
    if entry["kind"] == "skipped":
        logger.info("%s: skipped: %s", spec, entry["skipped"])
        return part(entry, [error_row(entry, "all", entry["skipped"], status="skipped")], examples)
    rows = []
    for mode in cfg.modes:
        run = benchmark.with_options(task_run_name=f"benchmark-{entry['name']}-{mode}"[:100])
        state = run(entry, mode, examples, cfg, limit, return_state=True)
        if state.is_completed():
            rows.append(state.result())
        else:
            error = _failure(state)
            logger.warning("%s %s failed: %s", entry["name"], mode, error)
            rows.append(error_row(entry, mode, error))
    return part(entry, rows, examples)


@flow(name="compare")
def compare(cfg: CompareConfig = CompareConfig()) -> dict:
    """Compare small LMs in bf16 / 8-bit / 4-bit: quality, memory, speed; report, CSV/JSON, chart."""
    logger = get_run_logger()
    if load_store_credentials():  # docker/kubernetes pools name the Secret blocks; never the values
        logger.info("store credentials: read from the work pool's Secret blocks")
    started = time.time()
    load_at_start = load_average()
    ArtifactStore.from_config(cfg.storage).check_writable()
    examples = prepare_eval_set(cfg)

    deployment = fan_out_deployment(cfg, logger.info)
    if deployment:  # one flow run per model on the GPU pool, all at once; this run waits and collects
        futures = [measure_on_pool.with_options(task_run_name=f"measure-{spec}"[:100]).submit(spec, cfg, deployment)
                   for spec in cfg.models]
        parts = [f.result() for f in futures]
    else:
        limit = _gpu_limit(cfg, logger)
        parts = [measure_here(spec, cfg, examples, limit) for spec in cfg.models]

    entries = [p["entry"] for p in parts]
    rows = [row for p in parts for row in p["rows"]]
    gpu = any(p.get("gpu") for p in parts) if deployment else on_gpu()
    eval_n = max((p.get("eval_items") or 0 for p in parts), default=0) or len(examples)
    key = compare_key(cfg, entries, gpu, str(flow_run.id))
    record = compare_report(rows, cfg, key, started, eval_n, load_at_start)
    logger.info("report: %s/report.md", record["uri"])
    return {"uri": record["uri"], "key": record["key"], "report": f"{record['uri']}/report.md",
            "table": record["table"], "rows": record["rows"], "wall_s": record["wall_s"]}


@flow(name="compare-model")
def compare_model(cfg: CompareConfig, spec: str, part_key: str) -> dict:
    """One model of a fanned-out comparison, every precision, on this worker's device; its rows go
    to the store at `part_key`, where the comparison that started this run reads them. The
    evaluation set is read here, so `eval.items: auto` follows this worker's device."""
    logger = get_run_logger()
    if load_store_credentials():
        logger.info("store credentials: read from the work pool's Secret blocks")
    examples = prepare_eval_set(cfg)
    measured = measure_here(spec, cfg, examples, _gpu_limit(cfg, logger))
    write_part(measured, part_key, cfg)
    return {"part": part_key, "rows": len(measured["rows"])}


if __name__ == "__main__":
    compare()
