import json

import pytest

from slmforge import data as D
from slmforge.config import DataConfig
from slmforge.modeling import load_tokenizer


@pytest.fixture(scope="module")
def tok(smollm_tokenizer_dir):
    return load_tokenizer(smollm_tokenizer_dir)


def test_bundled_dataset_has_splits_and_parts():
    splits, report = D.load_examples(DataConfig(test_limit=None))
    assert len(splits["train"]) >= 200 and len(splits["test"]) >= 60
    assert {ex.part for ex in splits["test"]} == {"taught", "unseen"}
    assert all(ex.key for s in splits.values() for ex in s)
    assert report.bad_rows == 0


def test_test_limit_keeps_parts_balanced():
    splits, _ = D.load_examples(DataConfig(test_limit=20))
    parts = [ex.part for ex in splits["test"]]
    assert len(parts) == 20 and parts.count("taught") == parts.count("unseen") == 10


def test_pad_token_is_not_eos(tok):
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_labels_fall_on_the_answer_and_eos_only(tok):
    msgs = [{"role": "user", "content": "6 더하기 6은?"}, {"role": "assistant", "content": "6 더하기 6은 12입니다."}]
    ids, labels = D.encode_example(tok, msgs)
    assert len(ids) == len(labels)
    labelled = [t for t, lab in zip(ids, labels) if lab != -100]
    text = tok.decode(labelled)
    assert text.startswith("6 더하기 6은 12입니다.")
    assert tok.eos_token_id in labelled  # the model learns to stop
    # the system prompt and the question carry no loss
    prompt = [t for t, lab in zip(ids, labels) if lab == -100]
    assert "더하기 6은?" in tok.decode(prompt) and "SmolLM" in tok.decode(prompt)
    # the pieces concatenate to exactly the template's rendering
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")


def _qa(i):
    return {"question": f"질문 번호 {i}번은 무엇인가요?", "answer": f"답은 {i}입니다.", "key": [str(i)]}


def test_bad_json_line_fails_naming_file_and_line(tmp_path):
    p = tmp_path / "qa.jsonl"
    _write_jsonl(p, [_qa(i) for i in range(10)])
    p.write_text(p.read_text(encoding="utf-8") + '{"question": "broken\n', encoding="utf-8")
    with pytest.raises(D.DataError) as e:
        D.load_examples(DataConfig(source=str(p)))
    assert str(p) in str(e.value) and "invalid_json" in str(e.value) and "line 11" in str(e.value)


def test_bad_rows_under_threshold_are_dropped_and_counted(tmp_path):
    p = tmp_path / "qa.jsonl"
    rows = [_qa(i) for i in range(60)]
    rows[5]["answer"] = ""
    _write_jsonl(p, rows)
    splits, report = D.load_examples(DataConfig(source=str(p), max_bad_fraction=0.05))
    assert report.problems["empty_field"] == [6]
    assert sum(len(v) for v in splits.values()) == 59


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv"])
def test_formats_and_column_mapping(tmp_path, suffix):
    rows = [{"q": f"질문 {i}번?", "a": f"대답 {i}입니다."} for i in range(40)]
    p = tmp_path / f"qa.{suffix}"
    if suffix == "jsonl":
        _write_jsonl(p, rows)
    elif suffix == "json":
        p.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        p.write_text("q,a\n" + "\n".join(f"{r['q']},{r['a']}" for r in rows), encoding="utf-8")
    splits, report = D.load_examples(DataConfig(source=str(p), question_field="q", answer_field="a"))
    assert sum(len(v) for v in splits.values()) == 40 and report.bad_rows == 0
    assert splits["test"], "a file without a split column still gets a held-out part"


def test_missing_answer_column_fails(tmp_path):
    p = tmp_path / "qa.jsonl"
    _write_jsonl(p, [{"question": f"질문 {i}"} for i in range(20)])
    with pytest.raises(D.DataError, match="missing_field"):
        D.load_examples(DataConfig(source=str(p)))


def test_overlong_rows_are_dropped_and_reported(tok):
    ex = D.Example("x", [{"role": "user", "content": "가" * 200}, {"role": "assistant", "content": "나"}], ["나"])
    report = D.Report("t")
    assert D.tokenize_split(tok, [ex], DataConfig(max_length=64), report, "train") == []
    assert report.problems["too_long"]
