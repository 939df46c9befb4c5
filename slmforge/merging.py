"""Merging the adapter into the base it was trained on, and checking that what is published is
what was trained.

QLoRA fits the adapter to the dequantized 4-bit base dequant(Q(W)), not to the original W: the two
differ by the quantization error W - Q(W), which the adapter learned to work around. Merging into W
adds that error back, and the merged model computes a different function from the one training
produced and evaluation measured (the default run lost half its taught facts that way). So the
default merges into dequant(Q(W)), in float32, as Axolotl does for QLoRA; `merge.into=original`
keeps the tutorial's merge into W, which is the better base for some models. Never merge into the
4-bit model itself: peft re-quantizes the merged weight to NF4.

`check_published` then compares the saved, reloaded model with the trained one (the adapter on the
4-bit base) on held-out prompts: logits and greedy answers.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from slmforge.evaluation import generate_answers
from slmforge.modeling import load_model
from slmforge.runtime import Runtime, decide


class MergeError(RuntimeError):
    """The published model does not reproduce the trained model; it must not be published."""


def load_trained(quantized_dir: Path, adapter_dir: Path, rt: Runtime):
    """What training produced and evaluation measures: the adapter on the saved 4-bit base."""
    from peft import PeftModel

    model = load_model(quantized_dir, "saved", rt)
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def check_runtime(rt: Runtime) -> Runtime:
    """The runtime both sides of the published-model check load in: float32 weights and 4-bit compute
    on `rt`'s device, whatever training used. The tolerances (merge.max_logit_diff) were measured in
    float32; in bf16 both sides round each matmul, and the maximum over many logits would fail a
    correct merge. The published model's bf16 weights convert to float32 exactly."""
    return replace(rt, compute_dtype="float32", weights_dtype="float32", mixed_precision="no",
                   reasons={**rt.reasons, "compute_dtype": "float32: the merge check compares in float32"})


def merge(quantized_dir: Path, original_dir: Path, adapter_dir: Path, out_dir: Path, into: str = "quantized",
          save_dtype: torch.dtype = torch.bfloat16, rt: Runtime | None = None, corrupt: float = 0.0) -> dict:
    """Merge the adapter into `into` (quantized: dequant(Q(W)); original: W) in float32 and save the
    merged model in `save_dtype`. `corrupt` adds noise to one merged weight: tests use it to prove
    the published-model check catches a bad merge."""
    from peft import PeftModel

    rt = replace(rt or decide(), compute_dtype="float32")  # merge arithmetic in float32, on rt's device
    if into == "quantized":
        base = load_model(quantized_dir, "saved", rt).dequantize()
        base.is_loaded_in_4bit = False  # transformers leaves the flag on; the weights are float32 now
    elif into == "original":
        base = load_model(original_dir, "fp32", rt)
    else:
        raise ValueError(f"merge.into: {into!r} is neither 'quantized' nor 'original'")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if corrupt:
        w = next(p for n, p in merged.named_parameters() if n.endswith("q_proj.weight"))
        w.data += corrupt * torch.randn_like(w)
    merged.to(save_dtype)
    merged.config.dtype = save_dtype
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.save_pretrained(out_dir, safe_serialization=True)
    return {"into": into, "dtype": str(save_dtype).replace("torch.", "")}


@torch.no_grad()
def logit_diffs(model_a, model_b, records: list[dict]) -> tuple[float, float]:
    """(max, mean) absolute difference of the two models' logits over the records' full sequences."""
    worst, total, count = 0.0, 0.0, 0
    for rec in records:
        ids = torch.tensor([rec["input_ids"]])
        a = model_a(input_ids=ids.to(model_a.device)).logits.float().cpu()
        b = model_b(input_ids=ids.to(model_b.device)).logits.float().cpu()
        diff = (a - b).abs()
        worst = max(worst, diff.max().item())
        total += diff.sum().item()
        count += diff.numel()
    return worst, total / max(count, 1)


def check_published(trained, published, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int,
                    max_logit_diff: float, min_agreement: float) -> dict:
    """Compare the published (merged, saved, reloaded) model with the trained one on held-out
    records: logits on the reference sequences, and greedy answers to the prompts."""
    worst, mean = logit_diffs(trained, published, records)
    a = generate_answers(trained, tokenizer, records, max_new_tokens, batch_size)
    b = generate_answers(published, tokenizer, records, max_new_tokens, batch_size)
    same = sum(x["answer"] == y["answer"] for x, y in zip(a, b))
    agreement = same / max(len(records), 1)
    within = worst <= max_logit_diff and agreement >= min_agreement
    return {"compared_with": "trained (adapter on the 4-bit base)", "items": len(records),
            "max_logit_diff": worst, "mean_logit_diff": mean, "answer_agreement": agreement,
            "same_answers": same, "max_logit_diff_tolerance": max_logit_diff,
            "min_answer_agreement": min_agreement, "within_tolerance": within,
            "differing": [{"trained": x["answer"], "published": y["answer"]}
                          for x, y in zip(a, b) if x["answer"] != y["answer"]][:4]}


def describe_check(check: dict) -> str:
    return (f"published vs trained on {check['items']} held-out prompts: max logit diff "
            f"{check['max_logit_diff']:.3g} (tolerance {check['max_logit_diff_tolerance']}), mean "
            f"{check['mean_logit_diff']:.3g}, same greedy answer {check['same_answers']}/{check['items']} "
            f"(needs {check['min_answer_agreement']:.0%})")
