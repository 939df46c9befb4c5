"""The prepare stage (tasks/dataset.py): every source format end to end into the store, bad data
failing in seconds with only the validation report written, the cache keys, the Prefect artifact
and the CLI's early check. Uses the tiny model dir (SmolLM2 tokenizer + template), never its weights."""

import csv
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from slmforge import data as D
from slmforge import records as RC
from slmforge.config import PROJECT_DIR, DataConfig, ModelConfig, StorageConfig
from tasks import dataset as T
from slmforge.storage import MANIFEST, ArtifactStore


@pytest.fixture(scope="module")
def model_cfg(tiny_model_dir):
    return ModelConfig(source=str(tiny_model_dir))


def _rows(n=40, start=0):
    return [{"id": f"r{i}", "질문": f"{i} 더하기 {i}는 얼마인가요?", "정답": f"{i} 더하기 {i}는 {2 * i}입니다.",
             "key": [str(2 * i)]} for i in range(start, start + n)]


MAPPING = {"question_field": "질문", "answer_field": "정답"}


def _write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    elif suffix == ".csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows([{k: "|".join(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows])
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _store(tmp_path):
    return ArtifactStore(f"file://{tmp_path}/store")


def _stored(tmp_path) -> list[str]:
    root = tmp_path / "store"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _check_dataset(store, record, n_rows):
    assert sum(s["rows"] for s in record["stats"].values()) == n_rows
    assert record["stats"]["train"]["rows"] and record["stats"]["test"]["rows"]
    d = store.get_dir(record["key"])
    assert {p.name for p in d.iterdir()} >= {"train.jsonl", "validation.jsonl", "test.jsonl", MANIFEST,
                                             "validation_report.md", "validation_report.json"}
    train = RC.read_jsonl(d / "train.jsonl")
    for r in train:
        assert r["n_tokens"] == len(r["input_ids"]) == len(r["labels"])
        assert r["messages"][-1]["role"] == "assistant" and r["prompt_ids"]
    assert record["stats"]["train"]["tokens"] == sum(r["n_tokens"] for r in train)
    report = json.loads((d / "validation_report.json").read_text(encoding="utf-8"))
    assert report == record["validation"] and report["passed"] is True
    key = record["validation_report"].split(str(store.root) + "/", 1)[1]
    assert store.read_json(key) == report
    return train


# -- every format through prepare() --------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_prepare_each_local_format(tmp_path, model_cfg, suffix):
    p = _write(tmp_path / f"qa.{suffix}", _rows())
    store = _store(tmp_path)
    record = T.prepare(DataConfig(source=str(p), **MAPPING), model_cfg, store, log=lambda m: None)
    train = _check_dataset(store, record, 40)
    assert all(r["key"] == [str(int(r["id"][1:]) * 2)] for r in train)
    assert record["source"] == str(p) and record["validation"]["rows"] == 40


def test_prepare_from_an_object_store_url(tmp_path, model_cfg):
    """Any fsspec URL (s3:// in production; memory:// here), through the store's own filesystem
    when the scheme matches it (same endpoint and credentials), else fsspec's default one."""
    import fsspec

    mem = fsspec.filesystem("memory")
    local = _write(tmp_path / "qa.parquet", _rows())
    mem.pipe("/slmforge-test/in/qa.parquet", local.read_bytes())
    try:
        store = _store(tmp_path)
        cfg = DataConfig(source="memory://slmforge-test/in/qa.parquet", **MAPPING)
        record = T.prepare(cfg, model_cfg, store, log=lambda m: None)
        _check_dataset(store, record, 40)
        mem_store = ArtifactStore("memory://slmforge-test/store")
        splits, report = T.validate_data(cfg, mem_store)
        assert report.rows == 40 and report.source == cfg.source
        with pytest.raises(D.DataError, match="cannot read memory://slmforge-test/in/nope.jsonl"):
            T.validate_data(DataConfig(source="memory://slmforge-test/in/nope.jsonl"), store)
        mem.pipe("/slmforge-test/in/bad.json", b'[{"question": "a", "answer": "b"},\n oops]')
        with pytest.raises(D.DataError, match=r"^memory://slmforge-test/in/bad.json: invalid JSON at line 2"):
            T.validate_data(DataConfig(source="memory://slmforge-test/in/bad.json"), store)
    finally:
        mem.rm("/slmforge-test", recursive=True)


def test_prepare_hf_sources(tmp_path, model_cfg):
    import datasets

    p = _write(tmp_path / "hf.jsonl", _rows())
    store = _store(tmp_path)
    record = T.prepare(DataConfig(source="hf:json", hf_data_files=str(p), **MAPPING), model_cfg, store,
                       log=lambda m: None)
    _check_dataset(store, record, 40)
    datasets.Dataset.from_list(_rows()).save_to_disk(str(tmp_path / "saved"))
    again = T.prepare(DataConfig(source=f"hf:{tmp_path / 'saved'}", **MAPPING), model_cfg, store,
                      log=lambda m: None)
    assert again["fingerprint"] == record["fingerprint"], "same rows from another loader, same data"


def test_prepare_chat_shapes_label_only_assistant_turns(tmp_path, model_cfg):
    from slmforge.modeling import load_tokenizer

    rows = [{"conversations": [{"from": "human", "value": f"{i}의 두 배는?"}, {"from": "gpt", "value": f"{2 * i}입니다."},
                               {"from": "human", "value": "세 배는?"}, {"from": "gpt", "value": f"{3 * i}입니다."}]}
            for i in range(20)]
    rows += [{"instruction": f"{i}에 1을 더하세요.", "input": "", "output": f"{i + 1}입니다."} for i in range(20)]
    p = _write(tmp_path / "chat.jsonl", rows)
    store = _store(tmp_path)
    record = T.prepare(DataConfig(source=str(p), system_prompt="숫자로 답하세요."), model_cfg, store,
                       log=lambda m: None)
    tok = load_tokenizer(model_cfg.source)
    recs = [r for s in D.SPLITS for r in RC.read_jsonl(store.get_dir(record["key"]) / f"{s}.jsonl")]
    multi = next(r for r in recs if len(r["messages"]) == 5)
    assert multi["messages"][0] == {"role": "system", "content": "숫자로 답하세요."}
    labelled = tok.decode([t for t, lab in zip(multi["input_ids"], multi["labels"]) if lab != -100])
    i = int(multi["messages"][1]["content"].split("의")[0])
    assert labelled == f"{2 * i}입니다.<|im_end|>\n{3 * i}입니다.<|im_end|>\n"


# -- fingerprint and cache keys ------------------------------------------------------------------

def test_same_data_same_fingerprint_one_changed_row_a_new_one(tmp_path, model_cfg):
    store = _store(tmp_path)
    rows = _rows()
    a = T.prepare(DataConfig(source=str(_write(tmp_path / "a.jsonl", rows)), **MAPPING), model_cfg, store,
                  log=lambda m: None)
    manifest = store.manifest(a["key"])
    b = T.prepare(DataConfig(source=str(_write(tmp_path / "b.jsonl", rows)), **MAPPING), model_cfg, store,
                  log=lambda m: None)
    assert b["fingerprint"] == a["fingerprint"] and b["key"] == a["key"]
    assert store.manifest(a["key"])["created"] == manifest["created"], "an existing dataset is not rewritten"
    rows[17] = {**rows[17], "정답": "17 더하기 17은 서른넷입니다."}
    c = T.prepare(DataConfig(source=str(_write(tmp_path / "c.jsonl", rows)), **MAPPING), model_cfg, store,
                  log=lambda m: None)
    assert c["fingerprint"] != a["fingerprint"] and store.exists(c["key"])


def test_a_local_files_identity_follows_its_bytes(tmp_path):
    """What the cache keys follow (slmforge.identity): one changed row, a new identity."""
    from slmforge.identity import data_identity

    p = _write(tmp_path / "qa.jsonl", _rows())

    def version(source):
        return data_identity(DataConfig(source=source))["version"]

    k = version(str(p))
    assert k == version(f"file://{p}")
    text = p.read_text(encoding="utf-8")
    p.write_text(text.replace("5 더하기 5는 10입니다.", "5 더하기 5는 열입니다."), encoding="utf-8")
    assert version(str(p)) != k, "one changed row, a new identity"
    p.write_text(text, encoding="utf-8")
    assert version(str(p)) == k
    assert version("bundled:korean-qa") and version("bundled:korean-qa") != k
    with pytest.raises(D.DataError, match="data.source: file not found"):
        version(str(tmp_path / "nope.jsonl"))


# -- bad data: fails in seconds, before any model loads, writing only the report --------------------

def _no_model(*a, **k):
    raise AssertionError("bad data must fail before the tokenizer or any model loads")


def _bad_json_line(tmp_path):
    p = _write(tmp_path / "bad.jsonl", _rows(10))
    p.write_text(p.read_text(encoding="utf-8").replace('"id": "r2"', '"id": r2', 1), encoding="utf-8")
    return p, ["invalid_json", "line 3"]


def _missing_answer_column(tmp_path):
    return _write(tmp_path / "bad.csv", [{"질문": r["질문"], "답": r["정답"]} for r in _rows(10)]), \
        ["missing_field", "lines 2, 3, 4, 5, 6", "no `정답` column"]


def _wrong_type(tmp_path):
    rows = _rows(10)
    rows[4]["정답"] = 8
    return _write(tmp_path / "bad.json", rows), ["wrong_type", "line 34", "`정답` is int"]  # record 5 of an indented list


def _empty_answers(tmp_path):
    rows = _rows(40)
    for i in (5, 6, 30):
        rows[i]["정답"] = ""
    return _write(tmp_path / "bad.parquet", rows), ["empty_field", "rows 6, 7, 31", "3 of 40 rows are bad"]


@pytest.mark.parametrize("make", [_bad_json_line, _missing_answer_column, _wrong_type, _empty_answers])
def test_malformed_file_fails_fast_naming_file_and_line(tmp_path, model_cfg, monkeypatch, make):
    path, expected = make(tmp_path)
    monkeypatch.setattr(T, "load_tokenizer", _no_model)
    t0 = time.monotonic()
    with pytest.raises(D.DataError) as e:
        T.prepare(DataConfig(source=str(path), **MAPPING), model_cfg, _store(tmp_path), log=lambda m: None)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert msg.startswith(str(path)), msg
    for part in expected:
        assert part in msg, msg
    written = _stored(tmp_path)
    assert len(written) == 1 and written[0].startswith("validation/") and written[0].endswith("/report.json")
    assert msg.endswith(f"validation report: file://{tmp_path}/store/{written[0]}")
    report = json.loads((tmp_path / "store" / written[0]).read_text(encoding="utf-8"))
    assert report["source"] == str(path) and report["passed"] is False and expected[0] in report["problems"]


def test_unreadable_json_document_names_the_line(tmp_path, model_cfg, monkeypatch):
    monkeypatch.setattr(T, "load_tokenizer", _no_model)
    p = tmp_path / "bad.json"
    p.write_text('[\n  {"질문": "a", "정답": "b"},\n  {"질문": "c" "정답": "d"}\n]\n', encoding="utf-8")
    with pytest.raises(D.DataError, match=rf"^{p}: invalid JSON at line 3, column 14"):
        T.prepare(DataConfig(source=str(p), **MAPPING), model_cfg, _store(tmp_path), log=lambda m: None)
    assert [f.split("/")[0] for f in _stored(tmp_path)] == ["validation"]
    with pytest.raises(D.DataError, match="file not found"):
        T.prepare(DataConfig(source=str(tmp_path / "nope.jsonl")), model_cfg, _store(tmp_path / "x"))
    assert _stored(tmp_path / "x") == [], "nothing was read: nothing to report"


def test_rows_too_long_for_the_model_count_against_the_limit(tmp_path, model_cfg):
    rows = _rows(40)
    for i in range(3):
        rows[i]["정답"] = "아주 긴 답입니다. " * 40
    p = _write(tmp_path / "long.jsonl", rows)
    with pytest.raises(D.DataError, match=r"too_long: 3 rows, e\.g\. lines 1, 2, 3"):
        T.prepare(DataConfig(source=str(p), max_length=128, **MAPPING), model_cfg, _store(tmp_path),
                  log=lambda m: None)
    assert [f.split("/")[0] for f in _stored(tmp_path)] == ["validation"]
    record = T.prepare(DataConfig(source=str(p), max_length=128, overlong="truncate", **MAPPING), model_cfg,
                       _store(tmp_path), log=lambda m: None)
    assert record["validation"]["truncated"] == 3 and record["validation"]["truncated_lines"] == [1, 2, 3]
    assert max(s["max_tokens"] for s in record["stats"].values()) == 128


# -- the Prefect task's markdown artifact --------------------------------------------------------

def test_task_artifact_shows_summary_and_problems(tmp_path, model_cfg, monkeypatch):
    artifacts = []
    monkeypatch.setattr(T, "create_markdown_artifact", lambda **kw: artifacts.append(kw))
    monkeypatch.setattr(T, "get_run_logger", lambda: logging.getLogger("test"))
    rows = _rows(40)
    rows[3]["정답"] = None
    p = _write(tmp_path / "qa.jsonl", rows)
    storage = StorageConfig(url=f"file://{tmp_path}/store")
    from slmforge.identity import data_identity

    identity = data_identity(DataConfig(source=str(p), **MAPPING))
    record = T.prepare_dataset.fn(DataConfig(source=str(p), **MAPPING), model_cfg, storage, {"data": identity})
    md = artifacts[0]["markdown"]
    assert md.startswith(f"Dataset `{record['fingerprint']}` from `{p}` at sha256 `{identity['version'][:12]}`: train ")
    assert "The publish gate judges `key_accuracy`" in md and record["identity"] == identity
    assert "1 of 40 rows dropped" in md and "| empty_field | 1 | 4 | line 4: `정답` is empty |" in md
    rows[3]["정답"] = rows[9]["정답"] = rows[11]["정답"] = ""
    _write(p, rows)
    with pytest.raises(D.DataError):
        T.prepare_dataset.fn(DataConfig(source=str(p), **MAPPING), model_cfg, storage, {})
    md = artifacts[1]["markdown"]
    assert md.startswith("**Data validation failed**") and "e.g. lines 4, 10, 12" in md and "**Over**" in md


# -- the CLI checks data before Prefect starts ---------------------------------------------------

def test_cli_rejects_a_bad_file_with_exit_2_and_the_message(tmp_path, tiny_model_dir):
    bad = _write(tmp_path / "bad.jsonl", [{"question": f"질문 {i}?", "answer": f"답 {i}."} for i in range(10)])
    bad.write_text(bad.read_text(encoding="utf-8") + "{not json}\n", encoding="utf-8")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}
    # a local model dir only keeps the pre-flight model check short; the data check is the point
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "finetune", "--set", f"data.source={bad}",
         "--set", f"storage.url={tmp_path}/store", "--set", f"model.source={tiny_model_dir}"],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {bad}: 1 of 11 rows are bad") and "invalid_json" in proc.stderr
    assert "line 11" in proc.stderr and "Traceback" not in proc.stderr
    assert [f.split("/")[0] for f in _stored(tmp_path)] == ["validation"]
