"""Answer loss of a trained adapter (on its 4-bit base) with its logits divided by T, on the
validation split (what the calibrate stage fits T on) and on each test part: the figures behind the
README's "Calibration". Greedy answers do not depend on T, so only losses are computed.

    .venv/bin/python benchmarks/temperature_sweep.py --store .slmforge/store \\
        --dataset datasets/<key> --quantized models/quantized/<key> --adapter adapters/<key> 1.0 1.4 1.6 1.8 2.0

The keys are the ones `make run` prints under "Where everything went" (the trained adapter is the
`adapters/...` key in the train stage's log; `calibrated/...` is the one with T folded in).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stored_adapter beside this file

import stored_adapter  # noqa: E402
from slmforge import calibration as C  # noqa: E402
from slmforge.evaluation import answer_losses  # noqa: E402


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("temperatures", nargs="+", type=float)
    stored_adapter.add_arguments(ap)
    args = ap.parse_args()

    model, tokenizer, split = stored_adapter.load(args)
    validation, test, pad = split("validation"), split("test"), tokenizer.pad_token_id
    print(C.describe(C.fit_temperature(model, validation, 16, pad)), flush=True)
    folded = 1.0
    for t in args.temperatures:
        C.fold_temperature(model, t / folded, test[0]["input_ids"])  # relative to what is folded in already
        folded = t
        val, tst = answer_losses(model, validation, 16, pad), answer_losses(model, test, 16, pad)
        parts = {p: mean([x for x, r in zip(tst, test) if r.get("part") == p]) for p in sorted({r.get("part") for r in test})}
        print(f"T={t:g}: validation {mean(val):.3f}, test {mean(tst):.3f} "
              f"({', '.join(f'{p} {v:.3f}' for p, v in parts.items())})", flush=True)


if __name__ == "__main__":
    main()
