"""Seconds a training step spends drawing LoRA dropout masks on this CPU, timed alone: one
`torch.nn.functional.dropout` per LoRA layer input of the bundled SmolLM2-135M (q, k, v, o, gate,
up read the 576-wide hidden state, down the 1536-wide MLP state; 30 layers), on micro-batches of
the prepared train split padded as the trainer pads them. Behind the README's "AVX2, on an AVX2 CPU".

    .venv/bin/python benchmarks/dropout_cost.py --train .slmforge/store/datasets/<key>/train.jsonl --threads 1 2

With `--threads 1 2` it times the masks with each number of torch threads: where the figures are the
same, this torch draws its CPU Bernoulli masks on one thread.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True, help="a prepared split (records with input_ids)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="*", default=[], help="torch thread counts to time (default: as set)")
    args = ap.parse_args()
    lengths = [len(json.loads(line)["input_ids"]) for line in args.train.open()]
    random.Random(42).shuffle(lengths)
    padded = statistics.mean(max(lengths[i:i + args.batch]) for i in range(0, len(lengths), args.batch))
    tokens = round(padded)
    inputs = [torch.randn(args.batch, tokens, 576)] * 6 + [torch.randn(args.batch, tokens, 1536)]

    def masks():
        for _layer in range(30):
            for x in inputs:
                torch.nn.functional.dropout(x, args.p, True)

    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        masks()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            masks()
            times.append(time.perf_counter() - t0)
        print(f"{args.batch} rows padded to {tokens} tokens (mean over one shuffled epoch), {threads} "
              f"threads: dropout masks {min(times):.2f}-{max(times):.2f} s a step ({args.repeats} repeats)")


if __name__ == "__main__":
    main()
