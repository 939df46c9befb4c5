"""Answer metrics that work for Korean.

Key accuracy (does the answer contain the item's key fact, or an accepted variant?) is the primary
metric: it scores facts, not wording. Character-level F1 and chrF are reported beside it because
word-level metrics mislead in Korean (particles attach to words), but they flatter a model that
merely echoes the question, which is why they are not the gate's default. chrF is sacrebleu's;
char F1 (no library has it) is ours.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from sacrebleu.metrics import CHRF

_PUNCT = re.compile(r"[\s\.,!?;:'\"“”‘’()\[\]{}<>~`·…\-–—/\\]+")


def normalize(text: str) -> str:
    """NFKC, lowercase, whitespace and punctuation removed."""
    return _PUNCT.sub("", unicodedata.normalize("NFKC", text or "").lower())


def _digits_ok(answer: str, key: str, start: int) -> bool:
    """A numeric key must not be part of a longer number ('12' is not in '112' or '1.25')."""
    if not key[:1].isdigit() and not key[-1:].isdigit():
        return True
    before = answer[start - 1] if start > 0 else ""
    after = answer[start + len(key)] if start + len(key) < len(answer) else ""
    return not (before.isdigit() or after.isdigit())


def contains_key(answer: str, keys: list[str] | None) -> bool:
    """True if any accepted variant occurs in the answer (normalised; numbers as whole numbers)."""
    if not keys:
        return False
    norm = unicodedata.normalize("NFKC", answer or "").lower()
    squeezed = normalize(answer)
    for key in keys:
        k = unicodedata.normalize("NFKC", key).lower().strip()
        if not k:
            continue
        if any(ch.isdigit() for ch in k):
            for m in re.finditer(re.escape(k), norm):
                if _digits_ok(norm, k, m.start()):
                    return True
        elif normalize(k) and normalize(k) in squeezed:
            return True
    return False


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def char_f1(prediction: str, reference: str) -> float:
    """F1 over the multiset of characters of the normalised strings."""
    p, r = Counter(normalize(prediction)), Counter(normalize(reference))
    if not p and not r:
        return 1.0
    overlap = sum((p & r).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(p.values()), overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall)


# sacrebleu's chrF (Popović 2015): character n-grams 1..6, beta 2, whitespace ignored
_CHRF = CHRF()


def chrf(prediction: str, reference: str) -> float:
    """Sentence-level chrF in [0, 1], for one answer (samples, per-item scores)."""
    return _CHRF.sentence_score(prediction or "", [reference or ""]).score / 100


def corpus_chrf(predictions: list[str], references: list[str]) -> float | None:
    """Corpus-level chrF in [0, 1]: n-gram statistics summed over all answers, then one F-score (the
    standard way to report chrF; an average of sentence scores overweights short answers)."""
    if not predictions:
        return None
    return _CHRF.corpus_score([p or "" for p in predictions], [[r or "" for r in references]]).score / 100


def score_answer(prediction: str, reference: str, keys: list[str] | None) -> dict:
    return {
        "key_accuracy": float(contains_key(prediction, keys)) if keys else None,
        "exact_match": float(exact_match(prediction, reference)),
        "char_f1": char_f1(prediction, reference),
        "chrf": chrf(prediction, reference),
        "answer_chars": len(prediction or ""),
    }


def mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def gate_metric(requested: str, test_rows: int, test_rows_with_keys: int) -> tuple[str, str]:
    """(metric the gate judges, why). `auto` takes key accuracy (over the rows that have key facts)
    when the test split carries any, else chrF: every Q&A set has reference answers. Raises
    ValueError naming `eval.primary_metric` when key accuracy is asked of a split without key facts."""
    if requested == "auto":
        if test_rows_with_keys:
            return "key_accuracy", (f"eval.primary_metric=auto: {test_rows_with_keys} of {test_rows} test rows "
                                    "have key facts")
        return "chrf", "eval.primary_metric=auto: no test row has key facts, so chrF against the reference answers"
    if requested == "key_accuracy" and not test_rows_with_keys:
        raise ValueError("eval.primary_metric: key_accuracy needs key facts, but no test row has one (no `key` "
                         "column, or data.key_field names another); set eval.primary_metric to auto or chrf")
    return requested, f"eval.primary_metric={requested}"
