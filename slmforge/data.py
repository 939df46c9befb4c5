"""Q&A data: every source becomes examples of chat `messages` (plus an optional `key` fact); bad
rows are refused loudly, duplicates dropped, and the examples split.

Sources: `bundled:<name>`; a local or object-store (`s3://…`, any fsspec URL) `.jsonl`, `.json`,
`.csv`/`.tsv` or `.parquet` file; `hf:<dataset id or local dir>`. Reading and locating rows is
`slmforge.readers`; templating and tokenising the examples is `slmforge.records`.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from slmforge.config import PROJECT_DIR, DataConfig
from slmforge.readers import FILE_TYPES, DataError, Loc, Report, Row, read_hf_dataset, read_rows

BUNDLED = {"korean-qa": PROJECT_DIR / "data" / "korean_qa"}
# `bundled:korean-qa-quick`: the same test and validation files, but train keeps only the rows of
# the facts the test asks again in a new wording (its `taught` part). A few minutes of CPU can
# teach a 135M model these facts; all 339 train facts need the full set and more epochs. No
# validation row is about a taught fact, so its loss measures only facts never trained (it rises
# from the first epoch) and cannot choose the recipe for taught facts, which was chosen on held-out
# train wordings instead (benchmarks/key_accuracy_sweep.py `holdout`); the calibrate stage fits
# its temperature on it, which is what such answers need.
QUICK_SUFFIX = "-quick"
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {**{s: s for s in SPLITS}, "val": "validation", "valid": "validation", "dev": "validation"}
ROLES = ("system", "user", "assistant")
# C0 controls but tab/newline/carriage return, DEL, and the C1 block (mojibake from Latin-1/CP1252)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# bytes that were not UTF-8, kept by decoding with errors="surrogateescape"
_UNDECODABLE = re.compile(r"[\udc80-\udcff]")


@dataclass
class Example:
    id: str
    messages: list[dict]
    key: list[str] | None
    split: str | None = None
    category: str | None = None
    part: str | None = None
    line: Loc = 0



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

def bundled_files(source: str) -> tuple[list[Path], bool]:
    """The files of a `bundled:NAME[-quick]` source, one per split, and whether it is the quick subset."""
    name = source.strip().split(":", 1)[1]
    quick = name.endswith(QUICK_SUFFIX) and name.removesuffix(QUICK_SUFFIX) in BUNDLED
    name = name.removesuffix(QUICK_SUFFIX) if quick else name
    if name not in BUNDLED:
        have = ", ".join(n for b in BUNDLED for n in (b, b + QUICK_SUFFIX))
        raise DataError(f"data.source: unknown bundled dataset {name!r} (have: {have})")
    return [BUNDLED[name] / f"{split}.jsonl" for split in SPLITS], quick


def _read_source(cfg: DataConfig, report: Report, read_file: Callable[[str], Path] | None,
                 revision: str | None = None) -> list[Row]:
    source = cfg.source.strip()
    if source.startswith("bundled:"):
        files, quick = bundled_files(source)
        rows = []
        for split, path in zip(SPLITS, files):  # three files: a row is `file:line`
            for r in _read_prefixed(path, report):
                raw = {**r.raw, "split": split} if isinstance(r.raw, dict) else r.raw
                rows.append(Row(f"{path.name}:{r.line}", raw))
        if quick:
            raw = [r.raw if isinstance(r.raw, dict) else {} for r in rows]
            taught = {x.get("fact") for x in raw if x.get("split") == "test" and x.get("part") == "taught"}
            rows = [r for r, x in zip(rows, raw) if x.get("split") != "train" or x.get("fact") in taught]
        return rows
    if source.startswith("hf:"):
        return read_hf_dataset(source[3:], cfg, report, revision)
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


def load_examples(cfg: DataConfig, read_file: Callable[[str], Path] | None = None, revision: str | None = None
                  ) -> tuple[dict[str, list[Example]], Report]:
    """Source -> examples per split, validated. Raises DataError past `max_bad_fraction`, with
    the report attached as `error.report` once any row was read.

    `read_file(uri) -> local Path` fetches object-store files; local paths need nothing.
    `revision`: the Hub commit an `hf:` dataset was pinned to (slmforge.identity).
    """
    report = Report(cfg.source.strip(), max_bad_fraction=cfg.max_bad_fraction)
    try:
        rows = _read_source(cfg, report, read_file, revision)
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
