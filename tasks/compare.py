"""The compare flow's stages: the evaluation set, each model source made loadable
(`tasks/compare_sources.py`), one measurement per model × precision (one at a time, under the `gpu` concurrency limit), the fan-out of models
over a pool (`run_deployment`, one flow run per model), and the report.

Measurements are not cached (`NO_CACHE`): a comparison is re-measured each time it runs. What is
reused is the materialised checkpoint of a GGUF or Hub model (`models/base/<hash>`, the same key the
finetune flow uses), so a bundled model is dequantized once per store.
"""

from __future__ import annotations

import dataclasses
import json
import time

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from slmforge.runtime import decide
from slmforge import benchmarking as B
from slmforge import report
from slmforge import data as D
from slmforge import modeling as M
from slmforge.compare_config import CompareConfig
from slmforge.report import markdown_table
from tasks.compare_sources import display_name, model_dir, resolve_entry
from tasks.dataset import validate_data
from tasks.gpu import gpu_slot
from tasks.retry import crash_on_device_error, gpu_retry, must_propagate
from slmforge.storage import ArtifactStore, content_hash

PART_FILE = "part.json"
POLL_S = 5  # how often a fanned-out comparison asks for its models' runs' states


# -- the evaluation set ------------------------------------------------------------------------

def eval_examples(cfg: CompareConfig, store: ArtifactStore, gpu: bool, log=print) -> list[dict]:
    """The test split of `cfg.data`, limited to `eval.items` balanced over test parts, as dicts."""
    data_cfg = cfg.data.model_copy(update={"test_limit": None})
    splits, _ = validate_data(data_cfg, store, log)
    n = cfg.eval_items(gpu)
    chosen = D.balanced_subset(splits["test"], n) if len(splits["test"]) > n else splits["test"]
    log(f"evaluation set: {len(chosen)} of {len(splits['test'])} test items from {cfg.data.source}")
    return [dataclasses.asdict(e) for e in chosen]


# -- one measurement ---------------------------------------------------------------------------

def measure(entry: dict, mode: str, examples: list[dict], cfg: CompareConfig, store: ArtifactStore, log=print,
            limit: str | None = None) -> dict:
    """`limit`: the concurrency limit to hold, already checked to exist by the flow (None = none).

    A merged fine-tuned model in 4-bit is its adapter on the 4-bit base it was trained on: how a
    QLoRA model runs in 4-bit, and what the finetune flow evaluated as "trained". Quantizing the
    merged weights again rounds the adapter's small changes away (the facts with them)."""
    gpu = M.on_gpu()
    adapter, label = None, entry.get("source_label")
    if mode == "4bit" and entry.get("trained_from"):
        found = entry["trained_from"]
        directory, adapter = store.get_dir(found["quantized_base"]), store.get_dir(found["adapter"])
        label = f"{found['adapter']} on the 4-bit base {found['quantized_base']} (the merged {entry['key']} unmerged)"
        log(f"{mode}: {label}")
    else:
        directory = model_dir(entry, store)
    with gpu_slot(limit or "", strict=False), crash_on_device_error(), B.torch_threads(None if cfg.threads == "auto" else cfg.threads):
        row = B.benchmark_model(
            directory, mode, examples=examples, data_cfg=cfg.data, prompts=cfg.prompts,
            eval_max_new_tokens=cfg.eval_max_new_tokens(gpu), eval_batch_size=cfg.eval.batch_size,
            speed_new_tokens=cfg.speed_new_tokens(gpu), batch_sizes=cfg.speed.batch_sizes, runs=cfg.speed.runs,
            warmup=cfg.speed.warmup, answer_max_new_tokens=cfg.answer_tokens(gpu),
            rt=decide(cfg.compute_dtype, cfg.attn_implementation),
            seed=cfg.eval.seed, reraise=must_propagate, log=log, adapter_dir=adapter)
    return {"model": entry["name"], "spec": entry["spec"], "source_label": label,
            "adapter": (entry["trained_from"]["adapter"] if adapter else None), **row}


def error_row(entry: dict, mode: str, error: str, status: str = "error") -> dict:
    return {"model": entry.get("name") or display_name(entry["spec"]), "spec": entry["spec"], "mode": mode,
            "source_label": entry.get("source_label"), "status": status, "errors": [error]}


# -- one model's result (a "part"), here or on another worker ------------------------------------

def part(entry: dict, rows: list[dict], examples: list[dict]) -> dict:
    """One model's contribution to a comparison: where it came from, its rows, and what it ran on."""
    return {"entry": entry, "rows": rows, "gpu": M.on_gpu(), "eval_items": len(examples)}


def write_part(measured: dict, key: str, cfg: CompareConfig) -> None:
    """A fanned-out model's part, committed to the store under the key its comparison chose."""
    store = ArtifactStore.from_config(cfg.storage)
    staging = store.staging_dir(key)
    (staging / PART_FILE).write_text(json.dumps(measured, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    store.commit_dir(staging, key, meta={"spec": measured["entry"]["spec"], "rows": len(measured["rows"])})


def read_part(key: str, store: ArtifactStore) -> dict | None:
    if not store.exists(key):
        return None
    return json.loads((store.get_dir(key) / PART_FILE).read_text(encoding="utf-8"))


def part_key(parent_run_id: str, spec: str) -> str:
    return f"compare/parts/{parent_run_id}/{content_hash(spec, 16)}"


def fan_out_deployment(cfg: CompareConfig, log=print) -> str | None:
    """The deployment to run each model on, or None to measure them in this flow run.

    Fans out only when this comparison was itself started from a deployment (a server and workers
    exist) and `cfg.per_model_deployment` is on that server; a local `slmforge compare` measures in
    its own process. A missing deployment is one log line, not an error.
    """
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    name = cfg.per_model_deployment
    if not name or ctx is None or ctx.flow_run is None or ctx.flow_run.deployment_id is None:
        return None
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            d = client.read_deployment_by_name(name)
    except ObjectNotFound:
        log(f"no deployment {name!r} on this server (`slmforge up` / `python -m deployments.deploy` create it): "
            "every model is measured in this flow run")
        return None
    log(f"fanning out: one flow run of {name} per model on work pool {d.work_pool_name!r}")
    return name


def collect_part(spec: str, flow_run, store: ArtifactStore, key: str) -> dict:
    """A finished model run's part; a run that failed, crashed or wrote nothing keeps its row with why."""
    state = flow_run.state
    found = read_part(key, store) if state is not None and state.is_completed() else None
    if found is not None:
        return found
    why = f"{state.name}: {state.message}" if state is not None else "no state"
    error = f"flow run {flow_run.name} ({flow_run.id}) ended {why}"
    entry = {"name": display_name(spec), "spec": spec, "kind": "error", "error": error}
    return {"entry": entry, "rows": [error_row(entry, "all", error)], "gpu": None, "eval_items": None}


# -- the report --------------------------------------------------------------------------------

def compare_key(cfg: CompareConfig, entries: list[dict], gpu: bool, run_id: str) -> str:
    """A comparison is a measurement, not a cache: every run is its own output (`run_id`, the flow
    run's id). Without it, a second run of the same settings would find the first one's report
    committed under its key and adopt it (the store never replaces an output), so the report in
    the store would not be the one this run measured."""
    ident = [{k: e.get(k) for k in ("spec", "kind", "key", "path", "error", "skipped")} for e in entries]
    return f"compare/{content_hash([cfg.model_dump(mode='json', exclude={'storage'}), ident, gpu, run_id])}"


def write_report(rows: list[dict], cfg: CompareConfig, key: str, store: ArtifactStore, started: float,
                 eval_n: int, log=print, load_at_start: float | None = None) -> dict:
    gpu = M.on_gpu()
    rt = decide(cfg.compute_dtype, cfg.attn_implementation)
    env = B.environment()
    env["load_average_1min"] = {"start": load_at_start, "end": B.load_average()}
    table = report.display_rows(rows)
    method = next((r["memory_method"] for r in rows if r.get("memory_method")), None)
    settings = {
        **cfg.resolved(gpu), "eval_items": eval_n, "eval_batch_size": cfg.eval.batch_size,
        "speed": cfg.speed.model_dump(), "compute_dtype": rt.compute_dtype, "attn_implementation": rt.attn,
        "runtime": rt.to_dict(), "data": cfg.data.source,
        "threads": cfg.threads,
    }
    staging = store.staging_dir(key)
    chart = report.quality_memory_chart(rows, staging / "quality_vs_memory.png", cfg.quality_metric)
    (staging / "results.csv").write_text(report.csv_text(rows), encoding="utf-8")
    wall = time.time() - started
    result = {"key": key, "config": cfg.model_dump(mode="json", exclude={"storage"}), "settings": settings,
              "environment": env, "memory_method": method, "wall_s": round(wall, 1), "rows": rows}
    (staging / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str),
                                          encoding="utf-8")
    md = markdown_report(rows, table, cfg, settings, env, method, wall)
    (staging / "report.md").write_text(md, encoding="utf-8")
    meta = {"table": table, "rows": [report.flat_row(r) for r in rows], "wall_s": round(wall, 1), "environment": env}
    store.commit_dir(staging, key, meta=meta)
    log(f"comparison written to {store.uri(key)} (report.md, results.csv, results.json, {chart.name})")
    return {"key": key, "uri": store.uri(key), **meta, "markdown": md}


def markdown_report(rows: list[dict], table: list[dict], cfg: CompareConfig, settings: dict, env: dict,
                    method: str | None, wall: float) -> str:
    sizes = cfg.speed.batch_sizes
    load = env.get("load_average_1min") or {}
    busy = ""
    if load.get("start") is not None and env["device"].startswith("CPU"):
        busy = (f" Load average (1 min) {load['start']:.1f} at the start and {load.get('end') or 0:.1f} at the end: "
                "other work on this machine slows every speed figure.")
    parts = [
        "# slmforge model comparison",
        f"{len(rows)} rows ({sum(r.get('status') == 'ok' for r in rows)} complete) on {env['device']}, "
        f"{wall / 60:.1f} min. Quality on {settings['eval_items']} items of `{settings['data']}` "
        f"(greedy, {settings['eval_max_new_tokens']} new tokens).{busy}",
        markdown_table(table),
        "![quality vs memory](quality_vs_memory.png)",
        "## How it was measured",
        "\n".join([
            "- **load s**: loading the local safetensors checkpoint in that precision, plus its tokenizer.",
            "- **footprint MB**: `model.get_memory_footprint()` (10^6 bytes); **est. MB**: what "
            "`slmforge.memory` (the selection guide's estimator) predicts for it from the architecture alone.",
            f"- **peak MB**: {method or 'n/a'}; through loading and the speed runs (the CSV also has the "
            "peak of loading alone, `peak_load_mb`, and of the whole measurement including the evaluation's "
            "full-vocabulary loss pass, `peak_mb`).",
            f"- **TTFT ms**: time to the first new token at batch {sizes[0]}; **tok/s**: decode tokens/s "
            f"(tokens after the first over their time, × batch size) at batch {sizes[0]} and {sizes[-1]}; "
            f"{settings['speed_new_tokens']} forced new tokens, {cfg.speed.warmup} warm-up + {cfg.speed.runs} timed runs per batch size, "
            "median ± half the range.",
            "- **key acc / char F1 / chrF / ans. loss**: the finetune flow's evaluation metrics (key fact in the "
            "answer; character F1 and chrF against the reference; mean cross-entropy of the reference answer).",
            f"- compute dtype of 8/4-bit layers {settings['compute_dtype']}; attention requested "
            f"`{settings['attn_implementation']}` (the **attn** column is what the model reports using).",
            *(["- **4bit + adapter**: a merged fine-tuned model in 4-bit is its adapter, unmerged, on the 4-bit "
               "base it was trained on (how a QLoRA model runs in 4-bit, and what the finetune flow "
               "evaluated); quantizing the merged weights again would round away what the adapter taught."]
              if any(r.get("adapter") for r in rows) else []),
        ]),
        "## Answers side by side",
    ]
    for prompt, answers in report.prompt_answer_tables(rows, cfg.prompts):
        parts += [f"**{prompt}**", markdown_table(answers) if answers else "_no answers_"]
    errors = [r for r in rows if r.get("errors")]
    if errors:
        parts.append("## Errors")
        parts.append("\n".join(f"- `{r['model']}` {report.mode_label(r)}: " + "; ".join(r["errors"]) for r in errors))
    parts += ["## Reproduce", f"`slmforge compare` with\n\n```json\n"
              f"{json.dumps(cfg.model_dump(mode='json', exclude={'storage'}), indent=1, ensure_ascii=False)}\n```",
              f"Environment: `{json.dumps(env)}`"]
    return "\n\n".join(parts)


# -- Prefect tasks -----------------------------------------------------------------------------

@task(name="prepare_eval_set", cache_policy=NO_CACHE, retries=0)
def prepare_eval_set(cfg: CompareConfig) -> list[dict]:
    """Bad data is not transient: no retries; the message names the file, problem and lines."""
    logger = get_run_logger()
    return eval_examples(cfg, ArtifactStore.from_config(cfg.storage), M.on_gpu(), logger.info)


@task(name="resolve_model", cache_policy=NO_CACHE, **gpu_retry())
def resolve_model(spec: str, cfg: CompareConfig) -> dict:
    logger = get_run_logger()
    entry = resolve_entry(spec, ArtifactStore.from_config(cfg.storage), logger.info)
    logger.info("%s: %s", spec, entry.get("skipped") or entry.get("source_label"))
    return entry


@task(name="benchmark", cache_policy=NO_CACHE, **gpu_retry())
def benchmark(entry: dict, mode: str, examples: list[dict], cfg: CompareConfig, limit: str | None = None) -> dict:
    logger = get_run_logger()
    return measure(entry, mode, examples, cfg, ArtifactStore.from_config(cfg.storage),
                   lambda m: logger.info("%s %s", entry["name"], m), limit)


@task(name="measure_on_pool", cache_policy=NO_CACHE, retries=0)
def measure_on_pool(spec: str, cfg: CompareConfig, deployment: str) -> dict:
    """One model as its own flow run of `deployment` (a subflow of this comparison in the UI),
    waited for and collected. The idempotency key ties it to this comparison's flow run, so a
    re-run of the comparison after a crash waits for the same model runs instead of starting
    new ones."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    parent = str(FlowRunContext.get().flow_run.id)
    key = part_key(parent, spec)
    run = run_deployment(deployment, parameters={"cfg": cfg.model_dump(mode="json"), "spec": spec, "part_key": key},
                         flow_run_name=f"compare-{display_name(spec)}"[:100], idempotency_key=f"{parent}:{spec}",
                         timeout=0, tags=["compare"])
    with get_client(sync_client=True) as client:
        pool = client.read_deployment_by_name(deployment).work_pool_name
        run = wait_for_model_run(client, run.id, pool, cfg.no_worker_timeout_s, log=logger.warning)
    logger.info("%s: flow run %s ended %s", spec, run.name, run.state.name if run.state else "?")
    return collect_part(spec, run, ArtifactStore.from_config(cfg.storage), key)


def _pool_status(client, pool: str):
    """The pool's status (READY once a worker polls it), or "missing" for a pool deleted since."""
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_work_pool(pool).status
    except ObjectNotFound:
        return "missing"


def wait_for_model_run(client, run_id, pool: str | None, patience_s: float, poll_s: float = POLL_S, log=print):
    """The model run once it has ended, however long it runs or queues behind other runs for a worker.

    The one wait that cannot end by itself: a run that has not started while its pool has no
    worker online (nobody polls it, or it is paused). After `patience_s` of that, the run is
    cancelled, so it does not start hours later unattended, and its row says why.
    """
    from prefect.client.schemas.objects import WorkPoolStatus
    from prefect.states import Cancelled

    no_worker_since = None
    while True:
        run = client.read_flow_run(run_id)
        state = run.state
        if state is not None and state.is_final():
            return run
        waiting = state is None or state.is_scheduled() or state.is_pending()
        status = _pool_status(client, pool) if waiting and pool else WorkPoolStatus.READY
        if status in (WorkPoolStatus.READY, None):  # None: a server that does not say
            no_worker_since = None
        elif no_worker_since is None:
            no_worker_since = time.monotonic()
        elif time.monotonic() - no_worker_since >= patience_s:
            why = (f"not started: work pool {pool!r} had no worker online for {patience_s:g} s "
                   f"({str(getattr(status, 'value', status)).lower().replace('_', ' ')}; start one with "
                   f"`prefect worker start --pool {pool}` or `slmforge up`; "
                   f"setting no_worker_timeout_s)")
            log(f"flow run {run.name}: {why}")
            client.set_flow_run_state(run_id, Cancelled(message=why), force=True)
            return client.read_flow_run(run_id)
        time.sleep(poll_s)


@task(name="compare_report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def compare_report(rows: list[dict], cfg: CompareConfig, key: str, started: float, eval_n: int,
                   load_at_start: float | None = None) -> dict:
    logger = get_run_logger()
    store = ArtifactStore.from_config(cfg.storage)
    record = write_report(rows, cfg, key, store, started, eval_n, logger.info, load_at_start)
    create_table_artifact(key="compare-table", table=record["table"],
                          description="Quality, memory and speed per model × precision")
    md = record.pop("markdown")
    create_markdown_artifact(key="compare-report", markdown=f"Report: `{record['uri']}/report.md`\n\n" + md,
                             description="Model comparison report")
    return record
