"""How fast does QLoRA teach the facts? Trains the bundled model with the given settings and prints
key accuracy (and answer loss) on the test's taught items after every epoch (greedy, adapter on the 4-bit base).
Used to choose the default CPU run; its figures are in the README's "Choosing the defaults".

    .venv/bin/python benchmarks/key_accuracy_sweep.py --work /tmp/sweep \\
        '{"cfg": {"data": {"source": "bundled:korean-qa-quick"},
                  "train": {"epochs": 4, "learning_rate": 2e-3, "batch_size": 4}},
          "n_eval": 40}'

Settings (JSON): `cfg` (any finetune settings), `n_eval` taught items (40), `n_eval_unseen` unseen
items (0), `n_train_eval` train items (0), `mnt` new tokens per answer (40), `eval_epochs` (list; default every epoch),
`select: "two"` (train only on facts with two wordings in the train split), `holdout` N (validation:
one train wording of N taught facts the evaluated test items do not ask is held out of training and
asked after each epoch, so a recipe can be chosen without the test). The store (dataset,
base and quantized model, reused between runs) and the trainer's output go under --work.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slmforge import modeling as M  # noqa: E402
from slmforge import training as T  # noqa: E402
from slmforge.config import FinetuneConfig  # noqa: E402
from slmforge.records import read_jsonl  # noqa: E402
from slmforge.evaluation import evaluate_model  # noqa: E402
from tasks.dataset import prepare  # noqa: E402
from tasks.model import materialise_base, quantize_base  # noqa: E402
from slmforge.storage import ArtifactStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="?", default="{}", help="JSON settings (see the module docstring)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "slmforge-sweep",
                    help="store and trainer output (default: %(default)s)")
    args = ap.parse_args()
    sets = json.loads(args.settings)

    cfg = FinetuneConfig.model_validate({**sets.get("cfg", {}), "storage": {"url": str(args.work / "store")}})
    store = ArtifactStore.from_config(cfg.storage)
    dataset = prepare(cfg.data, cfg.model, store)
    quantized = quantize_base(cfg.model, materialise_base(cfg.model, store), store)
    data_dir = store.get_dir(dataset["key"])
    train, test = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "test.jsonl")
    if sets.get("select") == "two":
        wordings = collections.Counter(r["id"].rsplit("-", 1)[0] for r in train)
        train = [r for r in train if wordings[r["id"].rsplit("-", 1)[0]] >= 2]
    taught = [r for r in test if r["part"] == "taught"][: sets.get("n_eval", 40)]
    # Validation that can choose a recipe for taught facts without looking at the test: one train
    # wording of `holdout` facts that the evaluated test items do not ask (they keep one wording).
    held = []
    if sets.get("holdout"):
        fact_of = lambda r: r["id"].rsplit("-", 1)[0]  # noqa: E731
        asked = {fact_of(r) for r in taught}
        spare = sorted({fact_of(r) for r in train} - asked)
        picked = set(spare[:: max(1, len(spare) // sets["holdout"])][: sets["holdout"]])
        for fact in sorted(picked):
            held.append(sorted((r for r in train if fact_of(r) == fact), key=lambda r: r["id"])[-1])
        train = [r for r in train if r not in held]
    print("train rows", len(train), "test", len(test), "validation (held-out wordings)", len(held), flush=True)
    eval_sets = {
        "val": held,
        "taught": taught,
        "unseen": [r for r in test if r["part"] != "taught"][: sets.get("n_eval_unseen", 0)],
        "trainq": train[: sets.get("n_train_eval", 0)],
    }

    model_dir = store.get_dir(quantized["key"])
    model = M.load_model(model_dir, "saved")
    tokenizer = M.load_tokenizer(model_dir)
    steps_per_epoch = -(-len(train) // cfg.train.batch_size)
    eval_epochs = set(sets.get("eval_epochs") or range(1, int(cfg.train.epochs) + 1))
    t0 = time.time()

    def evaluate(step: int) -> None:
        was_training = model.training
        model.eval()
        scores = {}
        for name, records in eval_sets.items():
            if not records:
                continue
            result = evaluate_model(model, tokenizer, records, sets.get("mnt", 40), 32)
            overall = result["summary"]["overall"]
            scores[name] = round(overall["key_accuracy"], 3)
            scores[f"{name} loss"] = round(overall["answer_loss"], 3)
            if name == "val":
                for item in result["items"][:6]:
                    print("   ", item["question"], "->", item["answer"][:80], "| key", item["key"], flush=True)
        print(f"EVAL step {step} t={time.time() - t0:.0f}s", scores, flush=True)
        if was_training:
            model.train()

    def progress(step: int, total: int, logs: dict | None) -> None:
        if logs and "loss" in logs:
            print(f"step {step}/{total} loss {logs['loss']:.3f} t={time.time() - t0:.0f}s", flush=True)
        if not logs and step % steps_per_epoch == 0 and step // steps_per_epoch in eval_epochs:
            evaluate(step)

    out = args.work / "out"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resume of the last one
    _, result = T.train(model, tokenizer, train, None, cfg.lora, cfg.train, out, progress=progress,
                        save_steps=10**6)
    print("seconds", result.seconds, "steps", result.steps)


if __name__ == "__main__":
    main()
