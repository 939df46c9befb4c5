"""The comparison flow: models × precisions on quality, memory and speed (the tutorial's exercise 1).

1. check the store, read the evaluation set — seconds, before any weights load
2. make each model source loadable (GGUF/Hub: materialised once into the store)
3. one `benchmark` task per model × precision, one after another, each under the `gpu`
   concurrency limit and with memory freed after it; a failure becomes that row's error
4. the table, the markdown report, CSV/JSON and the quality-vs-memory chart under `compare/<hash>/`
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from slmforge.benchmarking import load_average
from slmforge.compare_config import CompareConfig
from slmforge.modeling import on_gpu
from tasks.compare import (benchmark, compare_key, compare_report, error_row, prepare_eval_set,
                           resolve_model)
from tasks.gpu import limit_exists
from tasks.secrets import load_store_credentials
from slmforge.storage import ArtifactStore


def _failure(state) -> str:
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException):
        msg = str(exc).removeprefix("model.source: ")
        return msg if type(exc).__name__ == "ModelSourceError" else f"{type(exc).__name__}: {msg}"
    return state.message or state.name


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
    limit = cfg.concurrency_limit if cfg.concurrency_limit and limit_exists(cfg.concurrency_limit) else None
    if cfg.concurrency_limit and not limit:
        logger.info("no concurrency limit %r on this Prefect server (`slmforge up` creates it): this run measures "
                    "its models one after another but does not wait for other runs' GPU work", cfg.concurrency_limit)

    entries, rows = [], []
    for spec in cfg.models:
        state = resolve_model.with_options(task_run_name=f"resolve-{spec}"[:100])(spec, cfg, return_state=True)
        if state.is_completed():
            entry = state.result()
        else:
            entry = {"spec": spec, "kind": "error", "error": _failure(state)}
        entries.append(entry)

    for entry in entries:
        if entry["kind"] == "error":
            logger.warning("%s: cannot be used: %s", entry["spec"], entry["error"])
            rows.append(error_row(entry, "all", entry["error"]))
            continue
        if entry["kind"] == "skipped":
            logger.info("%s: skipped: %s", entry["spec"], entry["skipped"])
            rows.append(error_row(entry, "all", entry["skipped"], status="skipped"))
            continue
        for mode in cfg.modes:
            run = benchmark.with_options(task_run_name=f"benchmark-{entry['name']}-{mode}"[:100])
            state = run(entry, mode, examples, cfg, limit, return_state=True)
            if state.is_completed():
                rows.append(state.result())
            else:
                error = _failure(state)
                logger.warning("%s %s failed: %s", entry["name"], mode, error)
                rows.append(error_row(entry, mode, error))

    key = compare_key(cfg, entries, on_gpu())
    record = compare_report(rows, cfg, key, started, len(examples), load_at_start)
    logger.info("report: %s/report.md", record["uri"])
    return {"uri": record["uri"], "key": record["key"], "report": f"{record['uri']}/report.md",
            "table": record["table"], "rows": record["rows"], "wall_s": record["wall_s"]}


if __name__ == "__main__":
    compare()
