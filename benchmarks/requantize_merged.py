"""How much of a QLoRA fine-tune survives quantizing the merged model to NF4 again?

Quantizes every `*proj.weight` of the base and of the merged model with bitsandbytes' NF4
(block size 64, as the pipeline loads them) and counts the weights whose 4-bit code is the same;
also how many merged weights differ from the dequantized base at all (what the merge changed).

    .venv/bin/python benchmarks/requantize_merged.py \\
        .slmforge/store/models/base/<key>/model.safetensors .slmforge/store/merged/<key>/model.safetensors
"""

from __future__ import annotations

import argparse

import bitsandbytes.functional as F
import torch
from safetensors.torch import load_file


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    q = packed.view(torch.uint8).flatten()
    return torch.stack([q >> 4, q & 15], 1).flatten()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="the base model's model.safetensors (bf16)")
    ap.add_argument("merged", help="the merged model's model.safetensors")
    args = ap.parse_args()
    base, merged = load_file(args.base), load_file(args.merged)
    same = changed = total = 0
    for name, w in base.items():
        if not name.endswith("proj.weight"):
            continue
        qb, sb = F.quantize_4bit(w.to(torch.bfloat16), blocksize=64, quant_type="nf4")
        qm, _ = F.quantize_4bit(merged[name].to(torch.bfloat16), blocksize=64, quant_type="nf4")
        same += (nibbles(qb) == nibbles(qm)).sum().item()
        changed += (merged[name].to(torch.bfloat16) != F.dequantize_4bit(qb, sb, quant_type="nf4").to(torch.bfloat16)).sum().item()
        total += w.numel()
    print(f"{total} projection weights")
    print(f"merged weights that differ from the dequantized 4-bit base: {changed / total:.1%}")
    print(f"NF4 codes unchanged when the merged model is quantized again: {same / total:.1%}")


if __name__ == "__main__":
    main()
