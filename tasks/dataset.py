"""Stage 1: read, validate, template and tokenise the Q&A data; write the splits to the store.

Validation needs no tokenizer and no model, so bad data fails in seconds. Whatever the outcome,
the validation report goes to the store (`validation/<hash>/report.json`) and, under Prefect, into
a markdown artifact; on failure it is the only thing written.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from slmforge import data as D
from slmforge import readers as RD
from slmforge import records as RC
from slmforge import fingerprint as code_version
from slmforge.config import DataConfig, ModelConfig, StorageConfig
from slmforge.modeling import load_tokenizer, resolve_source
from tasks.caching import STAGE_CACHE, DataFiles
from slmforge.storage import ArtifactStore, content_hash

ARTIFACT_KEY = "dataset-validation"


def _fetch(uri: str, store: ArtifactStore, into: Path) -> Path:
    """Copy an object-store data file into `into` (keeping its name, so its suffix gives the format).

    A file in the store's own scheme goes through the store's filesystem (same endpoint and
    credentials); any other fsspec URL through its default filesystem."""
    import fsspec

    scheme = uri.split("://", 1)[0]
    try:
        if scheme == store.scheme:
            fs = store.fs
            path = fs._strip_protocol(uri)
        else:
            fs, path = fsspec.core.url_to_fs(uri)
        local = into / Path(path).name
        fs.get_file(path, str(local))
    except Exception as e:  # noqa: BLE001 - s3fs/fsspec raise many types; the user needs the URL
        raise D.DataError(f"data.source: cannot read {uri}: {type(e).__name__}: {e}") from None
    return local


def _write_report(data: DataConfig, report: RD.Report, store: ArtifactStore, log) -> str:
    d = report.to_dict()
    uri = store.write_json(f"validation/{content_hash([data.model_dump(), d])}/report.json", d)
    log(f"validation report: {uri}")
    return uri


def _failed(e: D.DataError, data: DataConfig, store: ArtifactStore, log) -> D.DataError:
    """The same error, its report written to the store and its location added to the message."""
    report = getattr(e, "report", None)
    if report is None:
        return e
    uri = _write_report(data, report, store, log)
    err = D.DataError(f"{e}\nvalidation report: {uri}")
    err.report, err.report_uri = report, uri
    return err


def validate_data(data: DataConfig, store: ArtifactStore, log=print):
    """Read and validate the source (no tokenizer, no model): seconds. On failure the validation
    report is the only thing written. Returns (examples per split, report)."""
    with tempfile.TemporaryDirectory(prefix="slmforge-data-") as tmp:
        try:
            return D.load_examples(data, read_file=lambda uri: _fetch(uri, store, Path(tmp)))
        except D.DataError as e:
            err = _failed(e, data, store, log)
            if err is e:
                raise
            raise err from None


def prepare(data: DataConfig, model: ModelConfig, store: ArtifactStore, log=print) -> dict:
    """Plain function behind the task: returns the dataset record (store key + fingerprint + stats)."""
    splits, report = validate_data(data, store, log)
    tokenizer = load_tokenizer(resolve_source(model.source, model.revision))
    try:
        records = {s: RC.tokenize_split(tokenizer, splits[s], data, report, s) for s in D.SPLITS}
        D.check_bad_fraction(report, data.max_bad_fraction)  # now counting rows too long to keep
        for split in ("train", "test"):
            if not records[split]:
                raise D.DataError(f"{data.source}: no {split} rows fit data.max_length={data.max_length}")
    except D.DataError as e:
        e.report = report
        raise _failed(e, data, store, log) from None
    if report.bad_rows or report.truncated:
        counts = ", ".join(f"{k} {v['count']}" for k, v in report.to_dict()["problems"].items())
        log(f"{report.source}: {report.bad_rows} of {report.rows} rows dropped ({counts or 'none'}), "
            f"{report.truncated} truncated")
    report_uri = _write_report(data, report, store, log)
    fp = RC.fingerprint(records, tokenizer.chat_template)
    key = f"datasets/{content_hash([fp, code_version.fingerprint()])}"
    record = {
        "key": key,
        "uri": store.uri(key),
        "fingerprint": fp,
        "train_fingerprint": RC.fingerprint(records, tokenizer.chat_template, only=("train", "validation")),
        "source": data.source,
        "max_length": data.max_length,
        "stats": RC.split_stats(records),
        "validation": report.to_dict(),
        "validation_report": report_uri,
    }
    if not store.exists(key):
        staging = store.staging_dir(key)
        for split, recs in records.items():
            RC.write_jsonl(staging / f"{split}.jsonl", recs)
        (staging / "validation_report.md").write_text(report.markdown(), encoding="utf-8")
        (staging / "validation_report.json").write_text(
            json.dumps(report.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        store.commit_dir(staging, key, meta={"fingerprint": fp, "source": data.source})
    return record


def dataset_markdown(record: dict) -> str:
    """The artifact of a prepared dataset: what was kept, then the full validation report."""
    stats = record["stats"]
    v = record["validation"]
    head = (f"Dataset `{record['fingerprint']}` from `{record['source']}`: "
            + ", ".join(f"{s} {x['rows']} rows / {x['tokens']} tokens" for s, x in stats.items())
            + f"; {v['bad_rows']} of {v['rows']} rows dropped, {v['truncated']} truncated.")
    return head + "\n\n" + RD.report_markdown(v)


def failure_markdown(error: D.DataError) -> str:
    report = getattr(error, "report", None)
    body = RD.report_markdown(report.to_dict()) if report is not None else ""
    return f"**Data validation failed**\n\n```\n{error}\n```\n\n{body}"


@task(name="prepare_dataset", cache_policy=STAGE_CACHE + DataFiles(), persist_result=True,
      result_serializer="json", retries=0)
def prepare_dataset(data: DataConfig, model: ModelConfig, storage: StorageConfig) -> dict:
    """Bad data is not transient: no retries; the message names the file, problem and lines."""
    logger = get_run_logger()
    store = ArtifactStore.from_config(storage)
    try:
        record = prepare(data, model, store, log=logger.info)
    except D.DataError as e:
        if getattr(e, "report", None) is not None:
            create_markdown_artifact(key=ARTIFACT_KEY, markdown=failure_markdown(e),
                                     description="Data validation report (failed)")
        raise
    logger.info("dataset %s: %s", record["fingerprint"],
                ", ".join(f"{s} {v['rows']} rows/{v['tokens']} tokens" for s, v in record["stats"].items()))
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=dataset_markdown(record),
                             description="Data validation report")
    return record
