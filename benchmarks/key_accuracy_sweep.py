"""How fast does QLoRA teach the facts? Trains the bundled model with given settings and prints key
accuracy on the test's taught items after every epoch (greedy, adapter on the 4-bit base).
Used to choose the default CPU run; figures in the README's "Choosing the defaults".

    .venv/bin/python benchmarks/key_accuracy_sweep.py \
        '{"cfg":{"data":{"source":"bundled:korean-qa-quick"},"train":{"epochs":4,"learning_rate":2e-3,"batch_size":4}},"n_eval":40}'

`select: "two"` keeps only the train rows of facts that have two wordings in the full set.
Store and checkpoints go to /tmp/exp.
"""
import json, sys, time, os, collections
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch
from slmforge.config import FinetuneConfig
from slmforge import modeling as M, training as T
from slmforge.evaluation import evaluate_model
from tasks.dataset import prepare
from tasks.model import materialise_base, quantize_base
from tasks.storage import ArtifactStore
from slmforge.data import read_jsonl

sets = json.loads(sys.argv[1])
cfg = FinetuneConfig.model_validate({"storage": {"url": "/tmp/exp/store"}, **sets.get("cfg", {})})
store = ArtifactStore.from_config(cfg.storage)
ds = prepare(cfg.data, cfg.model, store)
base = materialise_base(cfg.model, store); q = quantize_base(cfg.model, base, store)
d = store.get_dir(ds["key"])
train = read_jsonl(d / "train.jsonl"); test = read_jsonl(d / "test.jsonl"); val = read_jsonl(d/"validation.jsonl")
sel = sets.get("select")
if sel == "two":
    c = collections.Counter(r["id"].rsplit("-", 1)[0] for r in train)
    train = [r for r in train if c[r["id"].rsplit("-", 1)[0]] >= 2]
print("train rows", len(train), "test", len(test), flush=True)
taught = [r for r in test if r["part"] == "taught"][: sets.get("n_eval", 40)]
unseen = [r for r in test if r["part"] != "taught"][: sets.get("n_eval_unseen", 0)]
trq = train[: sets.get("n_train_eval", 0)]
model = M.load_model(store.get_dir(q["key"]), "saved", compute_dtype=M.resolve_compute_dtype("auto"))
tok = M.load_tokenizer(store.get_dir(q["key"]))
spe = -(-len(train) // cfg.train.batch_size)
t0 = time.time()
def ev(step):
    was = model.training; model.eval()
    out = {}
    for name, recs in (("taught", taught), ("unseen", unseen), ("trainq", trq)):
        if not recs: continue
        r = evaluate_model(model, tok, recs, sets.get("mnt", 40), 16)
        out[name] = round(r["summary"]["overall"]["key_accuracy"], 3)
        if name == "taught":
            for it in r["items"][:6]: print("   ", it["question"], "->", it["answer"][:80], "| key", it["key"], flush=True)
    print(f"EVAL step {step} t={time.time()-t0:.0f}s", out, flush=True)
    if was: model.train()
def progress(step, total, logs):
    if logs and "loss" in logs: print(f"step {step}/{total} loss {logs['loss']:.3f} t={time.time()-t0:.0f}s", flush=True)
    if step % (spe * sets.get("eval_every_epochs", 1)) == 0 and not logs: ev(step)
import shutil; shutil.rmtree("/tmp/exp/out", ignore_errors=True)
peft, res = T.train(model, tok, train, None, cfg.lora, cfg.train, Path("/tmp/exp/out"), progress=progress, save_steps=10**6)
print("seconds", res.seconds, "steps", res.steps)
