"""Reading Q&A data in the shapes users have it, refusing bad rows loudly, and templating.

Every source becomes rows of chat `messages` (plus an optional `key` fact), rendered with the
model's own chat template. Labels are -100 everywhere but on assistant turns (their text and the
end-of-turn token), so the loss teaches answers, not the system prompt, and EOS keeps its label.

Sources: `bundled:<name>`; a local or object-store (`s3://…`, any fsspec URL) `.jsonl`, `.json`,
`.csv`/`.tsv` or `.parquet` file; `hf:<dataset id or local dir>` through `datasets.load_dataset`
(or `load_from_disk` for a `save_to_disk` directory). Every row is located by the line a user
would open in an editor (JSONL, JSON, CSV) or its 1-based row number (Parquet, Hugging Face).
"""

from __future__ import annotations

import bisect
import codecs
import csv
import hashlib
import io
import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from slmforge.config import PROJECT_DIR, DataConfig

BUNDLED = {"korean-qa": PROJECT_DIR / "data" / "korean_qa"}
# `bundled:korean-qa-quick`: the same test file, but train and validation keep only the rows of
# the facts the test asks again in a new wording (its `taught` part). A few minutes of CPU can
# teach a 135M model these facts; all 339 train facts need the full set and more epochs. No
# validation row is about a taught fact, so the quick set has no validation split: its loss would
# measure only facts never trained (it rose from the first epoch) and cost the trainer an
# evaluation per epoch. The recipe for taught facts was chosen on held-out train wordings
# (benchmarks/key_accuracy_sweep.py `holdout`).
QUICK_SUFFIX = "-quick"
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {**{s: s for s in SPLITS}, "val": "validation", "valid": "validation", "dev": "validation"}
ROLES = ("system", "user", "assistant")
FILE_TYPES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
# C0 controls but tab/newline/carriage return, DEL, and the C1 block (mojibake from Latin-1/CP1252)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# bytes that were not UTF-8, kept by decoding with errors="surrogateescape"
_UNDECODABLE = re.compile(r"[\udc80-\udcff]")

Loc = int | str  # a line / row number, or `file:line` for a source made of several files


class DataError(ValueError):
    """The data cannot be used; the message names the file, the problem and example lines.

    `report` (when set) is the validation report of the rows read so far."""

    report: "Report | None" = None


@dataclass
class Row:
    line: Loc  # 1-based line (JSONL/JSON/CSV) or row number (Parquet, Hugging Face) in the source
    raw: Any


@dataclass
class Example:
    id: str
    messages: list[dict]
    key: list[str] | None
    split: str | None = None
    category: str | None = None
    part: str | None = None
    line: Loc = 0


@dataclass
class Report:
    """What validation found: counts per problem and the first rows of each, with their lines."""

    source: str
    unit: str = "line"  # what `line` numbers count: "line" (text files) or "row" (Parquet, HF)
    max_bad_fraction: float | None = None
    rows: int = 0  # records read, including the ones that could not be parsed
    problems: dict[str, list[Loc]] = field(default_factory=lambda: defaultdict(list))
    details: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    truncated: int = 0
    truncated_lines: list[Loc] = field(default_factory=list)

    def add(self, problem: str, line: Loc, detail: str = "") -> None:
        self.problems[problem].append(line)
        if detail and len(self.details[problem]) < 5:
            self.details[problem].append(f"{self.unit} {line}: {detail}")

    @property
    def bad_rows(self) -> int:
        return len({ln for lines in self.problems.values() for ln in lines})

    @property
    def bad_fraction(self) -> float:
        return self.bad_rows / self.rows if self.rows else (1.0 if self.problems else 0.0)

    def to_dict(self) -> dict:
        frac = round(self.bad_fraction, 4)
        return {
            "source": self.source,
            "unit": self.unit,
            "rows": self.rows,
            "bad_rows": self.bad_rows,
            "bad_fraction": frac,
            "max_bad_fraction": self.max_bad_fraction,
            "passed": None if self.max_bad_fraction is None else frac <= self.max_bad_fraction,
            "truncated": self.truncated,
            "truncated_lines": self.truncated_lines[:10],
            "problems": {k: {"count": len(v), "first_lines": v[:10], "examples": self.details.get(k, [])}
                         for k, v in sorted(self.problems.items()) if v},
        }

    def markdown(self) -> str:
        return report_markdown(self.to_dict())


def report_markdown(d: dict) -> str:
    """The report as markdown (a Prefect artifact, `validation_report.md`), from `Report.to_dict()`."""
    unit = d.get("unit", "line")
    verdict = ""
    if d.get("passed") is not None:
        verdict = (" Within" if d["passed"] else " **Over**") + f" data.max_bad_fraction={d['max_bad_fraction']:.0%}."
    out = [f"### Data validation: `{d['source']}`", "",
           f"{d['rows']} rows read, {d['bad_rows']} bad and dropped ({d['bad_fraction']:.1%}), "
           f"{d['truncated']} truncated to data.max_length.{verdict}", ""]
    if d["problems"]:
        out += [f"| problem | rows | first {unit}s | example |", "|---|---|---|---|"]
        for k, v in d["problems"].items():
            ex = (v["examples"][0] if v["examples"] else "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| {k} | {v['count']} | {', '.join(map(str, v['first_lines'][:5]))} | {ex} |")
    else:
        out.append("No problems found.")
    if d.get("truncated_lines"):
        out += ["", f"Truncated {unit}s: {', '.join(map(str, d['truncated_lines']))}"]
    return "\n".join(out)


# -- reading ---------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 survive as surrogates, so the row holding them is
    reported (`non_utf8`) instead of the whole file failing."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path}: the file is UTF-16 text; save it as UTF-8")
    if raw.startswith(codecs.BOM_UTF8):  # Excel's "CSV UTF-8"
        raw = raw[len(codecs.BOM_UTF8):]
    return raw.decode("utf-8", "surrogateescape")


def _read_jsonl(path: Path, report: Report) -> list[Row]:
    rows = []
    for i, text in enumerate(_read_text(path).split("\n"), start=1):
        if not text.strip():
            continue
        report.rows += 1
        try:
            rows.append(Row(i, json.loads(text)))
        except json.JSONDecodeError as e:
            report.add("invalid_json", i, f"{e.msg} (column {e.colno})")
    return rows


_WS = re.compile(r"[ \t\n\r]*")


def _json_record_offsets(text: str) -> list[int]:
    """Character offsets of the records of a JSON document that `_json_records` takes: the
    top-level list, or the first list value of a top-level object. The text is valid JSON."""
    dec = json.JSONDecoder()

    def ws(i: int) -> int:
        return _WS.match(text, i).end()

    def elements(i: int) -> list[int]:  # text[i] == "["
        out: list[int] = []
        i = ws(i + 1)
        while text[i] != "]":
            out.append(i)
            _, i = dec.raw_decode(text, i)
            i = ws(i)
            if text[i] == ",":
                i = ws(i + 1)
        return out

    i = ws(0)
    if text[i] == "[":
        return elements(i)
    i = ws(i + 1)  # top-level object: find its first list value
    while text[i] != "}":
        _, i = dec.raw_decode(text, i)  # the key
        i = ws(ws(i) + 1)  # past ':'
        if text[i] == "[":
            return elements(i)
        _, i = dec.raw_decode(text, i)
        i = ws(i)
        if text[i] == ",":
            i = ws(i + 1)
    return []


def _read_json(path: Path, report: Report) -> list[Row]:
    text = _read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        report.add("invalid_json", e.lineno, f"{e.msg} (column {e.colno})")
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    records = obj
    if isinstance(obj, dict):
        records = next((v for v in obj.values() if isinstance(v, list)), None)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records (or an object holding one); "
                        f"for one record per line use .jsonl")
    try:  # the line each record starts on, for messages a user can act on
        newlines = [m.start() for m in re.finditer("\n", text)]
        offsets = _json_record_offsets(text)
        assert len(offsets) == len(records)
        lines: list[int] = [bisect.bisect_left(newlines, off) + 1 for off in offsets]
    except Exception:  # noqa: BLE001 - duplicate keys and the like: fall back to record numbers
        lines = list(range(1, len(records) + 1))
        report.unit = "record"
    report.rows += len(records)
    return [Row(ln, r) for ln, r in zip(lines, records)]


def _read_csv(path: Path, report: Report) -> list[Row]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 24))  # long answers are for max_length to judge
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        while header is not None and not any(h.strip() for h in header):
            header = next(reader, None)
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: unreadable CSV header: {e}") from None
    if header is None:
        return []
    header = [h.strip() for h in header]
    rows = []
    prev = reader.line_num
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # the reader cannot go on: the rest of the file cannot be trusted
            report.rows += 1
            report.add("invalid_csv", prev + 1, str(e))
            raise DataError(f"{path}: unreadable CSV at line {prev + 1} (or the record starting there): {e}") from None
        start, prev = prev + 1, reader.line_num  # a quoted field may span lines: report the first
        if not any(c.strip() for c in rec):
            continue
        report.rows += 1
        if len(rec) != len(header):
            report.add("wrong_field_count", start,
                       f"{len(rec)} fields, the header has {len(header)} (an unquoted {delimiter!r} in a value?)")
            continue
        rows.append(Row(start, dict(zip(header, rec))))
    return rows


def _read_parquet(path: Path, report: Report) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    report.unit = "row"
    report.rows += len(records)
    return [Row(i, r) for i, r in enumerate(records, start=1)]


def read_rows(path: Path, report: Report) -> list[Row]:
    """Rows of a local JSONL/JSON/CSV/Parquet file, each with the line a user would look at.
    Counts every record read (parsable or not) into `report.rows`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise DataError(f"data.source: {path}: unsupported file type {suffix or '(none)'!r} "
                        f"(use .jsonl, .json, .csv, .tsv or .parquet, or hf:<dataset>)")
    if not path.is_file():
        raise DataError(f"data.source: file not found: {path}")
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, report)
    if suffix == ".json":
        return _read_json(path, report)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, report)
    return _read_parquet(path, report)


def read_hf_dataset(name: str, cfg: DataConfig, report: Report) -> list[Row]:
    """A Hugging Face dataset through the real `datasets` loaders.

    `name` is a Hub id (`org/name`), a packaged builder with `data.hf_data_files` (`json`, `csv`,
    `parquet`), a local directory of data files, or a directory written by `save_to_disk`."""
    import datasets

    report.unit = "row"
    local = Path(name).expanduser()
    try:
        if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DataError(f"data.split: {name} has no split {cfg.split!r} (has: {', '.join(ds)})")
                ds = ds[cfg.split]
        else:
            ds = datasets.load_dataset(name, cfg.hf_config, data_files=cfg.hf_data_files, split=cfg.split,
                                       revision=cfg.hf_revision)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the name
        raise DataError(f"data.source: cannot load Hugging Face dataset {name!r} split {cfg.split!r}: "
                        f"{type(e).__name__}: {e}") from None
    report.rows += len(ds)
    return [Row(i, r) for i, r in enumerate(ds, start=1)]


# -- shapes ----------------------------------------------------------------------------------

def _undecodable(value: Any, path: str = "") -> tuple[str, str] | None:
    """(where, byte) of the first byte that was not UTF-8 anywhere in a row, or None."""
    if isinstance(value, str):
        m = _UNDECODABLE.search(value)
        return (path or "row", f"0x{ord(m.group()) - 0xDC00:02x}") if m else None
    if isinstance(value, dict):
        for k, v in value.items():
            hit = _undecodable(k, path or "a column name") or _undecodable(v, f"`{k}`" if not path else path)
            if hit:
                return hit
    if isinstance(value, (list, tuple)):
        for v in value:
            if hit := _undecodable(v, path):
                return hit
    return None


def _text(value: Any, field_name: str, row: Row, report: Report) -> str | None:
    if isinstance(value, (bytes, bytearray)):  # a Parquet binary column
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            report.add("non_utf8", row.line, f"`{field_name}` byte {e.start} is not UTF-8")
            return None
    if value is None or (isinstance(value, str) and not value.strip()):
        report.add("empty_field", row.line, f"`{field_name}` is empty")
        return None
    if not isinstance(value, str):
        report.add("wrong_type", row.line, f"`{field_name}` is {type(value).__name__} {value!r:.40}, expected text")
        return None
    if m := _CONTROL.search(value):
        report.add("control_characters", row.line, f"`{field_name}` holds {m.group()!r} at character {m.start()}")
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


def _turns(r: dict, row: Row, report: Report) -> list[dict] | None:
    """Chat `messages` (role/content) or ShareGPT `conversations` (from/value) -> messages."""
    name = "messages" if "messages" in r else "conversations"
    turns = r[name]
    if isinstance(turns, str):  # a CSV column holding JSON
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            report.add("wrong_type", row.line, f"`{name}` is text that is not a JSON list of turns")
            return None
    if turns is None or (isinstance(turns, list) and not turns):
        report.add("empty_field", row.line, f"`{name}` is empty")
        return None
    if not isinstance(turns, list):
        report.add("wrong_type", row.line, f"`{name}` is {type(turns).__name__}, expected a list of turns")
        return None
    messages = []
    for n, t in enumerate(turns, start=1):
        if not isinstance(t, dict):
            report.add("wrong_type", row.line, f"`{name}` turn {n} is {type(t).__name__}, expected an object")
            return None
        role = t.get("role", t.get("from"))
        if role is None:
            report.add("missing_field", row.line, f"`{name}` turn {n} has no `role`/`from`")
            return None
        role = _SHAREGPT_ROLES.get(str(role).strip().lower(), role)
        content = _text(t.get("content", t.get("value")), f"{name}[{n}] ({role})", row, report)
        if content is None:
            return None
        messages.append({"role": role, "content": content})
    if problem := _role_order_problem(messages):
        report.add("roles_out_of_order", row.line, problem)
        return None
    return messages


def to_example(row: Row, cfg: DataConfig, report: Report) -> Example | None:
    """One source row -> chat messages, whatever the shape. None (and a report entry) if unusable."""
    r = row.raw
    if not isinstance(r, dict):
        report.add("wrong_type", row.line, f"row is {type(r).__name__}, expected an object")
        return None
    if bad := _undecodable(r):
        report.add("non_utf8", row.line, f"{bad[0]} holds byte {bad[1]}, not UTF-8 "
                   "(saved as CP949/EUC-KR or Latin-1? re-save the file as UTF-8)")
        return None
    if "messages" in r or "conversations" in r:
        messages = _turns(r, row, report)
        if messages is None:
            return None
    elif "instruction" in r and "output" in r and cfg.question_field not in r:  # Alpaca
        instruction = _text(r.get("instruction"), "instruction", row, report)
        if instruction is None:
            return None
        output = _text(r.get("output"), "output", row, report)
        if output is None:
            return None
        extra = r.get("input")
        if extra is not None and not (isinstance(extra, str) and not extra.strip()):
            extra = _text(extra, "input", row, report)
            if extra is None:
                return None
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    else:
        for name in (cfg.question_field, cfg.answer_field):
            if name not in r:
                report.add("missing_field", row.line, f"no `{name}` column (columns: {', '.join(map(str, r))})")
                return None
        q = _text(r[cfg.question_field], cfg.question_field, row, report)
        if q is None:
            return None
        a = _text(r[cfg.answer_field], cfg.answer_field, row, report)
        if a is None:
            return None
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    key = r.get(cfg.key_field)
    if isinstance(key, dict):
        report.add("wrong_type", row.line, f"`{cfg.key_field}` is an object, expected text or a list of texts")
        return None
    split = r.get("split")
    ident = r.get("id")
    return Example(
        id=str(ident) if ident not in (None, "") else f"row-{row.line}",
        messages=messages,
        key=_keys(key),
        split=SPLIT_ALIASES.get(split.strip().lower()) if isinstance(split, str) else None,
        category=_label(r.get("category")),
        part=_label(r.get("part")),
        line=row.line,
    )


def _label(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _role_order_problem(messages: list[dict]) -> str | None:
    """None if the turns are [system] user assistant (user assistant)*; else what is wrong."""
    roles = [m["role"] for m in messages]
    seq = " → ".join(map(str, roles))
    if unknown := [r for r in roles if r not in ROLES]:
        return f"unknown role {unknown[0]!r} ({seq})"
    body = roles[1:] if roles[0] == "system" else roles
    if not body:
        return f"no user or assistant turn ({seq})"
    if "system" in body:
        return f"a system turn must come first ({seq})"
    if any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(body)):
        return f"turns must alternate user → assistant, starting with user ({seq})"
    if body[-1] != "assistant":
        return f"the last turn must be the assistant's ({seq})"
    return None


def _roles_in_order(messages: list[dict]) -> bool:
    return _role_order_problem(messages) is None


def normalize_question(text: str) -> str:
    """For duplicate detection: NFKC, lowercase, no spaces or punctuation."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if ch.isalnum())


def _bigrams(s: str) -> set[str]:
    return {s[i:i + 2] for i in range(len(s) - 1)} or {s}


def drop_duplicates(examples: list[Example], report: Report, threshold: float = 0.9) -> list[Example]:
    """Exact duplicates (same normalised prompt) and near duplicates (bigram Jaccard ≥ threshold
    with the same numbers: "3 더하기 4는?" and "3 더하기 5는?" are different questions). The first
    occurrence is kept; `threshold` ≥ 1 checks exact duplicates only."""
    kept: list[Example] = []
    seen: dict[str, Loc] = {}
    grams: list[tuple[set[str], Loc, list[str]]] = []
    index: dict[str, list[int]] = defaultdict(list)
    for ex in examples:
        prompt = normalize_question(" ".join(m["content"] for m in ex.messages if m["role"] == "user"))
        if prompt in seen:
            report.add("duplicate", ex.line, f"same question as {report.unit} {seen[prompt]}")
            continue
        g, numbers = _bigrams(prompt), re.findall(r"\d+", prompt)
        near = None
        if threshold < 1:
            shared = Counter(j for b in g for j in index[b])
            for j in sorted(j for j, c in shared.items() if c >= threshold * len(g)):
                h, line, nums = grams[j]
                c = shared[j]
                if nums == numbers and c / (len(g) + len(h) - c) >= threshold:
                    near = line
                    break
        if near is not None:
            report.add("near_duplicate", ex.line, f"nearly the same question as {report.unit} {near}")
            continue
        seen[prompt] = ex.line
        for b in g:
            index[b].append(len(grams))
        grams.append((g, ex.line, numbers))
        kept.append(ex)
    return kept


# -- loading a source end to end ------------------------------------------------------------

def _read_source(cfg: DataConfig, report: Report, read_file: Callable[[str], Path] | None) -> list[Row]:
    source = cfg.source.strip()
    if source.startswith("bundled:"):
        name = source.split(":", 1)[1]
        quick = name.endswith(QUICK_SUFFIX) and name.removesuffix(QUICK_SUFFIX) in BUNDLED
        name = name.removesuffix(QUICK_SUFFIX) if quick else name
        if name not in BUNDLED:
            have = ", ".join(n for b in BUNDLED for n in (b, b + QUICK_SUFFIX))
            raise DataError(f"data.source: unknown bundled dataset {name!r} (have: {have})")
        rows = []
        for split in SPLITS:  # three files: a row is `file:line`
            path = BUNDLED[name] / f"{split}.jsonl"
            for r in _read_prefixed(path, report):
                raw = {**r.raw, "split": split} if isinstance(r.raw, dict) else r.raw
                rows.append(Row(f"{path.name}:{r.line}", raw))
        if quick:
            raw = [r.raw if isinstance(r.raw, dict) else {} for r in rows]
            taught = {x.get("fact") for x in raw if x.get("split") == "test" and x.get("part") == "taught"}
            rows = [r for r, x in zip(rows, raw) if x.get("split") == "test" or x.get("fact") in taught]
        return rows
    if source.startswith("hf:"):
        return read_hf_dataset(source[3:], cfg, report)
    if source.startswith("file://"):
        return read_rows(Path(source[len("file://"):]), report)
    if "://" in source:
        if Path(source.split("?", 1)[0]).suffix.lower() not in FILE_TYPES:
            raise DataError(f"data.source: {source}: unsupported file type "
                            f"(use .jsonl, .json, .csv, .tsv or .parquet)")
        if read_file is None:
            raise DataError(f"data.source: cannot read {source} without a store")
        local = read_file(source)
        try:
            return read_rows(local, report)
        except DataError as e:  # name the object the user gave, not the local copy
            raise DataError(str(e).replace(str(local), source)) from None
    return read_rows(Path(source).expanduser(), report)


def _read_prefixed(path: Path, report: Report) -> list[Row]:
    """Read one file of a multi-file source, with its problems located as `file:line`."""
    sub = Report(report.source, report.unit)
    rows = read_rows(path, sub)
    report.rows += sub.rows
    for problem, lines in sub.problems.items():
        for ln in lines:
            report.problems[problem].append(f"{path.name}:{ln}")
        for d in sub.details.get(problem, []):
            if len(report.details[problem]) < 5:
                report.details[problem].append(d.replace(f"{sub.unit} ", f"{sub.unit} {path.name}:", 1))
    return rows


def load_examples(cfg: DataConfig, read_file: Callable[[str], Path] | None = None
                  ) -> tuple[dict[str, list[Example]], Report]:
    """Source -> examples per split, validated. Raises DataError past `max_bad_fraction`, with
    the report attached as `error.report` once any row was read.

    `read_file(uri) -> local Path` fetches object-store files; local paths need nothing.
    """
    report = Report(cfg.source.strip(), max_bad_fraction=cfg.max_bad_fraction)
    try:
        rows = _read_source(cfg, report, read_file)
        if not report.rows:
            raise DataError(f"data.source: {report.source} holds no rows")
        examples = [ex for row in rows if (ex := to_example(row, cfg, report)) is not None]
        examples = drop_duplicates(examples, report, cfg.near_duplicate_threshold)
        check_bad_fraction(report, cfg.max_bad_fraction)
        return split_examples(examples, cfg), report
    except DataError as e:
        if report.rows or report.problems:
            e.report = report
        raise


def check_bad_fraction(report: Report, limit: float) -> None:
    """Fail with the file, each problem and example lines when too many rows are bad."""
    report.max_bad_fraction = limit
    if report.bad_rows and report.bad_fraction > limit:
        worst = sorted(((k, v) for k, v in report.problems.items() if v), key=lambda kv: -len(kv[1]))
        unit = report.unit
        parts = []
        for k, v in worst:
            first = report.details.get(k, [""])[0] if report.details.get(k) else ""
            detail = f" — {first}" if first else ""
            parts.append(f"{k}: {len(v)} row{'s' if len(v) > 1 else ''}, "
                         f"e.g. {unit}{'s' if len(v) > 1 else ''} {', '.join(map(str, v[:5]))}{detail}")
        raise DataError(
            f"{report.source}: {report.bad_rows} of {report.rows} rows are bad "
            f"({report.bad_fraction:.0%} > data.max_bad_fraction={limit:.0%}):\n  " + "\n  ".join(parts)
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
    """Round-robin over test parts, and within each part over categories, so a limit keeps
    taught/unseen facts and every category in proportion (the file order is not mixed)."""
    by_part: dict[str | None, dict[str | None, list[Example]]] = defaultdict(lambda: defaultdict(list))
    for ex in examples:
        by_part[ex.part][ex.category].append(ex)

    def interleave(groups: list[list[Example]]) -> list[Example]:
        out, queues = [], [list(g) for g in groups]
        while any(queues):
            for q in queues:
                if q:
                    out.append(q.pop(0))
        return out

    per_part = [interleave(list(cats.values())) for cats in by_part.values()]
    return interleave(per_part)[:n]


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
    """Templated, tokenised records ready for training and evaluation; overlong rows dropped or cut.

    `n_tokens` per record lets training pack sequences without tokenising again."""
    eos_id = tokenizer.eos_token_id
    out = []
    checked_eos = False
    for ex in examples:
        ids, labels = encode_example(tokenizer, ex.messages)
        if not checked_eos and eos_id is not None:  # before any truncation can cut the EOS off
            if eos_id not in [t for t, lab in zip(ids, labels) if lab != -100]:
                raise DataError("the chat template's assistant turn does not end with the EOS token: "
                                "the model would never learn to stop")
            checked_eos = True
        if len(ids) > cfg.max_length:
            if cfg.overlong == "drop":
                report.add("too_long", ex.line, f"{len(ids)} tokens > data.max_length={cfg.max_length} ({split})")
                continue
            n = len(ids)
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            if all(lab == -100 for lab in labels):
                report.add("too_long", ex.line, f"{n} tokens: "
                           f"no answer token left within data.max_length={cfg.max_length} ({split})")
                continue
            report.truncated += 1
            report.truncated_lines.append(ex.line)
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


def fingerprint(splits: dict[str, list[dict]], chat_template: str | None,
                only: tuple[str, ...] = SPLITS) -> str:
    """Content hash of the prepared splits (every field written) plus the template: the data's
    cache key downstream. Same rows, same key; one changed row, label or id, a new key.
    `only=("train", "validation")` gives the training key: a new test subset does not retrain."""
    h = hashlib.sha256((chat_template or "").encode())
    for split in only:
        for rec in splits.get(split, []):
            h.update(json.dumps([split, rec], sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass"))
            h.update(b"\n")
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
