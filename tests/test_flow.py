"""The finetune flow end to end under a real Prefect API, on a tiny random Llama."""

import json

import pytest

from slmforge.config import load_config
from slmforge.storage import ArtifactStore


def _tiny_cfg(tiny_model_dir, store_dir, **extra):
    sets = [
        f"model.source={tiny_model_dir}",
        f"storage.url=file://{store_dir}",
        "data.train_limit=16", "data.test_limit=6", "data.max_length=256",
        "train.max_steps=2", "train.batch_size=4", "train.logging_steps=1",
        "eval.max_new_tokens=4", "eval.batch_size=6", "eval.samples=3",
        # a random model's near-tied logits flip greedy answers under bf16 rounding: check logits only
        "merge.min_answer_agreement=0",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(overrides=sets)


def test_flow_runs_end_to_end_then_hits_the_cache(prefect_api, tiny_model_dir, tmp_path, monkeypatch):
    """A re-run is all cache hits; once the code changes (an edited core function) it is none, and
    every stage writes under a new store key instead of serving the old code's artifacts."""
    from prefect.client.orchestration import get_client

    from flows.finetune import finetune
    from slmforge import fingerprint

    cfg = _tiny_cfg(tiny_model_dir, tmp_path / "store", **{"eval.adapter_on_4bit": "true"})
    state = finetune(cfg, return_state=True)
    assert state.is_completed(), state
    out = state.result()
    store = ArtifactStore(cfg.storage.url)
    for name in ("dataset", "base", "quantized", "adapter", "merged", "report"):
        key = out[name].split(str(tmp_path / "store") + "/", 1)[1]
        assert store.exists(key), f"{name} has no manifest"
    report = json.loads((store.get_dir(out["report"].split("store/", 1)[1]) / "report.json").read_text())
    assert set(report["summary"]) == {"base", "trained", "published"}
    assert {"taught", "unseen"} <= set(report["summary"]["base"]["by_part"])
    # the calibrated adapter (fitted on the validation split) is what is merged, evaluated and published
    assert out["adapter"].split("store/", 1)[1].startswith("calibrated/"), out["adapter"]
    assert report["calibration"]["records"] > 0 and report["calibration"]["module"] == "model.norm"
    check = report["merge_check"]
    assert check["compared_with"].startswith("trained") and check["within_tolerance"], check
    assert check["max_logit_diff"] <= check["max_logit_diff_tolerance"]
    # a published model outside the tolerances fails the merge stage and leaves nothing in the store
    from slmforge.config import MergeConfig
    from slmforge.merging import MergeError
    from tasks.merge import run_merge

    keys = {name: out[name].split(str(tmp_path / "store") + "/", 1)[1] for name in out if name != "publish"
            and isinstance(out[name], str) and out[name].startswith("file://")}
    strict = MergeConfig(max_logit_diff=1e-9, min_answer_agreement=0)
    with pytest.raises(MergeError, match="does not reproduce the trained model"):
        run_merge({"key": keys["adapter"]}, {"quantized": {"key": keys["quantized"]}, "base": {"key": keys["base"]}},
                  {"key": keys["dataset"]}, strict, cfg.eval, store, log=lambda m: None, model_cfg=cfg.model)
    merged_dir = tmp_path / "store" / "merged"
    assert sorted(p.name for p in merged_dir.iterdir()) == [keys["merged"].split("/", 1)[1]], "left behind"
    # calibrate.method=vector on the same trained adapter: the stage writes an adapter whose answer
    # loss on the validation answers, reloaded on the 4-bit base, is the one the fit reports
    from slmforge.config import CalibrateConfig
    from slmforge.evaluation import answer_losses
    from slmforge.merging import load_trained
    from slmforge.modeling import load_tokenizer
    from slmforge.records import read_jsonl
    from slmforge.runtime import for_config
    from tasks.calibrate import run_calibration

    trained = store.manifest(keys["adapter"])["meta"]["trained_adapter"]
    vector = run_calibration({"key": trained}, {"quantized": {"key": keys["quantized"]}}, {"key": keys["dataset"]},
                             CalibrateConfig(method="vector", steps=5), cfg.eval, store, log=lambda m: None,
                             model_cfg=cfg.model)
    fit = vector["calibration"]
    assert vector["key"] not in (keys["adapter"], trained) and fit["method"] == "vector", fit
    assert fit["form"] == "weight * s" and fit["loss_vector"] <= fit["loss_near_t"] + 1e-4, fit
    validation = read_jsonl(store.get_dir(keys["dataset"]) / "validation.jsonl")[:cfg.calibrate.items]
    model = load_trained(store.get_dir(keys["quantized"]), store.get_dir(vector["key"]), for_config(cfg.model))
    losses = answer_losses(model, validation, cfg.eval.batch_size, load_tokenizer(store.get_dir(trained)).pad_token_id)
    assert sum(losses) / len(losses) == pytest.approx(fit["loss_vector"], abs=1e-3)
    # what it was merged from, for compare's "4bit + adapter" row
    assert store.manifest(keys["merged"])["meta"]["trained_from"] == {
        "adapter": keys["adapter"], "quantized_base": keys["quantized"]}

    # the gate's decision is the one the published model's figures call for
    from slmforge.publishing import gate

    summary = report["summary"]
    expected = gate("key_accuracy", summary["published"]["overall"]["key_accuracy"],
                    summary["base"]["overall"]["key_accuracy"], cfg.eval.min_improvement, None)
    assert (out["publish"]["published"], out["publish"]["reason"]) == expected

    second = finetune(cfg, return_state=True)
    assert second.is_completed()
    import asyncio

    async def task_states(flow_run_id):
        async with get_client() as client:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}

    states = asyncio.run(task_states(second.state_details.flow_run_id))
    stages = ["prepare_dataset", "load_base_model", "train_qlora", "calibrate", "merge_adapter", "evaluate", "publish"]
    assert all(states[s] == "Cached" for s in stages), states
    again = second.result()
    assert {k: v for k, v in again.items() if k != "nightly"} == {k: v for k, v in out.items() if k != "nightly"}
    assert out["nightly"].startswith("trained on") and again["nightly"].startswith("no new data since"), again

    # what an edit to, say, slmforge/training.py does: the process hashes a different source tree
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda roots=fingerprint.SOURCES: "edited core")
    third = finetune(cfg, return_state=True)
    assert third.is_completed(), third
    states = asyncio.run(task_states(third.state_details.flow_run_id))
    assert not any(states[s] == "Cached" for s in stages), states
    rerun = third.result()
    for name in ("dataset", "base", "quantized", "adapter", "merged", "report"):
        assert rerun[name] != out[name], name
        assert store.exists(rerun[name].split(str(tmp_path / "store") + "/", 1)[1]), f"{name} has no manifest"


def test_bad_data_fails_before_any_model_loads(prefect_api, tiny_model_dir, tmp_path):
    from slmforge.data import DataError
    from flows.finetune import finetune

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\nnot json\n{"question": 3, "answer": "b"}\n')
    cfg = _tiny_cfg(tiny_model_dir, tmp_path / "store", **{"data.source": str(bad)})
    with pytest.raises(DataError, match="bad.jsonl"):
        finetune(cfg)
    store_root = tmp_path / "store"
    written = {p.relative_to(store_root).parts[0] for p in store_root.rglob("*") if p.is_file()}
    assert written <= {"validation", "prefect-results", "runs"}, written
    from slmforge.retention import runs

    assert [r["status"] for r in runs(ArtifactStore(cfg.storage.url))] == ["failed"], "the run is recorded as failed"


def test_a_run_that_changes_only_training_reuses_the_base_evaluation(prefect_api, tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    """Another seed trains and evaluates the new model, but the unchanged base is not generated again."""
    import tasks.evaluate as E
    from flows.finetune import finetune

    calls = []
    real = E.evaluate_model
    monkeypatch.setattr(E, "evaluate_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = finetune(_tiny_cfg(tiny_model_dir, tmp_path / "store"))
    assert len(calls) == 2  # base, published
    second = finetune(_tiny_cfg(tiny_model_dir, tmp_path / "store", **{"train.seed": 7}))
    assert len(calls) == 3, "the base was evaluated again"
    assert second["adapter"] != first["adapter"] and second["report"] != first["report"]
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    reports = [json.loads((store.get_dir(r["report"].split("store/", 1)[1]) / "report.json").read_text())
               for r in (first, second)]
    assert reports[0]["summary"]["base"] == reports[1]["summary"]["base"]
    assert reports[0]["items"]["base"] == reports[1]["items"]["base"]
