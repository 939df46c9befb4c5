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
from slmforge import identity as ID
from slmforge.metrics import gate_metric as gate_metric_for
from tasks.caching import STAGE_CACHE
from slmforge.storage import ArtifactStore, content_hash

ARTIFACT_KEY = "dataset-validation"


def object_fs(uri: str, store: ArtifactStore):
    """(filesystem, path) of an object-store URL: the store's own filesystem for its scheme (same
    endpoint and credentials), else fsspec's default for the URL."""
    import fsspec

    if uri.split("://", 1)[0] == store.scheme:
        return store.fs, store.fs._strip_protocol(uri)
    return fsspec.core.url_to_fs(uri)


def _fetch(uri: str, store: ArtifactStore, into: Path, pinned: dict | None = None) -> Path:
    """Copy an object-store data file into `into` (keeping its name, so its suffix gives the format).
    With `pinned` (the version `resolve_inputs` saw), the copy must be that version: an object
    rewritten in between fails here rather than train on data the record does not name."""
    try:
        fs, path = object_fs(uri, store)
        local = into / Path(path).name
        fs.get_file(path, str(local))
        now = ID.object_identity(fs, path) if pinned else None
    except Exception as e:  # noqa: BLE001 - s3fs/fsspec raise many types; the user needs the URL
        raise D.DataError(f"data.source: cannot read {uri}: {type(e).__name__}: {e}") from None
    if pinned and any(now.get(k) != pinned.get(k) for k in ("etag", "version_id", "sha256", "size")):
        raise D.DataError(f"data.source: {uri} changed while this run read it (was {pinned.get('etag')}, "
                          f"{pinned.get('size')} bytes; now {now.get('etag')}, {now.get('size')} bytes): run again")
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


def validate_data(data: DataConfig, store: ArtifactStore, log=print, identity: dict | None = None):
    """Read and validate the source (no tokenizer, no model): seconds. On failure the validation
    report is the only thing written. `identity` (slmforge.identity) pins what is read: the Hub
    commit of an `hf:` dataset, the object version of an `s3://` file. Returns (examples per split, report)."""
    identity = identity or {}
    pinned = {f["path"]: f for f in identity.get("files", [])} if identity.get("kind") == "object" else {}
    with tempfile.TemporaryDirectory(prefix="slmforge-data-") as tmp:
        def read_file(uri: str) -> Path:
            return _fetch(uri, store, Path(tmp), pinned.get(object_fs(uri, store)[1]))

        try:
            return D.load_examples(data, read_file=read_file, revision=identity.get("revision"))
        except D.DataError as e:
            err = _failed(e, data, store, log)
            if err is e:
                raise
            raise err from None


def gate_metric(splits: dict, requested: str, source: str) -> tuple[str, str]:
    """The metric the publish gate will judge on this data (`eval.primary_metric`, auto resolved),
    and why; DataError naming the setting when the data cannot yield it: refused before training."""
    test = splits["test"]
    try:
        return gate_metric_for(requested, len(test), sum(1 for ex in test if ex.key))
    except ValueError as e:
        raise D.DataError(f"{e} ({source})") from None


def prepare(data: DataConfig, model: ModelConfig, store: ArtifactStore, log=print, inputs: dict | None = None,
            primary_metric: str = "auto") -> dict:
    """Plain function behind the task: returns the dataset record (store key + fingerprint + stats).
    `inputs` are the identities `resolve_inputs` pinned (data and model), read as pinned."""
    inputs = inputs or {}
    splits, report = validate_data(data, store, log, inputs.get("data"))
    metric, why = gate_metric(splits, primary_metric, data.source)
    log(f"the publish gate will judge {metric} ({why})")
    model_revision = (inputs.get("model") or {}).get("revision") or model.revision
    tokenizer = load_tokenizer(resolve_source(model.source, model_revision))
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
        "identity": inputs.get("data"),
        "primary_metric": metric,
        "primary_metric_reason": why,
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
    identity = record.get("identity") or {}
    head = (f"Dataset `{record['fingerprint']}` from {identity.get('label') or '`' + record['source'] + '`'}: "
            + ", ".join(f"{s} {x['rows']} rows / {x['tokens']} tokens" for s, x in stats.items())
            + f"; {v['bad_rows']} of {v['rows']} rows dropped, {v['truncated']} truncated. "
            + f"The publish gate judges `{record.get('primary_metric')}` ({record.get('primary_metric_reason')}).")
    return head + "\n\n" + RD.report_markdown(v)


def failure_markdown(error: D.DataError) -> str:
    report = getattr(error, "report", None)
    body = RD.report_markdown(report.to_dict()) if report is not None else ""
    return f"**Data validation failed**\n\n```\n{error}\n```\n\n{body}"


@task(name="prepare_dataset", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json", retries=0)
def prepare_dataset(data: DataConfig, model: ModelConfig, storage: StorageConfig, inputs: dict,
                    primary_metric: str = "auto") -> dict:
    """Bad data is not transient: no retries; the message names the file, problem and lines.
    `inputs` (the pinned identities) is part of the cache key: changed data is a new run."""
    logger = get_run_logger()
    store = ArtifactStore.from_config(storage)
    try:
        record = prepare(data, model, store, log=logger.info, inputs=inputs, primary_metric=primary_metric)
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
