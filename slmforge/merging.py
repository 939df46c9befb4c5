"""Merging the adapter into the 16-bit base (never into the 4-bit one: that rounds the merged
weights to NF4 and loses quality), with a check that the merge changed nothing it should not."""

from __future__ import annotations

from pathlib import Path

import torch

from slmforge.modeling import load_model

# fp32 merge on the same inputs: differences are float rounding, far below this.
MERGE_TOLERANCE = 1e-2


class MergeError(RuntimeError):
    """The merged model does not reproduce the adapter model; it must not be published."""


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, check_records: list[dict],
          save_dtype: torch.dtype = torch.bfloat16, tolerance: float = MERGE_TOLERANCE,
          corrupt: float = 0.0) -> dict:
    """Merge in float32, compare logits against the unmerged adapter model, save in `save_dtype`.

    `corrupt` adds noise to one merged weight; tests use it to prove the check catches a bad merge.
    """
    from peft import PeftModel

    base = load_model(base_dir, "fp32")
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    reference = [model(input_ids=torch.tensor([r["input_ids"]])).logits.float() for r in check_records]
    merged = model.merge_and_unload()
    if corrupt:
        w = next(p for n, p in merged.named_parameters() if n.endswith("q_proj.weight"))
        w.data += corrupt * torch.randn_like(w)
    worst = 0.0
    with torch.no_grad():
        for r, ref in zip(check_records, reference):
            got = merged(input_ids=torch.tensor([r["input_ids"]])).logits.float()
            worst = max(worst, (got - ref).abs().max().item())
    if worst > tolerance:
        raise MergeError(f"merged logits differ from the adapter model by {worst:.4g} > tolerance {tolerance}")
    merged.to(save_dtype)
    merged.config.dtype = save_dtype
    merged.save_pretrained(out_dir, safe_serialization=True)
    return {"max_logit_diff": worst, "tolerance": tolerance, "checked_inputs": len(check_records),
            "dtype": str(save_dtype).replace("torch.", "")}

