"""Stage 1: read, validate, template and tokenise the Q&A data; write the splits to the store."""

from __future__ import annotations

import tempfile
from pathlib import Path

import fsspec
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from slmforge import data as D
from slmforge.config import DataConfig, ModelConfig, StorageConfig
from slmforge.modeling import load_tokenizer, resolve_source
from tasks.caching import STAGE_CACHE, DataFiles
from tasks.storage import ArtifactStore, content_hash


def _fetch(uri: str, storage: StorageConfig) -> Path:
    """Copy an object-store data file to a local temp file (keeps its suffix for format detection)."""
    kwargs = {"client_kwargs": {"endpoint_url": storage.endpoint_url}} if storage.endpoint_url else {}
    local = Path(tempfile.mkdtemp(prefix="slmforge-data-")) / Path(uri).name
    try:
        fsspec.filesystem(uri.split("://", 1)[0], **kwargs).get_file(uri, str(local))
    except Exception as e:  # noqa: BLE001
        raise D.DataError(f"data.source: cannot read {uri}: {e}") from None
    return local


def _write_report(data: DataConfig, report: D.Report, store: ArtifactStore, log) -> None:
    key = f"validation/{content_hash([data.model_dump(), report.to_dict()])}/report.json"
    store.write_json(key, report.to_dict())
    log(f"validation report: {store.uri(key)}")


def validate_data(data: DataConfig, store: ArtifactStore, log=print):
    """Read and validate the source (no tokenizer, no model): seconds. On failure the validation
    report is the only thing written."""
    try:
        return D.load_examples(data, read_file=lambda uri: _fetch(uri, store_cfg_of(store)))
    except D.DataError as e:
        if getattr(e, "report", None) is not None:
            _write_report(data, e.report, store, log)
        raise


def prepare(data: DataConfig, model: ModelConfig, store: ArtifactStore, log=print) -> dict:
    """Plain function behind the task: returns the dataset record (store key + fingerprint + stats)."""
    splits, report = validate_data(data, store, log)
    tokenizer = load_tokenizer(resolve_source(model.source, model.revision))
    records = {s: D.tokenize_split(tokenizer, splits[s], data, report, s) for s in D.SPLITS}
    try:
        D.check_bad_fraction(report, data.max_bad_fraction)
    except D.DataError:
        _write_report(data, report, store, log)
        raise
    fp = D.fingerprint(records, tokenizer.chat_template)
    key = f"datasets/{fp}"
    record = {
        "key": key,
        "uri": store.uri(key),
        "fingerprint": fp,
        "source": data.source,
        "stats": D.split_stats(records),
        "validation": report.to_dict(),
    }
    if not store.exists(key):
        staging = store.staging_dir(key)
        for split, recs in records.items():
            D.write_jsonl(staging / f"{split}.jsonl", recs)
        (staging / "validation_report.md").write_text(report.markdown(), encoding="utf-8")
        store.commit_dir(staging, key, meta={"fingerprint": fp, "source": data.source})
    return record


def store_cfg_of(store: ArtifactStore) -> StorageConfig:
    return StorageConfig(url=store.url)


@task(name="prepare_dataset", cache_policy=STAGE_CACHE + DataFiles(), persist_result=True,
      result_serializer="json", retries=0)
def prepare_dataset(data: DataConfig, model: ModelConfig, storage: StorageConfig) -> dict:
    """Bad data is not transient: no retries; the message names the file, problem and lines."""
    logger = get_run_logger()
    store = ArtifactStore.from_config(storage)
    record = prepare(data, model, store, log=logger.info)
    stats = record["stats"]
    logger.info("dataset %s: %s", record["fingerprint"],
                ", ".join(f"{s} {v['rows']} rows/{v['tokens']} tokens" for s, v in stats.items()))
    v = record["validation"]
    create_markdown_artifact(
        key="dataset-validation",
        markdown=f"Dataset `{record['fingerprint']}` from `{data.source}`: "
                 + ", ".join(f"{s} {x['rows']}" for s, x in stats.items())
                 + f"; {v['bad_rows']} of {v['rows']} rows dropped.\n\n"
                 + D.Report(data.source).markdown() if not v["problems"] else _report_md(v),
        description="Data validation report",
    )
    return record


def _report_md(v: dict) -> str:
    lines = [f"{v['rows']} rows read, {v['bad_rows']} dropped, {v['truncated']} truncated.", "",
             "| problem | rows | first lines | example |", "|---|---|---|---|"]
    for k, p in v["problems"].items():
        lines.append(f"| {k} | {p['count']} | {', '.join(map(str, p['first_lines'][:5]))} | "
                     f"{(p['examples'][0] if p['examples'] else '').replace('|', '/')} |")
    return "\n".join(lines)
