"""Seconds per training step of the pipeline's training core on the bundled model, one variant after
another in this process: with trl's LM head as shipped (every position scored on CPU) or scoring only
the labelled positions, and with a given LoRA dropout. The figures behind the README's "Choosing the
defaults" table of step costs.

    .venv/bin/python benchmarks/step_time.py --work /tmp/step-time \\
        '[["trl as shipped", false, 0.05], ["labelled positions only", true, 0.05],
          ["labelled only, dropout 0", true, 0.0], ["dropout 0", false, 0.0]]'

Each variant: [name, labelled positions only, lora dropout] and, optionally, the 4-bit layers'
compute dtype (`model.compute_dtype`: auto, float32, bfloat16) and whether the micro-batch is joined
into one padding-free row (`train.padding_free`; false when left out, as the first figures were
measured), e.g. `[["padded", true, 0.05, "auto", false], ["padding-free", true, 0.05, "auto", true]]`.
Steps: `--steps` (10); the first two are left out of the mean (allocation, warm-up). The store
(dataset, quantized base) goes under --work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slmforge import modeling as M  # noqa: E402
from slmforge import runtime as R  # noqa: E402
from slmforge import training as T  # noqa: E402
from slmforge.config import FinetuneConfig  # noqa: E402
from slmforge.records import read_jsonl  # noqa: E402
from tasks.dataset import prepare  # noqa: E402
from tasks.model import materialise_base, quantize_base  # noqa: E402
from slmforge.storage import ArtifactStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", help="JSON list of [name, labelled_only, dropout(, compute_dtype(, padding_free))]")
    ap.add_argument("--work", type=Path, default=Path("/tmp/slmforge-step-time"))
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    cfg = FinetuneConfig.model_validate({"storage": {"url": str(args.work / "store")}})
    store = ArtifactStore.from_config(cfg.storage)
    dataset = prepare(cfg.data, cfg.model, store)
    quantized = quantize_base(cfg.model, materialise_base(cfg.model, store), store)
    train = read_jsonl(store.get_dir(dataset["key"]) / "train.jsonl")
    model_dir = store.get_dir(quantized["key"])
    print(f"{platform.processor() or platform.machine()}; {R.cpu_features()}; "
          f"rows {len(train)}, mean {sum(len(r['input_ids']) for r in train) / len(train):.1f} tokens", flush=True)
    labelled_only = T.score_labelled_positions_only
    for name, compact, dropout, *rest in json.loads(args.variants):
        compute, padding_free = (rest + ["auto", False][len(rest):])[:2]
        rt = R.decide(compute)
        model = M.load_model(model_dir, "saved", rt)
        tokenizer = M.load_tokenizer(model_dir)
        T.score_labelled_positions_only = labelled_only if compact else contextlib.nullcontext
        stamps: list[float] = []

        def progress(step: int, total: int, logs: dict | None) -> None:
            if not logs:
                stamps.append(time.perf_counter())

        out = args.work / "out"
        shutil.rmtree(out, ignore_errors=True)
        _, result = T.train(model, tokenizer, train, None, cfg.lora.model_copy(update={"dropout": dropout}),
                            cfg.train.model_copy(update={"max_steps": args.steps, "logging_steps": 1,
                                                         "padding_free": padding_free}), out,
                            progress=progress, save_steps=10**6, rt=rt)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])][1:]
        print(f"{name}: {sum(gaps) / len(gaps):.2f} s/step (steps 3-{args.steps}), train loss {result.train_loss}",
              flush=True)
    T.score_labelled_positions_only = labelled_only


if __name__ == "__main__":
    main()
