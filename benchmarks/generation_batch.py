"""Seconds for the evaluation's batched greedy generation (64 test items, 48 new tokens) at several
batch sizes, on saved models in a store, and whether the answers are the same at every size. The
figures behind `eval.generation_batch_size`'s default.

    .venv/bin/python benchmarks/generation_batch.py --store .slmforge/store --dataset datasets/<key> \\
        --model merged/<key> --model models/base/<key> 16 64 32

The keys are the ones `make run` prints under "Where everything went" (the base is `models/base/...`
in the store). Each model is loaded as the evaluate stage loads it (full weights, the runtime's dtype).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slmforge import modeling as M  # noqa: E402
from slmforge.evaluation import generate_answers  # noqa: E402
from slmforge.records import read_jsonl  # noqa: E402
from slmforge.runtime import decide  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="+", type=int, help="generation batch sizes, in the order to time them")
    ap.add_argument("--store", type=Path, default=Path(".slmforge/store"), help="a local store's directory")
    ap.add_argument("--dataset", required=True, help="datasets/<key>: its test split is generated for")
    ap.add_argument("--model", action="append", required=True, help="a saved model's key (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    test = read_jsonl(args.store / args.dataset / "test.jsonl")
    rt = decide()
    for key in args.model:
        model_dir = args.store / key
        tokenizer = M.load_tokenizer(model_dir)
        model = M.load_model(model_dir, "weights", rt)
        answers = {}
        for size in args.sizes:
            t0 = time.perf_counter()
            answers[size] = generate_answers(model, tokenizer, test, args.max_new_tokens, size)
            print(f"{key}: batch {size}: {time.perf_counter() - t0:.1f} s, "
                  f"{sum(a['new_tokens'] for a in answers[size])} new tokens", flush=True)
        first = args.sizes[0]
        for size in args.sizes[1:]:
            same = sum(a == b for a, b in zip(answers[first], answers[size]))
            print(f"{key}: batch {size} against {first}: {same} of {len(test)} answers the same", flush=True)
        del model
        M.free_memory()


if __name__ == "__main__":
    main()
