"""The bundled SmolLM2-135M through the real flow: slow (minutes on 2 cores), so marked."""

import pytest

from slmforge.config import load_config
from slmforge.data import read_jsonl
from tasks.storage import ArtifactStore

pytestmark = pytest.mark.slow


def test_bundled_smollm2_learns_korean_answers(prefect_api, tmp_path):
    from flows.finetune import finetune

    cfg = load_config(overrides=[
        f"storage.url=file://{tmp_path}/store",
        # the first 96 training rows: a few minutes of training must already show a change
        "data.train_limit=96", "data.test_limit=16",
        "train.max_steps=24", "train.batch_size=8", "train.learning_rate=1e-3", "train.warmup_steps=2",
        "eval.max_new_tokens=40",
    ])
    out = finetune(cfg)
    store = ArtifactStore(cfg.storage.url)
    report_key = out["report"].split("store/", 1)[1]
    import json

    report = json.loads((store.get_dir(report_key) / "report.json").read_text())
    base, tuned = report["summary"]["base"]["overall"], report["summary"]["published"]["overall"]
    # the tuned model answers in Korean, stops by itself, and its answer loss fell
    answers = [it["answer"] for it in report["items"]["published"]]
    hangul = sum(any("\uac00" <= ch <= "\ud7a3" for ch in a) for a in answers)
    assert hangul >= 0.8 * len(answers), answers
    assert tuned["stopped_with_eos"] > base["stopped_with_eos"]
    assert tuned["answer_loss"] < base["answer_loss"]
    assert tuned["key_accuracy"] >= base["key_accuracy"]
