"""Reading rows from the files users have, each located where a user would look.

`.jsonl`, `.json`, `.csv`/`.tsv` and `.parquet` files, and `hf:` datasets through `datasets`' own
loaders. Every row carries the line a user would open in an editor (JSONL, JSON, CSV) or its
1-based row number (Parquet, Hugging Face), and problems go into a `Report` that names them. The
text formats are read here rather than by `datasets`' json/csv builders because those stop at the
first malformed record without saying which line it is; a bad row here is counted, located and
dropped, and the run stops only past `data.max_bad_fraction`.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmforge.config import DataConfig

FILE_TYPES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")

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


def read_hf_dataset(name: str, cfg: DataConfig, report: Report, revision: str | None = None) -> list[Row]:
    """A Hugging Face dataset through the real `datasets` loaders.

    `name` is a Hub id (`org/name`), a packaged builder with `data.hf_data_files` (`json`, `csv`,
    `parquet`), a local directory of data files, or a directory written by `save_to_disk`.
    `revision`: the commit the run pinned (slmforge.identity), read instead of `data.hf_revision`."""
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
                                       revision=revision or cfg.hf_revision)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the name
        raise DataError(f"data.source: cannot load Hugging Face dataset {name!r} split {cfg.split!r}: "
                        f"{type(e).__name__}: {e}") from None
    report.rows += len(ds)
    return [Row(i, r) for i, r in enumerate(ds, start=1)]
