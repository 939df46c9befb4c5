"""Checks for the bundled Korean QA dataset (data/korean_qa) and its data card (data/README.md).

Standard library + pytest only; nothing from the project is imported.  The helpers
below (normalisation, near-duplicate test, counts table) deliberately repeat the
ones in data/build_korean_qa.py so that the two can be checked against each other.
"""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
QA_DIR = DATA / "korean_qa"
README = DATA / "README.md"
BUILD_SCRIPT = DATA / "build_korean_qa.py"

SPLITS = ("train", "validation", "test")
CATEGORIES = (
    "geography",
    "history",
    "science",
    "culture",
    "language",
    "units",
    "everyday",
    "arithmetic",
)
FIELDS = ("id", "category", "fact", "question", "answer", "key", "part")
NEAR_DUP_THRESHOLD = 0.9
COUNTS_START = "<!-- counts:start -->"
COUNTS_END = "<!-- counts:end -->"


# --------------------------------------------------------------------------- helpers


def normalise(text: str) -> str:
    """Lowercase and keep only letters and digits (drops spaces and punctuation)."""
    return "".join(ch for ch in text.lower() if unicodedata.category(ch)[0] in "LN")


def bigrams(text: str) -> frozenset[str]:
    s = normalise(text)
    if len(s) < 2:
        return frozenset([s])
    return frozenset(s[i : i + 2] for i in range(len(s) - 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def is_near_duplicate(a: frozenset[str], b: frozenset[str]) -> bool:
    small, large = sorted((len(a), len(b)))
    if large and small / large < NEAR_DUP_THRESHOLD:  # Jaccard can't reach the threshold
        return False
    return jaccard(a, b) >= NEAR_DUP_THRESHOLD


def norm_key(text: str) -> str:
    return "".join(text.lower().split())


def render_counts(splits: dict[str, list[dict]]) -> str:
    def count(rows, category, part=None):
        return sum(1 for r in rows if r["category"] == category and (part is None or r["part"] == part))

    present = [c for c in CATEGORIES if any(r["category"] == c for rows in splits.values() for r in rows)]
    lines = [
        "| category | train | validation | test: taught | test: unseen | test: all | total |",
        "|:--|--:|--:|--:|--:|--:|--:|",
    ]
    totals = [0] * 6
    for c in present:
        row = [
            count(splits["train"], c),
            count(splits["validation"], c),
            count(splits["test"], c, "taught"),
            count(splits["test"], c, "unseen"),
            count(splits["test"], c),
        ]
        row.append(row[0] + row[1] + row[4])
        totals = [t + v for t, v in zip(totals, row)]
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    lines.append("| **all** | " + " | ".join(f"**{v}**" for v in totals) + " |")
    facts = {s: len({r["fact"] for r in splits[s]}) for s in SPLITS}
    lines.append("")
    lines.append(
        f"Distinct facts: train {facts['train']}, validation {facts['validation']}, test {facts['test']}."
    )
    return "\n".join(lines)


def load_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            assert line.endswith("\n"), f"{path.name}:{n}: missing newline"
            assert line.strip(), f"{path.name}:{n}: blank line"
            rows.append(json.loads(line))
    return rows


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {name: load_jsonl(QA_DIR / f"{name}.jsonl") for name in SPLITS}


@pytest.fixture(scope="module")
def all_rows(splits) -> list[dict]:
    return [r for name in SPLITS for r in splits[name]]


# --------------------------------------------------------------------------- tests


def test_files_exist_and_are_utf8_jsonl(splits):
    for name in SPLITS:
        raw = (QA_DIR / f"{name}.jsonl").read_bytes()
        raw.decode("utf-8")
        assert b"\\u" not in raw, f"{name}: written with ensure_ascii=True"
        assert splits[name], f"{name} is empty"


def test_schema(splits):
    for name, rows in splits.items():
        for r in rows:
            where = f"{name}:{r.get('id')}"
            assert tuple(r) == FIELDS, f"{where}: fields {tuple(r)}"
            for field in ("id", "category", "fact", "question", "answer"):
                assert isinstance(r[field], str) and r[field].strip(), f"{where}: bad {field}"
            assert r["category"] in CATEGORIES, f"{where}: category {r['category']}"
            assert isinstance(r["key"], list) and r["key"], f"{where}: key must be a non-empty list"
            assert all(isinstance(k, str) and k.strip() for k in r["key"]), f"{where}: bad key {r['key']}"
            if name == "test":
                assert r["part"] in ("taught", "unseen"), f"{where}: part {r['part']!r}"
            else:
                assert r["part"] is None, f"{where}: part must be null outside test"
            # one short sentence in the polite 합니다/입니다 style
            assert r["answer"].endswith("다."), f"{where}: answer {r['answer']!r}"
            assert len(r["answer"]) <= 40, f"{where}: answer too long"


def test_ids_unique(all_rows):
    ids = [r["id"] for r in all_rows]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, dupes


def test_total_size_and_balance(splits, all_rows):
    assert len(all_rows) >= 600
    for c in CATEGORIES:
        share = sum(r["category"] == c for r in all_rows) / len(all_rows)
        assert share <= 0.35, f"{c} is {share:.0%} of the data"
    test = splits["test"]
    assert any(r["part"] == "taught" for r in test)
    assert any(r["part"] == "unseen" for r in test)


def test_no_duplicate_questions_within_split(splits):
    for name, rows in splits.items():
        questions = [r["question"] for r in rows]
        dupes = sorted({q for q in questions if questions.count(q) > 1})
        assert not dupes, f"{name}: {dupes}"


def test_no_question_in_two_splits(splits):
    seen: dict[str, str] = {}
    for name in SPLITS:
        for r in splits[name]:
            other = seen.setdefault(r["question"], name)
            assert other == name, f"{r['question']!r} is in {other} and {name}"


def test_no_near_duplicate_questions_across_splits(splits):
    grams = {name: [(bigrams(r["question"]), r["id"]) for r in rows] for name, rows in splits.items()}
    problems = []
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            for ga, ida in grams[a]:
                for gb, idb in grams[b]:
                    if is_near_duplicate(ga, gb):
                        problems.append(f"{a}:{ida} ~ {b}:{idb} ({jaccard(ga, gb):.2f})")
    assert not problems, problems[:20]


def test_taught_and_unseen_facts(splits):
    train_facts = {r["fact"] for r in splits["train"]}
    validation_facts = {r["fact"] for r in splits["validation"]}
    for r in splits["test"]:
        if r["part"] == "taught":
            assert r["fact"] in train_facts, f"{r['id']}: taught fact {r['fact']} not in train"
        else:
            assert r["fact"] not in train_facts, f"{r['id']}: unseen fact {r['fact']} is in train"
            assert r["fact"] not in validation_facts, f"{r['id']}: unseen fact {r['fact']} is in validation"


def test_answer_contains_a_key_variant(all_rows):
    for r in all_rows:
        answer = norm_key(r["answer"])
        assert any(norm_key(k) in answer for k in r["key"]), f"{r['id']}: {r['answer']!r} lacks {r['key']}"
        assert norm_key(r["key"][0]) in answer, f"{r['id']}: canonical key {r['key'][0]!r} not in answer"


def test_readme_counts_block_matches_files(splits):
    text = README.read_text(encoding="utf-8")
    assert text.count(COUNTS_START) == 1 and text.count(COUNTS_END) == 1
    block = text.split(COUNTS_START, 1)[1].split(COUNTS_END, 1)[0]
    assert block.strip() == render_counts(splits)


def test_build_script_reproduces_files(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for name in SPLITS:
        built = (tmp_path / f"{name}.jsonl").read_bytes()
        shipped = (QA_DIR / f"{name}.jsonl").read_bytes()
        assert built == shipped, f"{name}.jsonl differs from a fresh build"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{s}.jsonl" for s in SPLITS)
