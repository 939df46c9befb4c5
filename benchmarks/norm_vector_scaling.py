"""How strongly should `calibrate.method=vector` pull its per-dimension scale towards 1/T, and what
does it give against one temperature?

The calibrate stage scales the final norm's weight by 1/T (every logit divided by T). The norm's
weight is a vector, so a per-dimension scale `s` (hidden-size numbers) folds into it just as well:
logits = lm_head(s * norm(h)). This fits `s` as the stage does (`slmforge.calibration.fit_scale`)
on the validation split's answer tokens, from 1/T, with an L2 pull towards 1/T of strength `--l2`;
`--cv` folds of the validation items say which strength to choose without the test split. It
reports on the test split: answer loss (mean per item, as evaluation reports it) per part, and how
many answer tokens' teacher-forced argmax changed against the scalar T (a scalar changes none; a
vector can move greedy answers, and so key accuracy: `calibration_greedy.py` measures those).

    .venv/bin/python benchmarks/norm_vector_scaling.py --store .slmforge/store \\
        --dataset datasets/<key> --quantized models/quantized/<key> --adapter adapters/<key> --l2 1 3 10 30 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stored_adapter beside this file

import stored_adapter  # noqa: E402
from slmforge import calibration as C  # noqa: E402
from slmforge.evaluation import per_record_mean  # noqa: E402


def per_item_loss(logits: torch.Tensor, tokens: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    return per_record_mean(torch.nn.functional.cross_entropy(logits, tokens, reduction="none"), owner, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stored_adapter.add_arguments(ap)
    ap.add_argument("--l2", nargs="+", type=float, default=[1.0, 3.0, 10.0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cv", type=int, default=5, help="folds for choosing l2 on the validation split (0: none)")
    args = ap.parse_args()

    model, tokenizer, split = stored_adapter.load(args)
    pad = tokenizer.pad_token_id
    validation, test = split("validation"), split("test")
    fit = C.fit_temperature(model, validation, 16, pad)
    t = fit["temperature"]
    print(C.describe(fit), flush=True)
    head = model.get_output_embeddings().weight.detach().float()
    zv, yv, ov = C.answer_states(model, validation, 16, pad)
    zt, yt, ot = C.answer_states(model, test, 16, pad)
    parts = [r.get("part") or "all" for r in test]
    print(f"{len(yv)} validation and {len(yt)} test answer tokens; hidden size {head.shape[1]}", flush=True)

    def report(name: str, s: torch.Tensor, ref_argmax: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            logits_t = (zt * s) @ head.T
            items = per_item_loss(logits_t, yt, ot, len(test))
            val = per_item_loss((zv * s) @ head.T, yv, ov, len(validation)).mean()
            by = {p: items[[i for i, q in enumerate(parts) if q == p]].mean().item() for p in sorted(set(parts))}
            argmax = logits_t.argmax(-1)
            moved = "" if ref_argmax is None else f"; argmax moved on {(argmax != ref_argmax).sum().item()} of {len(yt)} tokens"
            right = (argmax == yt).float().mean().item()
            print(f"{name}: validation {val.item():.3f}, test {items.mean().item():.3f} "
                  f"({', '.join(f'{p} {v:.3f}' for p, v in by.items())}); teacher-forced token accuracy "
                  f"{right:.3f}{moved}", flush=True)
            return argmax

    ones = torch.ones(head.shape[1])

    def fit_vector(l2: float, items: torch.Tensor) -> torch.Tensor:
        """s fitted on the answer tokens of these validation items (as the calibrate stage fits it)."""
        keep = torch.isin(ov, items)
        owner = torch.searchsorted(items, ov[keep])  # items sorted: their positions 0..len-1
        return C.fit_scale(zv[keep], yv[keep], owner, len(items), head, t, l2, args.steps)

    report("T=1", ones)
    scalar = report(f"scalar T={t:.3f}", ones / t)
    everything = torch.arange(len(validation))
    for l2 in args.l2:
        s = fit_vector(l2, everything)
        report(f"vector, l2 {l2:g} (s from {s.min().item():.3f} to {s.max().item():.3f})", s, scalar)
    if args.cv > 1:  # choosing l2 without the test split: k-fold over the validation items
        cv = {}
        for l2 in args.l2:
            held = []
            for k in range(args.cv):
                out, into = everything[everything % args.cv == k], everything[everything % args.cv != k]
                s = fit_vector(l2, into)
                keep = torch.isin(ov, out)
                held.append(per_item_loss((zv[keep] * s) @ head.T, yv[keep], torch.searchsorted(out, ov[keep]),
                                          len(out)).detach())
            cv[l2] = torch.cat(held).mean().item()
        print(f"{args.cv}-fold validation loss by l2: " + ", ".join(f"{k:g} {v:.3f}" for k, v in cv.items())
              + f"; scalar T: {per_item_loss((zv / t) @ head.T, yv, ov, len(validation)).mean().item():.3f} "
              f"(T fitted on all of it); chosen l2 {min(cv, key=cv.get):g}", flush=True)


if __name__ == "__main__":
    main()
