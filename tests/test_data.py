"""Reading, shapes, validation, templating and fingerprints of slmforge.data (no model, no Prefect)."""

import csv
import json

import pytest

from slmforge import data as D
from slmforge import readers as RD
from slmforge import records as RC
from slmforge.config import DataConfig
from slmforge.modeling import load_tokenizer


@pytest.fixture(scope="module")
def tok(smollm_tokenizer_dir):
    return load_tokenizer(smollm_tokenizer_dir)


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def _qa(i):
    return {"question": f"질문 번호 {i}번은 무엇인가요?", "answer": f"답은 {i}입니다.", "key": [str(i)]}


def _load(path, **kw):
    return D.load_examples(DataConfig(source=str(path), **kw))


def _all(splits):
    return [ex for s in D.SPLITS for ex in splits[s]]


# -- the bundled set ---------------------------------------------------------------------------

def test_bundled_dataset_has_splits_and_parts():
    splits, report = D.load_examples(DataConfig(source="bundled:korean-qa", test_limit=None))
    assert len(splits["train"]) >= 200 and len(splits["test"]) >= 60
    assert {ex.part for ex in splits["test"]} == {"taught", "unseen"}
    assert all(ex.key for s in splits.values() for ex in s)
    assert report.bad_rows == 0
    assert report.rows == sum(len(v) for v in splits.values())


def test_quick_bundled_set_trains_only_the_taught_facts():
    """The quick default: both train wordings of every fact the test asks again, nothing else;
    the test and validation splits are the full set's."""
    full, _ = D.load_examples(DataConfig(source="bundled:korean-qa", test_limit=None))
    quick, _ = D.load_examples(DataConfig(source="bundled:korean-qa-quick", test_limit=None))

    def fact(ex):
        return ex.id.rsplit("-", 1)[0]

    taught = {fact(ex) for ex in full["test"] if ex.part == "taught"}
    assert {fact(ex) for ex in quick["train"]} == taught
    assert len(quick["train"]) == 2 * len(taught) == len([ex for ex in full["train"] if fact(ex) in taught])
    assert [ex.id for ex in quick["test"]] == [ex.id for ex in full["test"]]
    # no validation row is about a taught fact: it measures only untrained facts (what the calibrate
    # stage's temperature is for), so the recipe for taught facts could not be chosen on it
    assert not {fact(ex) for ex in full["validation"]} & taught
    assert [ex.id for ex in quick["validation"]] == [ex.id for ex in full["validation"]]
    with pytest.raises(D.DataError, match="korean-qa-quick"):
        D.load_examples(DataConfig(source="bundled:nope"))


def test_test_limit_keeps_parts_balanced():
    splits, _ = D.load_examples(DataConfig(test_limit=20))
    parts = [ex.part for ex in splits["test"]]
    assert len(parts) == 20 and parts.count("taught") == parts.count("unseen") == 10


def test_multi_file_source_locates_rows_by_file_and_line(tmp_path, monkeypatch):
    """Line 2 of train.jsonl and line 2 of test.jsonl are two bad rows, not one."""
    for split in D.SPLITS:
        rows = [_qa(f"{split}{i}") for i in range(30)]
        if split != "validation":
            rows[1]["answer"] = ""
        _write_jsonl(tmp_path / f"{split}.jsonl", rows)
    monkeypatch.setitem(D.BUNDLED, "mine", tmp_path)
    splits, report = D.load_examples(DataConfig(source="bundled:mine", max_bad_fraction=0.1))
    assert report.rows == 90 and report.bad_rows == 2
    assert report.problems["empty_field"] == ["train.jsonl:2", "test.jsonl:2"]
    assert report.details["empty_field"][0].startswith("line train.jsonl:2:")
    assert len(splits["validation"]) == 30


# -- formats and column mapping ----------------------------------------------------------------

def _write_format(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        _write_jsonl(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    elif suffix in (".csv", ".tsv"):
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_formats_and_column_mapping(tmp_path, suffix):
    rows = [{"q": f"질문 {i}번, 무엇일까요?", "a": f"대답은 {i}, 그렇습니다.", "fact": f"{i}|일"} for i in range(40)]
    p = _write_format(tmp_path / f"qa.{suffix}", rows)
    splits, report = _load(p, question_field="q", answer_field="a", key_field="fact")
    assert sum(len(v) for v in splits.values()) == 40 and report.bad_rows == 0 and report.rows == 40
    assert splits["test"], "a file without a split column still gets a held-out part"
    ex = next(e for e in _all(splits) if e.messages[0]["content"] == "질문 7번, 무엇일까요?")
    assert ex.messages == [{"role": "user", "content": "질문 7번, 무엇일까요?"},
                           {"role": "assistant", "content": "대답은 7, 그렇습니다."}]
    assert ex.key == ["7", "일"]


def test_split_column_is_used_with_aliases(tmp_path):
    rows = [{**_qa(i), "split": ["train", "val", "test"][i % 3]} for i in range(30)]
    splits, _ = _load(_write_jsonl(tmp_path / "qa.jsonl", rows))
    assert [len(splits[s]) for s in D.SPLITS] == [10, 10, 10]


def test_json_object_holding_a_list_and_bom_csv(tmp_path):
    p = tmp_path / "qa.json"
    p.write_text(json.dumps({"meta": {"v": 1}, "data": [_qa(i) for i in range(20)]}, ensure_ascii=False))
    splits, report = _load(p)
    assert report.rows == 20 and report.bad_rows == 0
    p = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" starts with a BOM; the header must still match
    p.write_bytes("\ufeffquestion,answer\n".encode() + "".join(
        f"질문 {i}번은?,답 {i}입니다.\n" for i in range(20)).encode())
    splits, report = _load(p)
    assert report.rows == 20 and report.bad_rows == 0


def test_unsupported_and_missing_files(tmp_path):
    with pytest.raises(D.DataError, match="unsupported file type '.txt'"):
        _load(tmp_path / "qa.txt")
    with pytest.raises(D.DataError, match="file not found"):
        _load(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(D.DataError, match="holds no rows"):
        _load(tmp_path / "empty.jsonl")
    (tmp_path / "u16.csv").write_bytes("question,answer\n".encode("utf-16"))
    with pytest.raises(D.DataError, match="UTF-16"):
        _load(tmp_path / "u16.csv")


# -- Hugging Face datasets (real `datasets` code, local files) ----------------------------------

def test_hf_packaged_builder_with_data_files(tmp_path):
    p = _write_jsonl(tmp_path / "hf.jsonl", [_qa(i) for i in range(30)])
    splits, report = D.load_examples(DataConfig(source="hf:json", hf_data_files=str(p)))
    assert report.rows == 30 and report.unit == "row" and sum(len(v) for v in splits.values()) == 30


def test_hf_local_data_dir_and_split(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    _write_jsonl(d / "train.jsonl", [_qa(i) for i in range(30)])
    _write_jsonl(d / "test.jsonl", [_qa(i) for i in range(100, 140)])
    splits, report = D.load_examples(DataConfig(source=f"hf:{d}", split="test"))
    assert report.rows == 40 and all(len(ex.key[0]) == 3 for ex in _all(splits)), "the test split's rows"


def test_hf_save_to_disk_dir(tmp_path):
    import datasets

    rows = [{"instruction": f"{i}에 1을 더하세요.", "input": "", "output": f"{i + 1}입니다."} for i in range(30)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    splits, report = D.load_examples(DataConfig(source=f"hf:{tmp_path / 'dd'}"))
    assert report.rows == 30 and _all(splits)[0].messages[0]["content"].endswith("에 1을 더하세요.")
    with pytest.raises(D.DataError, match="no split 'test'"):
        D.load_examples(DataConfig(source=f"hf:{tmp_path / 'dd'}", split="test"))
    with pytest.raises(D.DataError, match="cannot load Hugging Face dataset"):
        D.load_examples(DataConfig(source=f"hf:{tmp_path / 'missing-dir'}"))


# -- shapes --------------------------------------------------------------------------------------

def test_shapes_become_chat_messages(tmp_path):
    rows = [
        {"instruction": "다음 문장을 번역하세요.", "input": "Hello", "output": "안녕하세요."},
        {"instruction": "수도를 말하세요: 프랑스", "output": "파리입니다."},
        {"conversations": [{"from": "human", "value": "하늘은 무슨 색?"}, {"from": "gpt", "value": "파란색입니다."}]},
        {"messages": [{"role": "system", "content": "짧게 답하세요."}, {"role": "user", "content": "1+1은?"},
                      {"role": "assistant", "content": "2입니다."}, {"role": "user", "content": "2+2는?"},
                      {"role": "assistant", "content": "4입니다."}]},
        {"question": "물의 어는점은?", "answer": "0도입니다.", "key": ["0"]},
    ] + [_qa(i) for i in range(20)]
    splits, report = _load(_write_jsonl(tmp_path / "mixed.jsonl", rows), system_prompt="당신은 도우미입니다.")
    assert report.bad_rows == 0
    by_first_user = {next(m["content"] for m in ex.messages if m["role"] == "user"): ex.messages
                     for ex in _all(splits)}
    sys_turn = {"role": "system", "content": "당신은 도우미입니다."}
    assert by_first_user["다음 문장을 번역하세요.\n\nHello"] == [
        sys_turn, {"role": "user", "content": "다음 문장을 번역하세요.\n\nHello"},
        {"role": "assistant", "content": "안녕하세요."}]
    assert by_first_user["수도를 말하세요: 프랑스"][1:] == [
        {"role": "user", "content": "수도를 말하세요: 프랑스"}, {"role": "assistant", "content": "파리입니다."}]
    assert by_first_user["하늘은 무슨 색?"] == [sys_turn, {"role": "user", "content": "하늘은 무슨 색?"},
                                               {"role": "assistant", "content": "파란색입니다."}]
    multi = by_first_user["1+1은?"]
    assert multi[0] == {"role": "system", "content": "짧게 답하세요."}, "a row's own system turn wins"
    assert [m["role"] for m in multi] == ["system", "user", "assistant", "user", "assistant"]


def test_messages_as_json_text_in_a_csv_column(tmp_path):
    rows = [{"messages": json.dumps([{"role": "user", "content": f"질문 {i}?"},
                                     {"role": "assistant", "content": f"답 {i}."}], ensure_ascii=False)}
            for i in range(20)]
    splits, report = _load(_write_format(tmp_path / "chat.csv", rows))
    assert report.bad_rows == 0 and len(_all(splits)) == 20


# -- validation problems, each with a file -------------------------------------------------------

def _one_bad(tmp_path, bad_row, name="qa.jsonl", n=40, at=7, **kw):
    """40 good rows with one bad row at data line `at`; returns the report (row dropped, not fatal)."""
    rows = [_qa(i) for i in range(n)]
    rows[at - 1] = bad_row
    splits, report = _load(_write_jsonl(tmp_path / name, rows), **kw)
    assert len(_all(splits)) == n - 1 and report.rows == n and report.bad_rows == 1
    return report


@pytest.mark.parametrize("bad_row, problem, detail", [
    ({"question": "답이 없는 질문?"}, "missing_field", "no `answer` column"),
    ({"question": "빈 답?", "answer": "   "}, "empty_field", "`answer` is empty"),
    ({"question": "빈 답?", "answer": None}, "empty_field", "`answer` is empty"),
    ({"question": "숫자 답?", "answer": 42}, "wrong_type", "`answer` is int"),
    ({"question": ["목록"], "answer": "답"}, "wrong_type", "`question` is list"),
    ("just a string", "wrong_type", "row is str"),
    ({"question": "제어\x07문자?", "answer": "답"}, "control_characters", "'\\x07'"),
    ({"question": "질문?", "answer": "깨진\x85답"}, "control_characters", "'\\x85'"),
    ({"messages": [{"role": "assistant", "content": "먼저 답"}, {"role": "user", "content": "질문"}]},
     "roles_out_of_order", "alternate"),
    ({"messages": [{"role": "user", "content": "질문"}]}, "roles_out_of_order", "last turn"),
    ({"messages": [{"role": "user", "content": "질문"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "답"}]}, "roles_out_of_order", "system turn must come first"),
    ({"conversations": [{"from": "narrator", "value": "옛날에"}, {"from": "gpt", "value": "답"}]},
     "roles_out_of_order", "unknown role 'narrator'"),
    ({"messages": [{"role": "user", "content": "질문"}, {"role": "assistant", "content": ""}]},
     "empty_field", "messages[2] (assistant)"),
    ({"messages": "not a list"}, "wrong_type", "not a JSON list"),
    ({"messages": [{"role": "user"}, "x"]}, "empty_field", "messages[1]"),
])
def test_each_problem_is_found_dropped_and_located(tmp_path, bad_row, problem, detail):
    report = _one_bad(tmp_path, bad_row)
    assert dict(report.problems) == {problem: [7]}
    assert report.details[problem][0].startswith("line 7:") and detail in report.details[problem][0]
    d = report.to_dict()
    assert d["problems"][problem]["first_lines"] == [7] and d["bad_rows"] == 1 and d["passed"]


def test_invalid_json_line_is_a_bad_row(tmp_path):
    p = _write_jsonl(tmp_path / "qa.jsonl", [_qa(i) for i in range(40)])
    lines = p.read_text(encoding="utf-8").split("\n")
    lines[4] = '{"question": "닫히지 않은'
    lines.insert(10, "")  # blank lines are skipped, not rows, and line numbers stay true
    p.write_text("\n".join(lines), encoding="utf-8")
    splits, report = _load(p)
    assert report.rows == 40 and report.problems == {"invalid_json": [5]} and len(_all(splits)) == 39


def test_non_utf8_rows_in_jsonl_csv_and_json(tmp_path):
    good = [_qa(i) for i in range(40)]
    # JSONL: the 9th line holds a CP949-encoded answer
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good]
    lines[8] = json.dumps({"question": "인코딩?", "answer": "X"}, ensure_ascii=False).encode().replace(
        b'"X"', b'"' + "잘못된".encode("cp949") + b'"')
    p = tmp_path / "qa.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    splits, report = _load(p)
    assert report.rows == 40 and report.problems == {"non_utf8": [9]} and len(_all(splits)) == 39
    assert "`answer`" in report.details["non_utf8"][0] and "CP949" in report.details["non_utf8"][0]
    # CSV: header on line 1, so the 9th record is on line 10; a multi-line quoted answer before it
    body = [b"question,answer"] + [f"{r['question']},{r['answer']}".encode() for r in good]
    body[3] = '질문 줄바꿈?,"첫 줄\n둘째 줄"'.encode()  # record 3 spans lines 4-5
    body[9] = "인코딩 질문?,".encode() + "잘못된".encode("euc-kr")
    p = tmp_path / "qa.csv"
    p.write_bytes(b"\n".join(body) + b"\n")
    splits, report = _load(p)
    assert report.rows == 40 and report.problems == {"non_utf8": [11]}, report.to_dict()
    multi = next(ex for ex in _all(splits) if ex.messages[0]["content"] == "질문 줄바꿈?")
    assert multi.line == 4 and multi.messages[1]["content"] == "첫 줄\n둘째 줄"
    # JSON document: the bad byte marks one record (on its own line), not the whole file
    text = json.dumps(good, ensure_ascii=False, indent=1).encode()
    text = text.replace("답은 3입니다.".encode(), b"\xff\xfe")
    p = tmp_path / "qa.json"
    p.write_bytes(text)
    splits, report = _load(p)
    assert report.rows == 40 and list(report.problems) == ["non_utf8"]
    line = report.problems["non_utf8"][0]
    assert text.split(b"\n")[line - 1].strip() == b"{", "the record's line is where its object starts"


def test_parquet_binary_columns_are_text_when_utf8(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    answers = [f"답 {i}입니다.".encode() for i in range(40)]
    answers[12] = "잘못된".encode("cp949")
    table = pa.table({"question": [f"질문 {i}번?" for i in range(40)], "answer": pa.array(answers, pa.binary())})
    pq.write_table(table, tmp_path / "qa.parquet")
    splits, report = _load(tmp_path / "qa.parquet")
    assert report.problems == {"non_utf8": [13]} and report.details["non_utf8"][0].startswith("row 13:")
    assert _all(splits)[0].messages[1]["content"].startswith("답 ")


def test_json_records_carry_their_line_numbers(tmp_path):
    rows = [_qa(i) for i in range(30)]
    rows[12]["answer"] = 3
    p = tmp_path / "qa.json"
    p.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    report = _load(p)[1]
    line = report.problems["wrong_type"][0]
    lines = p.read_text(encoding="utf-8").split("\n")
    assert lines[line - 1].strip() == "{" and '"질문 번호 12번은' in lines[line]
    p.write_text('[{"question": "a", "answer": "b"},\n {"question": "c", ]', encoding="utf-8")
    with pytest.raises(D.DataError, match=r"qa.json: invalid JSON at line 2") as e:
        _load(p)
    assert e.value.report.problems["invalid_json"] == [2]


def test_csv_field_count_and_line_numbers(tmp_path):
    p = tmp_path / "qa.csv"
    lines = ["question,answer"] + [f"질문 {i}번?,답 {i}입니다." for i in range(40)]
    lines[6] = "가격은 얼마?,3,000원입니다."  # an unquoted comma would silently cut the answer to "3"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    splits, report = _load(p)
    assert report.problems == {"wrong_field_count": [7]} and "3 fields, the header has 2" in report.details[
        "wrong_field_count"][0]


def test_exact_and_near_duplicates(tmp_path):
    rows = [_qa(i) for i in range(40)]
    rows[10] = {"question": "  질문 번호 3번은 무엇인가요 ", "answer": "다른 답"}  # same after normalising
    rows[20] = {"question": "질문 번호 5번은 무엇인가요요?", "answer": "답"}  # one character more
    rows[30] = {"question": "질문 번호 66번은 무엇인가요?", "answer": "답"}  # like line 7, another number: kept
    splits, report = _load(_write_jsonl(tmp_path / "qa.jsonl", rows), max_bad_fraction=0.1)
    assert report.problems["duplicate"] == [11] and "line 4" in report.details["duplicate"][0]
    assert report.problems["near_duplicate"] == [21] and "line 6" in report.details["near_duplicate"][0]
    assert report.bad_rows == 2 and len(_all(splits)) == 38
    _, exact_only = _load(tmp_path / "qa.jsonl", max_bad_fraction=0.1, near_duplicate_threshold=1.0)
    assert "near_duplicate" not in exact_only.problems


def test_numbers_keep_similar_questions_apart():
    exs = [D.Example(str(i), [{"role": "user", "content": f"{a} 더하기 {b}는 얼마인가요?"},
                              {"role": "assistant", "content": "x"}], None, line=i + 1)
           for i, (a, b) in enumerate([(3, 4), (3, 5), (13, 4)])]
    report = RD.Report("t")
    assert len(D.drop_duplicates(exs, report)) == 3 and not report.problems


def test_over_threshold_fails_naming_file_problem_and_lines(tmp_path):
    rows = [_qa(i) for i in range(40)]
    for i in (3, 9, 17):
        rows[i]["answer"] = ""
    p = _write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(D.DataError) as e:
        _load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: 3 of 40 rows are bad") and "data.max_bad_fraction=5%" in msg
    assert "empty_field: 3 rows, e.g. lines 4, 10, 18" in msg and "`answer` is empty" in msg
    assert e.value.report.to_dict()["passed"] is False
    splits, report = _load(p, max_bad_fraction=0.1)  # a looser limit drops and counts them instead
    assert report.bad_rows == 3 and len(_all(splits)) == 37


def test_bad_json_line_fails_naming_file_and_line(tmp_path):
    p = tmp_path / "qa.jsonl"
    _write_jsonl(p, [_qa(i) for i in range(10)])
    p.write_text(p.read_text(encoding="utf-8") + '{"question": "broken\n', encoding="utf-8")
    with pytest.raises(D.DataError) as e:
        D.load_examples(DataConfig(source=str(p)))
    assert str(p) in str(e.value) and "invalid_json" in str(e.value) and "line 11" in str(e.value)


def test_missing_answer_column_fails(tmp_path):
    p = _write_format(tmp_path / "qa.csv", [{"question": f"질문 {i}", "answers": "x"} for i in range(20)])
    with pytest.raises(D.DataError, match=r"missing_field: 20 rows, e.g. lines 2, 3, 4, 5, 6 — line 2: no `answer`"):
        D.load_examples(DataConfig(source=str(p)))


def test_report_markdown_and_json():
    report = RD.Report("qa.jsonl", max_bad_fraction=0.05)
    report.rows = 10
    report.add("empty_field", 3, "`answer` | is empty")
    report.problems["unused"]  # an empty entry is not a problem
    d = report.to_dict()
    assert list(d["problems"]) == ["empty_field"] and d["bad_fraction"] == 0.1 and d["passed"] is False
    md = report.markdown()
    assert "| empty_field | 1 | 3 | line 3: `answer` \\| is empty |" in md and "**Over**" in md
    assert json.loads(json.dumps(d)) == d


# -- templating ----------------------------------------------------------------------------------

def test_pad_token_is_not_eos(tok):
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_labels_fall_on_the_answer_and_eos_only(tok):
    msgs = [{"role": "user", "content": "6 더하기 6은?"}, {"role": "assistant", "content": "6 더하기 6은 12입니다."}]
    ids, labels = RC.encode_example(tok, msgs)
    assert len(ids) == len(labels)
    labelled = [t for t, lab in zip(ids, labels) if lab != -100]
    text = tok.decode(labelled)
    assert text.startswith("6 더하기 6은 12입니다.")
    assert tok.eos_token_id in labelled  # the model learns to stop
    # the question carries no loss, and the bundled template adds no system turn nobody asked for
    prompt = [t for t, lab in zip(ids, labels) if lab == -100]
    assert "더하기 6은?" in tok.decode(prompt)
    assert "system" not in tok.decode(ids) and "SmolLM" not in tok.decode(ids)
    # the pieces concatenate to exactly the template's rendering
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)


def test_multi_turn_labels_every_assistant_turn_and_nothing_else(tok):
    msgs = [{"role": "system", "content": "짧게 답하세요."},
            {"role": "user", "content": "1 더하기 1은?"}, {"role": "assistant", "content": "2입니다."},
            {"role": "user", "content": "거기에 3을 곱하면?"}, {"role": "assistant", "content": "6입니다."}]
    ids, labels = RC.encode_example(tok, msgs)
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
    # labelled spans, in order: each answer followed by its end-of-turn
    spans, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    assert len(spans) == 2
    assert [tok.decode(s).strip() for s in spans] == ["2입니다.<|im_end|>", "6입니다.<|im_end|>"]
    masked = tok.decode([t for t, lab in zip(ids, labels) if lab == -100])
    assert "짧게 답하세요." in masked and "1 더하기 1은?" in masked and "거기에 3을 곱하면?" in masked
    assert "6입니다" not in masked and "2입니다" not in masked
    assert tok.decode(RC.prompt_ids(tok, msgs)).endswith("거기에 3을 곱하면?<|im_end|>\n<|im_start|>assistant\n")


def test_overlong_rows_are_dropped_and_reported(tok):
    ex = D.Example("x", [{"role": "user", "content": "가" * 200}, {"role": "assistant", "content": "나"}], ["나"],
                   line=4)
    report = RD.Report("t")
    assert RC.tokenize_split(tok, [ex], DataConfig(max_length=64), report, "train") == []
    assert report.problems["too_long"] == [4] and "> data.max_length=64" in report.details["too_long"][0]


def test_overlong_rows_are_truncated_and_counted(tok):
    long_answer = D.Example("a", [{"role": "user", "content": "질문?"}, {"role": "assistant", "content": "답" * 200}],
                            None, line=2)
    long_question = D.Example("q", [{"role": "user", "content": "가" * 200}, {"role": "assistant", "content": "나"}],
                              None, line=3)
    report = RD.Report("t")
    out = RC.tokenize_split(tok, [long_answer, long_question], DataConfig(max_length=64, overlong="truncate"),
                           report, "train")
    # the first row lost its EOS to truncation: no false "template has no EOS" error
    assert [r["id"] for r in out] == ["a"] and out[0]["n_tokens"] == 64 == len(out[0]["input_ids"])
    assert report.truncated == 1 and report.truncated_lines == [2]
    # truncating a long question would leave no answer token: dropped and reported instead
    assert report.problems["too_long"] == [3] and "no answer token" in report.details["too_long"][0]


def test_records_are_packing_ready(tok):
    exs = [D.Example(f"r{i}", [{"role": "user", "content": f"질문 {i}?"}, {"role": "assistant", "content": "답."}],
                     [str(i)], category="c", part="taught", line=i) for i in range(3)]
    recs = RC.tokenize_split(tok, exs, DataConfig(), RD.Report("t"), "test")
    for r in recs:
        assert r["n_tokens"] == len(r["input_ids"]) == len(r["labels"])
        assert r["input_ids"][: len(r["prompt_ids"])] == r["prompt_ids"]
    stats = RC.split_stats({"test": recs})["test"]
    assert stats["rows"] == 3 and stats["tokens"] == sum(r["n_tokens"] for r in recs)
    assert stats["by_part"] == {"taught": 3}


# -- fingerprint -----------------------------------------------------------------------------

def _fp(tok, tmp_path, rows, name="qa.jsonl"):
    splits, _ = _load(_write_jsonl(tmp_path / name, rows))
    records = {s: RC.tokenize_split(tok, splits[s], DataConfig(), RD.Report("t"), s) for s in D.SPLITS}
    return RC.fingerprint(records, tok.chat_template)


def test_fingerprint_follows_content_and_template(tok, tmp_path):
    rows = [_qa(i) for i in range(30)]
    fp = _fp(tok, tmp_path, rows)
    assert fp == _fp(tok, tmp_path, [dict(r) for r in rows], "copy.jsonl"), "same data, same key"
    changed = [dict(r) for r in rows]
    changed[4]["answer"] = "답은 사입니다."
    assert _fp(tok, tmp_path, changed, "changed.jsonl") != fp, "one changed row, a new key"
    relabelled = [dict(r) for r in rows]
    relabelled[4]["key"] = ["넷"]
    assert _fp(tok, tmp_path, relabelled, "key.jsonl") != fp
    splits, _ = _load(tmp_path / "qa.jsonl")
    records = {s: RC.tokenize_split(tok, splits[s], DataConfig(), RD.Report("t"), s) for s in D.SPLITS}
    assert RC.fingerprint(records, tok.chat_template + " ") != fp, "another template, a new key"
