"""Key accuracy and answer loss of a trained adapter (on its 4-bit base) with the adapter's scale
multiplied by m: a WiSE-FT-style interpolation towards the base, to see whether a smaller update
keeps the taught facts while making the model less sure of wrong ones. The figures behind the
README's "Answer loss against key accuracy".

    .venv/bin/python benchmarks/adapter_scale.py --store .slmforge/store \\
        --dataset datasets/<key> --quantized models/quantized/<key> --adapter adapters/<key> 1.0 0.8 0.6

The keys are the ones `make run` prints under "Where everything went" (the quantized base is
`models/quantized/...` in the store). 64 test items, greedy, 48 new tokens, batch 32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stored_adapter beside this file

import stored_adapter  # noqa: E402
from slmforge.evaluation import evaluate_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scales", nargs="+", type=float, help="multipliers of the adapter's scale")
    stored_adapter.add_arguments(ap)
    args = ap.parse_args()

    from peft.helpers import rescale_adapter_scale

    model, tokenizer, split = stored_adapter.load(args)
    test = split("test")
    for m in args.scales:
        t0 = time.perf_counter()
        with rescale_adapter_scale(model, m):
            summary = evaluate_model(model, tokenizer, test, 48, 32, 0)["summary"]
        parts = {p: f"key {s['key_accuracy']:.1%} loss {s['answer_loss']:.3f}" for p, s in summary["by_part"].items()}
        print(f"x{m}: answer loss {summary['overall']['answer_loss']:.3f}, EOS {summary['overall']['stopped_with_eos']:.1%}, "
              f"{parts} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
