"""Tokenised records for training and evaluation: examples rendered with the model's own chat
template, labels -100 everywhere but on assistant turns (their text and the end-of-turn token, so
the loss teaches answers, not the prompt, and EOS keeps its label); their fingerprint; JSONL files.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from slmforge.config import DataConfig
from slmforge.data import SPLITS, Example
from slmforge.readers import DataError, Report


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


def generation_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation so far, templated, with the assistant's turn opened for generation."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The templated prompt for generation: everything before the last assistant turn."""
    return generation_prompt_ids(tokenizer, messages[:-1])


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
