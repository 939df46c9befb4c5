"""Held-out evaluation: greedy answers with the model's chat template, answer loss, and metrics
per test part and per category."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from slmforge import metrics

METRICS = ("key_accuracy", "exact_match", "char_f1", "chrf", "answer_chars", "stopped_with_eos")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of prompts padded on the left (decoder-only generation continues on the right), and its mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int,
                     seed: int = 0, progress=None) -> list[dict]:
    """Greedy, batched (left-padded) generation. Records carry `prompt_ids` from the prepare stage."""
    torch.manual_seed(seed)
    device = _device(model)
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    out: list[dict] = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        ids, mask = left_pad([r["prompt_ids"] for r in batch], pad_id)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id,
        )
        for i, _ in enumerate(batch):
            new = gen[i, width:].tolist()
            stopped = eos_id in new
            if stopped:
                new = new[: new.index(eos_id)]
            out.append({
                "answer": tokenizer.decode(new, skip_special_tokens=True).strip(),
                "stopped_with_eos": float(stopped),
                "new_tokens": len(new),
            })
        if progress:
            progress(min(start + batch_size, len(records)), len(records))
    return out


def answer_token_logits(model, records: list[dict], batch_size: int, pad_id: int, hidden: bool = False):
    """Per batch: the logits that predict each labelled (assistant) token, float32 [n, vocab], the
    tokens [n], and which record each belongs to [n] (an index into the batch). `hidden`: the last
    hidden state there instead [n, hidden size], what the LM head reads (after the final norm)."""
    device = _device(model)
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        # The answers sit at the end of each row: the LM head runs from the batch's first labelled
        # position on (as in training), not over the prompts, which are most of each row.
        labelled = (labels[:, 1:] != -100).any(0).nonzero()
        first = int(labelled[0]) if len(labelled) else width - 1
        with torch.no_grad():
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=hidden,
                        logits_to_keep=1 if hidden else width - first)
        scores = out.hidden_states[-1][:, first:] if hidden else out.logits
        shift_labels = labels[:, 1 + first:].to(device)
        where = shift_labels != -100
        row = torch.arange(len(batch), device=device).unsqueeze(1).expand_as(shift_labels)
        yield scores[:, :-1][where].float(), shift_labels[where], row[where]


def per_record_mean(values: torch.Tensor, row: torch.Tensor, n: int) -> torch.Tensor:
    """Means of `values` ([tokens] or [tokens, k]) per record index in `row`: each record weighs the same."""
    sums = torch.zeros((n, *values.shape[1:]), dtype=values.dtype, device=values.device).index_add_(0, row, values)
    counts = torch.bincount(row, minlength=n).clamp(min=1).to(values.dtype)
    return sums / (counts.view(-1, *([1] * (values.dim() - 1))))


def answer_losses(model, records: list[dict], batch_size: int, pad_id: int) -> list[float]:
    """Mean cross-entropy per record over its labelled (assistant) tokens only."""
    losses: list[float] = []
    for start, (logits, tokens, row) in zip(range(0, len(records), batch_size),
                                            answer_token_logits(model, records, batch_size, pad_id)):
        n = min(batch_size, len(records) - start)
        tok_loss = torch.nn.functional.cross_entropy(logits, tokens, reduction="none")
        losses += per_record_mean(tok_loss, row, n).tolist()
    return losses


def aggregate(items: list[dict]) -> dict:
    """Overall, per test part and per category means of every metric, plus counts."""
    def summarise(group: list[dict]) -> dict:
        s = {m: metrics.mean(it[m] for it in group) for m in METRICS}
        s["chrf"] = metrics.corpus_chrf([it["answer"] for it in group], [it["reference"] for it in group])
        loss = metrics.mean(it["answer_loss"] for it in group)
        s["answer_loss"] = loss
        s["perplexity"] = math.exp(loss) if loss is not None else None
        s["n"] = len(group)
        return s

    by_part, by_cat = defaultdict(list), defaultdict(list)
    for it in items:
        by_part[it.get("part") or "all"].append(it)
        by_cat[it.get("category") or "uncategorised"].append(it)
    return {
        "overall": summarise(items),
        "by_part": {k: summarise(v) for k, v in sorted(by_part.items())},
        "by_category": {k: summarise(v) for k, v in sorted(by_cat.items())},
    }


def evaluate_model(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int,
                   seed: int = 0, progress=None, generation_batch_size: int | None = None) -> dict:
    """Answers, per-item scores and aggregates for one model on the held-out records. `batch_size`
    rows per answer-loss pass; `generation_batch_size` (default: the same) rows per generation."""
    answers = generate_answers(model, tokenizer, records, max_new_tokens, generation_batch_size or batch_size,
                               seed, progress)
    losses = answer_losses(model, records, batch_size, tokenizer.pad_token_id)
    items = []
    for rec, ans, loss in zip(records, answers, losses):
        reference = rec["messages"][-1]["content"]
        question = next(m["content"] for m in reversed(rec["messages"]) if m["role"] == "user")
        items.append({
            "id": rec["id"], "part": rec.get("part"), "category": rec.get("category"),
            "question": question, "reference": reference, "key": rec.get("key"),
            "answer": ans["answer"], "stopped_with_eos": ans["stopped_with_eos"], "new_tokens": ans["new_tokens"],
            "answer_loss": loss,
            **metrics.score_answer(ans["answer"], reference, rec.get("key")),
        })
    return {"items": items, "summary": aggregate(items)}

