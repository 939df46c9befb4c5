"""Reading Q&A data in the shapes users have it, refusing bad rows loudly, and templating.

Every source becomes rows of chat `messages` (plus an optional `key` fact), rendered with the
model's own chat template. Labels are -100 everywhere but on assistant turns (their text and the
end-of-turn token), so the loss teaches answers, not the system prompt, and EOS keeps its label.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmforge.config import PROJECT_DIR, DataConfig

BUNDLED = {"korean-qa": PROJECT_DIR / "data" / "korean_qa"}
SPLITS = ("train", "validation", "test")
ROLES = ("system", "user", "assistant")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class DataError(ValueError):
    """The data cannot be used; the message names the file, the problem and example lines."""


@dataclass
class Row:
    line: int  # 1-based line (JSONL/CSV data line) or record index in the source
    raw: Any


@dataclass
class Example:
    id: str
    messages: list[dict]
    key: list[str] | None
    split: str | None = None
    category: str | None = None
    part: str | None = None
    line: int = 0


@dataclass
class Report:
    source: str
    rows: int = 0
    problems: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    details: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    truncated: int = 0

    def add(self, problem: str, line: int, detail: str = "") -> None:
        self.problems[problem].append(line)
        if detail and len(self.details[problem]) < 5:
            self.details[problem].append(f"line {line}: {detail}")

    @property
    def bad_rows(self) -> int:
        return len({ln for lines in self.problems.values() for ln in lines})

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "rows": self.rows,
            "bad_rows": self.bad_rows,
            "bad_fraction": round(self.bad_rows / self.rows, 4) if self.rows else 0.0,
            "truncated": self.truncated,
            "problems": {k: {"count": len(v), "first_lines": v[:10], "examples": self.details.get(k, [])}
                         for k, v in sorted(self.problems.items())},
        }

    def markdown(self) -> str:
        d = self.to_dict()
        out = [f"### Data validation: `{self.source}`", "",
               f"{d['rows']} rows read, {d['bad_rows']} dropped ({d['bad_fraction']:.1%}), {d['truncated']} truncated.", ""]
        if d["problems"]:
            out += ["| problem | rows | first lines | example |", "|---|---|---|---|"]
            for k, v in d["problems"].items():
                ex = (v["examples"][0] if v["examples"] else "").replace("|", "\\|")
                out.append(f"| {k} | {v['count']} | {', '.join(map(str, v['first_lines'][:5]))} | {ex} |")
        return "\n".join(out)


# -- reading ---------------------------------------------------------------------------------

def _decode_lines(path: Path, report: Report) -> list[tuple[int, str]]:
    out = []
    for i, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            report.add("non_utf8", i, f"byte {e.start}: {raw[e.start:e.start + 4]!r}")
            continue
        out.append((i, text.rstrip("\r")))
    return out


def read_rows(path: Path, report: Report) -> list[Row]:
    """Rows of a local JSONL/JSON/CSV/Parquet file, each with the line a user would look at."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"data.source: file not found: {path}")
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for i, text in _decode_lines(path, report):
            if not text.strip():
                continue
            try:
                rows.append(Row(i, json.loads(text)))
            except json.JSONDecodeError as e:
                report.add("invalid_json", i, e.msg)
        return rows
    if suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if isinstance(obj, dict):
            obj = next((v for v in obj.values() if isinstance(v, list)), None)
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON list of records (or an object holding one)")
        return [Row(i, r) for i, r in enumerate(obj, start=1)]
    if suffix in (".csv", ".tsv"):
        lines = _decode_lines(path, report)
        text = "\n".join(t for _, t in lines)
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        # data lines start at 2 (line 1 is the header); the reader's line_num tracks quoted newlines
        return [Row(reader.line_num, dict(r)) for r in reader]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return [Row(i, r) for i, r in enumerate(table.to_pylist(), start=1)]
    raise DataError(f"data.source: {path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")


def read_hf_dataset(name: str, split: str, report: Report) -> list[Row]:
    """A Hugging Face dataset id (or a local dataset dir) through the real `datasets.load_dataset`."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the name
        raise DataError(f"data.source: cannot load Hugging Face dataset {name!r} split {split!r}: {e}") from None
    return [Row(i, r) for i, r in enumerate(ds, start=1)]


# -- shapes ----------------------------------------------------------------------------------

def _text(value: Any, field_name: str, row: Row, report: Report) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        report.add("empty_field", row.line, f"`{field_name}` is empty")
        return None
    if not isinstance(value, str):
        report.add("wrong_type", row.line, f"`{field_name}` is {type(value).__name__}, expected text")
        return None
    if _CONTROL.search(value):
        report.add("control_characters", row.line, f"`{field_name}` holds {_CONTROL.search(value).group()!r}")
        return None
    return value.strip()


def _keys(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
            value = parsed if isinstance(parsed, list) else [value]
        except json.JSONDecodeError:
            value = [v for v in value.split("|")]
    if isinstance(value, (list, tuple)):
        keys = [str(v).strip() for v in value if str(v).strip()]
        return keys or None
    return [str(value)]


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "bot": "assistant", "model": "assistant"}


def to_example(row: Row, cfg: DataConfig, report: Report) -> Example | None:
    """One source row -> chat messages, whatever the shape. None (and a report entry) if unusable."""
    r = row.raw
    if not isinstance(r, dict):
        report.add("wrong_type", row.line, f"row is {type(r).__name__}, expected an object")
        return None
    messages: list[dict] | None = None
    if "messages" in r or "conversations" in r:
        turns = r.get("messages", r.get("conversations"))
        if isinstance(turns, str):
            try:
                turns = json.loads(turns)
            except json.JSONDecodeError:
                turns = None
        if not isinstance(turns, list) or not turns:
            report.add("wrong_type", row.line, "`messages` must be a non-empty list of turns")
            return None
        messages = []
        for t in turns:
            if not isinstance(t, dict):
                report.add("wrong_type", row.line, "a turn is not an object")
                return None
            role = t.get("role", t.get("from"))
            role = _SHAREGPT_ROLES.get(str(role).lower(), role)
            content = _text(t.get("content", t.get("value")), f"{role} turn", row, report)
            if content is None:
                return None
            messages.append({"role": role, "content": content})
        if not _roles_in_order(messages):
            report.add("roles_out_of_order", row.line, " → ".join(m["role"] for m in messages))
            return None
    elif "instruction" in r and "output" in r and cfg.question_field not in r:
        instruction = _text(r.get("instruction"), "instruction", row, report)
        output = _text(r.get("output"), "output", row, report)
        if instruction is None or output is None:
            return None
        extra = r.get("input")
        prompt = f"{instruction}\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    else:
        for name in (cfg.question_field, cfg.answer_field):
            if name not in r:
                report.add("missing_field", row.line, f"no `{name}` column (columns: {', '.join(map(str, r))})")
                return None
        q = _text(r[cfg.question_field], cfg.question_field, row, report)
        a = _text(r[cfg.answer_field], cfg.answer_field, row, report)
        if q is None or a is None:
            return None
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    split = r.get("split")
    return Example(
        id=str(r.get("id", f"row-{row.line}")),
        messages=messages,
        key=_keys(r.get(cfg.key_field)),
        split=split if split in SPLITS else None,
        category=r.get("category"),
        part=r.get("part"),
        line=row.line,
    )


def _roles_in_order(messages: list[dict]) -> bool:
    roles = [m["role"] for m in messages]
    if any(r not in ROLES for r in roles):
        return False
    body = roles[1:] if roles[0] == "system" else roles
    if not body or body[-1] != "assistant":
        return False
    return all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(body))


def normalize_question(text: str) -> str:
    """For duplicate detection: NFKC, lowercase, no spaces or punctuation."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if ch.isalnum())


def _bigrams(s: str) -> set[str]:
    return {s[i:i + 2] for i in range(len(s) - 1)} or {s}


def drop_duplicates(examples: list[Example], report: Report, threshold: float = 0.9) -> list[Example]:
    """Exact duplicates (same normalised prompt) and near duplicates (bigram Jaccard ≥ threshold
    with the same numbers: "3 더하기 4는?" and "3 더하기 5는?" are different questions)."""
    kept: list[Example] = []
    seen: dict[str, int] = {}
    grams: list[tuple[set[str], int, list[str]]] = []
    index: dict[str, list[int]] = defaultdict(list)
    for ex in examples:
        prompt = normalize_question(" ".join(m["content"] for m in ex.messages if m["role"] == "user"))
        if prompt in seen:
            report.add("duplicate", ex.line, f"same question as line {seen[prompt]}")
            continue
        g, numbers = _bigrams(prompt), re.findall(r"\d+", prompt)
        candidates = {j for b in g for j in index[b]}
        near = next((grams[j][1] for j in sorted(candidates) if grams[j][2] == numbers
                     and len(g & grams[j][0]) / len(g | grams[j][0]) >= threshold), None)
        if near is not None:
            report.add("near_duplicate", ex.line, f"nearly the same question as line {near}")
            continue
        seen[prompt] = ex.line
        for b in g:
            index[b].append(len(grams))
        grams.append((g, ex.line, numbers))
        kept.append(ex)
    return kept


# -- loading a source end to end ------------------------------------------------------------

def load_examples(cfg: DataConfig, read_file=None) -> tuple[dict[str, list[Example]], Report]:
    """Source -> examples per split, validated. Raises DataError past `max_bad_fraction`.

    `read_file(uri) -> local Path` fetches object-store files; local paths need nothing.
    """
    source = cfg.source
    if source.startswith("bundled:"):
        name = source.split(":", 1)[1]
        if name not in BUNDLED:
            raise DataError(f"data.source: unknown bundled dataset {name!r} (have: {', '.join(BUNDLED)})")
        report = Report(source)
        rows_by_split = {}
        for split in SPLITS:
            path = BUNDLED[name] / f"{split}.jsonl"
            rows_by_split[split] = [Row(r.line, {**r.raw, "split": split}) for r in read_rows(path, report)]
        rows = [r for s in SPLITS for r in rows_by_split[s]]
    elif source.startswith("hf:"):
        report = Report(source)
        rows = read_hf_dataset(source[3:], cfg.split, report)
    else:
        path = Path(source[len("file://"):]) if source.startswith("file://") else None
        if path is None and "://" in source:
            if read_file is None:
                raise DataError(f"data.source: cannot read {source} without a store")
            path = read_file(source)
        path = path or Path(source)
        report = Report(str(source))
        rows = read_rows(path, report)
    report.rows = len(rows) + sum(1 for p in ("invalid_json", "non_utf8") for _ in report.problems.get(p, []))
    if not rows and not report.rows:
        raise DataError(f"data.source: {source} holds no rows")
    examples = [ex for row in rows if (ex := to_example(row, cfg, report)) is not None]
    examples = drop_duplicates(examples, report)
    try:
        check_bad_fraction(report, cfg.max_bad_fraction)
        return split_examples(examples, cfg), report
    except DataError as e:
        e.report = report
        raise


def check_bad_fraction(report: Report, limit: float) -> None:
    if report.rows and report.bad_rows / report.rows > limit:
        worst = sorted(report.problems.items(), key=lambda kv: -len(kv[1]))
        parts = [f"{k} ({len(v)} rows, e.g. line{'s' if len(v) > 1 else ''} {', '.join(map(str, v[:5]))})"
                 for k, v in worst]
        raise DataError(
            f"{report.source}: {report.bad_rows} of {report.rows} rows are bad "
            f"({report.bad_rows / report.rows:.0%} > data.max_bad_fraction={limit:.0%}): " + "; ".join(parts)
        )


def split_examples(examples: list[Example], cfg: DataConfig) -> dict[str, list[Example]]:
    """Use the rows' own `split` column when present; else a stable hash split (same row, same split)."""
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for ex in examples:
        split = ex.split
        if split is None:
            h = int(hashlib.sha256(normalize_question(ex.messages[-2]["content"]).encode()).hexdigest()[:8], 16)
            split = "test" if h / 0xFFFFFFFF < cfg.test_fraction else "train"
        out[split].append(ex)
    if not out["train"]:
        raise DataError(f"{cfg.source}: no training rows after validation")
    if not out["test"]:
        raise DataError(f"{cfg.source}: no held-out (test) rows; add a `split` column or raise data.test_fraction")
    if cfg.train_limit:
        out["train"] = out["train"][: cfg.train_limit]
    if cfg.test_limit and len(out["test"]) > cfg.test_limit:
        out["test"] = balanced_subset(out["test"], cfg.test_limit)
    return out


def balanced_subset(examples: list[Example], n: int) -> list[Example]:
    """Round-robin over test parts, so a limit keeps taught and unseen facts in proportion."""
    groups: dict[str | None, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex.part].append(ex)
    queues = list(groups.values())
    out: list[Example] = []
    i = 0
    while len(out) < n and any(queues):
        q = queues[i % len(queues)]
        if q:
            out.append(q.pop(0))
        i += 1
    return out


# -- templating ------------------------------------------------------------------------------

def encode_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels: prompt pieces are rendered with the chat template and masked (-100);
    each assistant turn (text + end-of-turn) is labelled. Pieces are tokenised separately and
    concatenated, so the mask lines up with the ids exactly."""
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt_text = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt_text.startswith(rendered) or not full_text.startswith(prompt_text):
            raise DataError("the chat template does not render turns as a prefix of the conversation")
        p_ids = tokenizer(prompt_text[len(rendered):], add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        ids += p_ids + a_ids
        labels += [-100] * len(p_ids) + a_ids
        rendered = full_text
    return ids, labels


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The templated prompt for generation: everything before the last assistant turn."""
    text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_split(tokenizer, examples: list[Example], cfg: DataConfig, report: Report, split: str) -> list[dict]:
    """Templated, tokenised records ready for training and evaluation; overlong rows dropped or cut."""
    eos_id = tokenizer.eos_token_id
    out = []
    for ex in examples:
        ids, labels = encode_example(tokenizer, ex.messages)
        if len(ids) > cfg.max_length:
            if cfg.overlong == "drop":
                report.add("too_long", ex.line, f"{len(ids)} tokens > data.max_length={cfg.max_length} ({split})")
                continue
            report.truncated += 1
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        if not out and eos_id is not None and eos_id not in [t for t, lab in zip(ids, labels) if lab != -100]:
            raise DataError("the chat template's assistant turn does not end with the EOS token: "
                            "the model would never learn to stop")
        out.append({
            "id": ex.id,
            "messages": ex.messages,
            "key": ex.key,
            "category": ex.category,
            "part": ex.part,
            "input_ids": ids,
            "labels": labels,
            "prompt_ids": prompt_ids(tokenizer, ex.messages),
            "n_tokens": len(ids),
        })
    return out


def fingerprint(splits: dict[str, list[dict]], chat_template: str | None) -> str:
    """Content hash of the prepared splits plus the template: the data's cache key downstream."""
    h = hashlib.sha256((chat_template or "").encode())
    for split in SPLITS:
        for rec in splits.get(split, []):
            h.update(json.dumps([split, rec["input_ids"], rec["labels"], rec["key"]]).encode())
    return h.hexdigest()[:16]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_stats(splits: dict[str, list[dict]]) -> dict:
    stats = {}
    for split, recs in splits.items():
        n = [r["n_tokens"] for r in recs]
        stats[split] = {
            "rows": len(recs),
            "tokens": sum(n),
            "max_tokens": max(n, default=0),
            "by_category": dict(Counter(r["category"] for r in recs if r["category"])),
            "by_part": dict(Counter(r["part"] for r in recs if r["part"])),
        }
    return stats
