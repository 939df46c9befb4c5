"""The store's retention (slmforge/retention.py): five nights with changing data on one store, then
gc keeping the last two runs and the newest published entry; a run going on during gc; runs whose
cached results point at removed outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flowruns import stage_states
from slmforge import publish_record
from slmforge.config import PROJECT_DIR, load_config
from slmforge.retention import PREFIXES, collect, references, runs
from slmforge.storage import MANIFEST, ArtifactStore


def _night_cfg(tiny_model_dir, store_dir, data, **extra):
    sets = [f"model.source={tiny_model_dir}", f"storage.url=file://{store_dir}", f"data.source={data}",
            "data.test_limit=4", "data.max_length=128", "train.max_steps=1", "train.batch_size=4",
            "calibrate.enabled=false", "eval.max_new_tokens=2", "eval.batch_size=4", "eval.samples=1",
            "merge.min_answer_agreement=0", "eval.min_improvement=-1",  # every night publishes
            "retention.after_run=false"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(overrides=sets)


def _write_night(path, night):
    rows = [{"question": f"What is {a} plus {a + night}?", "answer": f"{2 * a + night}.", "key": str(2 * a + night),
             "split": "test" if a % 6 == 5 else "train"} for a in range(2, 26)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _key(uri: str) -> str:
    return uri.split("/store/", 1)[1]


def _outputs(store_dir) -> set[str]:
    found = set()
    for prefix in PREFIXES:
        d = store_dir / prefix
        if d.is_dir():
            found |= {f"{prefix}/{p.name}" for p in d.iterdir() if ".tmp-" not in p.name} - {"eval/base", "models/base",
                                                                                             "models/quantized"}
    return found


def test_five_nights_then_gc_keeps_what_the_policy_keeps(prefect_api, tiny_model_dir, tmp_path, monkeypatch):
    from flows.finetune import finetune

    store_dir, data = tmp_path / "store", tmp_path / "qa.jsonl"
    store = ArtifactStore(f"file://{store_dir}")
    nights = []
    for night in range(1, 6):
        _write_night(data, night)
        out = finetune(_night_cfg(tiny_model_dir, store_dir, data))
        assert out["publish"]["published"], out["publish"]
        nights.append(out)
    assert len({n["dataset"] for n in nights}) == 5 and len(publish_record.entries(store)) == 5
    recorded = runs(store)
    assert [r["status"] for r in recorded] == ["completed"] * 5
    before = _outputs(store_dir)

    # a dry run removes nothing and says what it would
    dry = collect(store, keep_last_runs=2, keep_published=1, min_age_hours=0, dry_run=True, log=lambda m: None)
    assert dry.removed and _outputs(store_dir) == before
    # the age guard: everything here is minutes old
    young = collect(store, keep_last_runs=2, keep_published=1, min_age_hours=1, log=lambda m: None)
    assert not young.removed and young.too_young and _outputs(store_dir) == before

    # night 6 runs while gc collects: gc runs inside its merge stage, after training committed the adapter
    import tasks.merge as TM

    real_merge, during = TM.run_merge, []

    def merge_after_gc(*a, **k):
        during.append(collect(store, keep_last_runs=2, keep_published=1, min_age_hours=0, log=lambda m: None))
        return real_merge(*a, **k)

    monkeypatch.setattr(TM, "run_merge", merge_after_gc)
    _write_night(data, 6)
    state = finetune(_night_cfg(tiny_model_dir, store_dir, data), return_state=True)
    monkeypatch.setattr(TM, "run_merge", real_merge)
    assert state.is_completed() and during, state
    sixth = state.result()
    for name in ("dataset", "base", "quantized", "adapter", "merged", "report"):
        assert store.exists(_key(sixth[name])), f"night 6's {name} was collected while it ran"

    # what gc kept: the last two finished runs (4, 5), the running one (6), the newest published entry (5)
    gc = during[0]
    kept_runs = [r for r in recorded[:2]]
    expected = {k for r in kept_runs for k in r["outputs"]}
    for n in nights[:3]:  # nights 1-3: neither among the last two runs nor published last
        for name in ("dataset", "adapter", "merged", "report"):
            assert not store.exists(_key(n[name])) and not (store_dir / _key(n[name])).exists(), (name, n[name])
    assert {o.key for o in gc.removed} >= {_key(n["adapter"]) for n in nights[:3]}
    left = _outputs(store_dir)
    assert left >= {k for k in expected if k.split("/")[0] in {"datasets", "adapters", "merged", "eval"}
                    and not k.startswith("eval/base")}
    published = publish_record.entries(store)
    assert len(published) == 2, "the newest entry kept at gc time, and night 6's, published after it"
    record = json.loads((store_dir / publish_record.INDEX).read_text())
    assert set(record["published"]) == set(published)
    # every kept output verifies against its manifest (sizes and sha256), published entries included
    for key in left:
        if (store_dir / key / MANIFEST).is_file():
            store.get_dir(key, verify="full")
    for h in published:
        store.get_dir(f"{publish_record.PREFIX}/{h}", verify="full")
    assert all(store.exists(k) for e in published.values() for k in references(e) if not k.startswith("eval/base"))

    # a run whose cached results point at collected outputs computes them again: night 1's data
    _write_night(data, 1)
    again = finetune(_night_cfg(tiny_model_dir, store_dir, data), return_state=True)
    assert again.is_completed(), again
    states = stage_states(again)
    assert states["prepare_dataset"] != "Cached" and states["train_qlora"] == "Completed", states
    assert store.exists(_key(again.result()["adapter"]))

    # and a cached result whose output was removed by hand (no gc to forget the cache record) too
    adapter = _key(sixth["adapter"])
    store.remove(adapter)
    _write_night(data, 6)
    redo = finetune(_night_cfg(tiny_model_dir, store_dir, data), return_state=True)
    assert redo.is_completed(), redo
    states = stage_states(redo)
    assert states["prepare_dataset"] == "Cached" and states["train_qlora"] != "Cached", states
    assert store.exists(adapter), "the adapter was computed again under its key"


def test_gc_command_dry_run_and_bad_settings(tmp_path):
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "flows.cli", "gc", "--dry-run", "--set", f"storage.url={tmp_path}/s"],
                        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0 and "gc: would remove 0 outputs" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "gc", "--set", "retention.keep_last_runs=0"],
                         cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "retention.keep_last_runs" in bad.stderr, bad.stderr


@pytest.mark.parametrize("value", ["0", "none"])
def test_keep_published_is_checked(value):
    from slmforge.config import ConfigError

    with pytest.raises(ConfigError, match="retention.keep_published"):
        load_config(overrides=[f"retention.keep_published={value}"])
