"""The compare flow on tiny random models, and its measurement functions on their own."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest
import torch

from slmforge import benchmarking as B
from slmforge import report
from slmforge import peak_memory
from slmforge.compare_config import CompareConfig, load_compare_config
from slmforge.config import ConfigError
from slmforge.storage import ArtifactStore

# -- pure functions ----------------------------------------------------------------------------


def test_summarise_median_and_spread():
    s = B.summarise([3.0, 1.0, 2.0, None, float("nan")])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "spread": 1.0, "n": 3}
    assert B.summarise([4.0, 1.0, 2.0, 3.0])["median"] == 2.5
    assert B.summarise([])["median"] is None and B.summarise([None])["n"] == 0


def test_generation_timing_counts_decode_tokens_after_the_first():
    # start at 10.0; first token after 0.5 s (prefill), then 4 more tokens 0.1 s apart
    t = B.generation_timing(10.0, [10.5, 10.6, 10.7, 10.8, 10.9], batch_size=1)
    assert t["ttft_s"] == pytest.approx(0.5)
    assert t["decode_tokens_per_s"] == pytest.approx(4 / 0.4)
    assert t["new_tokens"] == 5
    # a batch of 4 produces 4 tokens per step
    t4 = B.generation_timing(10.0, [10.5, 10.6, 10.7, 10.8, 10.9], batch_size=4)
    assert t4["decode_tokens_per_s"] == pytest.approx(4 * 4 / 0.4)
    assert t4["e2e_tokens_per_s"] == pytest.approx(4 * 5 / 0.9)
    assert B.generation_timing(0.0, [0.2], 1)["decode_tokens_per_s"] is None
    with pytest.raises(ValueError):
        B.generation_timing(0.0, [], 1)


def test_left_pad_puts_prompts_at_the_right():
    from slmforge.evaluation import left_pad

    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_peak_memory_sees_a_transient_allocation():
    with peak_memory.PeakMemory() as mem:
        x = torch.ones(16_000_000, dtype=torch.float32)  # 64 MB, touched
        x += 1
        del x
        peak_memory.trim_malloc()
        peak = mem.mark("after")
    assert peak >= 50e6, (peak, mem.method)
    assert mem.delta_bytes() >= peak
    assert "RSS" in mem.method or "CUDA" in mem.method


def _row(model, mode, tps, acc, footprint, errors=()):
    timing = {"median": tps, "min": tps - 1, "max": tps + 1, "spread": 1.0, "n": 3}
    return {
        "model": model, "mode": mode, "status": "ok" if not errors else "error", "errors": list(errors),
        "footprint_bytes": footprint, "peak_gen_bytes": footprint * 1.5, "peak_bytes": footprint * 2, "load_s": 1.0, "attn_implementation": "sdpa",
        "speed": {"1": {"batch_size": 1, "ttft_s": {"median": 0.05, "min": 0.04, "max": 0.06, "spread": 0.01, "n": 3},
                        "decode_tokens_per_s": timing},
                  "4": {"batch_size": 4, "ttft_s": {"median": 0.1, "min": 0.1, "max": 0.1, "spread": 0.0, "n": 3},
                        "decode_tokens_per_s": {**timing, "median": tps * 3}}},
        "quality": {"key_accuracy": acc, "char_f1": 0.5, "chrf": 0.4, "answer_loss": 1.25, "n": 16},
        "answers": [{"prompt": "p", "answer": f"{model}-{mode}", "new_tokens": 3}],
    }


def test_tables_csv_and_chart(tmp_path):
    rows = [_row("a", "bf16", 10.0, 0.5, 270e6), _row("a", "4bit", 5.0, 0.25, 110e6),
            {"model": "b", "mode": "all", "status": "error", "errors": ["no such directory"]}]
    table = report.display_rows(rows)
    assert table[0]["tok/s b1"] == "10.0 ±1.0" and table[0]["tok/s b4"] == "30.0 ±1.0"
    assert table[0]["footprint MB"] == "270" and table[0]["TTFT ms"] == "50 ±10" and table[0]["peak MB"] == "405"
    assert list(table[2]) == list(table[0]) and list(table[0])[-1] == "error"
    assert table[2]["error"] == "no such directory" and table[2]["key acc"] == "–"
    parsed = list(csv.DictReader(io.StringIO(report.csv_text(rows))))
    assert [r["mode"] for r in parsed] == ["bf16", "4bit", "all"]
    assert float(parsed[1]["decode_tps_b1"]) == 5.0 and parsed[1]["batch_N"] == "4"
    assert parsed[2]["error"] == "no such directory" and parsed[2]["footprint_mb"] == ""
    png = report.quality_memory_chart(rows, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.prompt_answer_tables(rows, ["p"])[0][1][1]["answer"] == "a-4bit"


# -- settings ----------------------------------------------------------------------------------


def test_compare_config_from_overrides_and_file(tmp_path):
    cfg = load_compare_config(overrides=["models=./m", "modes=[bf16, 4bit-nodq]", "speed.batch_sizes=[4,1,4]"])
    assert cfg.models == ["./m"] and cfg.modes == ["bf16", "4bit-nodq"] and cfg.speed.batch_sizes == [1, 4]
    assert cfg.eval_items(gpu=False) == 32 and cfg.eval_items(gpu=True) == 64
    assert cfg.resolved(gpu=False) == {"eval_items": 32, "eval_max_new_tokens": 48, "speed_new_tokens": 8,
                                       "answer_max_new_tokens": 32}
    f = tmp_path / "c.yaml"
    f.write_text("models: [a/b]\neval:\n  items: 8\n")
    assert load_compare_config(f).eval_items(False) == 8
    with pytest.raises(ConfigError, match="modes"):
        load_compare_config(overrides=["modes=[16bit]"])
    with pytest.raises(ConfigError, match="not a valid YAML list"):
        load_compare_config(overrides=["prompts=[What is 2+2?, b]"])
    with pytest.raises(ConfigError, match="speed.runz: unknown setting"):
        load_compare_config(overrides=["speed.runz=3"])
    assert CompareConfig().models[-1] == "finetune:latest"


def test_cli_print_config_and_bad_setting(capsys):
    from flows.cli import main

    assert main(["compare", "--print-config", "--set", "modes=[4bit]"]) == 0
    assert "- 4bit" in capsys.readouterr().out
    assert main(["compare", "--set", "eval.items=0"]) == 2
    assert "eval.items" in capsys.readouterr().err


# -- finding the latest fine-tuned model ----------------------------------------------------------


def _fake_output(store: ArtifactStore, key: str, meta: dict | None = None) -> None:
    staging = store.staging_dir(key)
    (staging / "config.json").write_text("{}")
    store.commit_dir(staging, key, meta=meta)


def test_finetune_latest_prefers_published_then_newest(tmp_path):
    from tasks.compare_sources import latest_finetuned, resolve_entry

    store = ArtifactStore(f"file://{tmp_path}/store")
    assert resolve_entry("finetune:latest", store)["kind"] == "skipped"
    _fake_output(store, "merged/older")
    time.sleep(0.01)
    _fake_output(store, "merged/newer")
    assert latest_finetuned(store)[0] == "merged/newer"
    _fake_output(store, "published/abc", meta={"content_hash": "abc", "target": "me/repo", "merged": "merged/older",
                                               "published_at": 5, "location": "https://hub/me/repo"})
    key, how = latest_finetuned(store)
    assert key == "merged/older" and "published" in how
    entry = resolve_entry("store:merged/newer", store)
    assert entry["kind"] == "store" and entry["key"] == "merged/newer"
    from slmforge.modeling import ModelSourceError

    with pytest.raises(ModelSourceError, match="no such directory"):
        resolve_entry(str(tmp_path / "nope"), store)


def test_a_merged_model_in_4bit_is_measured_as_its_adapter_on_the_4bit_base(tiny_model_dir, tmp_path):
    """finetune:latest in 4-bit: the merged model's adapter on the 4-bit base it was trained on (what
    the finetune flow evaluated), not the merged weights quantized again. The tiny model's coarse
    weights (std 0.2) make re-quantization's error large, so the two are far apart."""
    from peft import LoraConfig, get_peft_model

    from slmforge import data as D
    from slmforge import merging as G
    from slmforge import modeling as M
    from slmforge import readers as RD
    from slmforge import records as RC
    from slmforge.evaluation import evaluate_model
    from slmforge.runtime import decide
    from tasks.compare import eval_examples, measure
    from tasks.compare_sources import resolve_entry

    store = ArtifactStore(f"file://{tmp_path}/store")
    staging = store.staging_dir("models/quantized/q")
    M.load_model(tiny_model_dir, "4bit").save_pretrained(staging)
    M.load_tokenizer(tiny_model_dir).save_pretrained(staging)
    store.commit_dir(staging, "models/quantized/q")
    staging = store.staging_dir("adapters/a")
    torch.manual_seed(0)
    peft_model = get_peft_model(M.load_model(store.get_dir("models/quantized/q"), "saved"), LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(staging)
    M.load_tokenizer(tiny_model_dir).save_pretrained(staging)
    store.commit_dir(staging, "adapters/a")
    quantized, adapter = store.get_dir("models/quantized/q"), store.get_dir("adapters/a")
    staging = store.staging_dir("merged/m")
    G.merge(quantized, tiny_model_dir, adapter, staging, "quantized")
    M.load_tokenizer(tiny_model_dir).save_pretrained(staging)
    store.commit_dir(staging, "merged/m", meta={"trained_from": {"adapter": "adapters/a",
                                                                 "quantized_base": "models/quantized/q"}})

    cfg = load_compare_config(overrides=["eval.items=4", "eval.max_new_tokens=4", "eval.batch_size=2",
                                         "speed.new_tokens=2", "speed.runs=1", "speed.warmup=0",
                                         "speed.batch_sizes=[1]", 'prompts=["2+2?"]', "answer_max_new_tokens=2",
                                         f"storage.url=file://{tmp_path}/store", "threads=1"])
    examples = eval_examples(cfg, store, gpu=False)
    entry = resolve_entry("finetune:latest", store)
    assert entry["trained_from"] == {"adapter": "adapters/a", "quantized_base": "models/quantized/q"}
    as_trained = measure(entry, "4bit", examples, cfg, store)
    requantized = measure({k: v for k, v in entry.items() if k != "trained_from"}, "4bit", examples, cfg, store)
    assert as_trained["status"] == "ok" and as_trained["adapter"] == "adapters/a", as_trained
    assert report.mode_label(as_trained) == "4bit + adapter" and report.mode_label(requantized) == "4bit"
    assert "adapters/a" in as_trained["source_label"] and requantized["adapter"] is None
    assert as_trained["n_params"] == requantized["n_params"]  # the base's count, the adapter not in it
    assert as_trained["footprint_bytes"] > requantized["footprint_bytes"]  # the adapter's fp32 weights

    tokenizer = M.load_tokenizer(adapter)
    records = RC.tokenize_split(tokenizer, [D.Example(**e) for e in examples], cfg.data, RD.Report("t"), "test")
    trained = evaluate_model(G.load_trained(quantized, adapter, decide()), tokenizer, records,
                             cfg.eval_max_new_tokens(False), cfg.eval.batch_size, cfg.eval.seed)
    want = trained["summary"]["overall"]["answer_loss"]
    got, other = as_trained["quality"]["answer_loss"], requantized["quality"]["answer_loss"]
    # a random model's loss sits near ln(vocab) whatever it runs as, so the differences are small:
    # 0.0005 (bitsandbytes' packed inference kernel against training's unpacked one) and 0.04 here
    assert abs(got - want) < 0.005, (got, want)
    assert abs(other - want) > 10 * abs(got - want), (other, got, want)

    # an adapter deleted from the store since: the plain 4-bit row, and a line saying why
    store.fs.rm(store.path("adapters/a"), recursive=True)
    said = []
    assert "trained_from" not in resolve_entry("finetune:latest", store, said.append)
    assert any("adapters/a is no longer in the store" in s for s in said), said

    row = report.flat_row(as_trained)
    assert row["mode"] == "4bit" and row["adapter"] == "adapters/a"
    assert report.display_rows([as_trained])[0]["mode"] == "4bit + adapter"


# -- the flow ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory, smollm_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("tiny-qwen2")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_flow_two_models_two_modes_and_a_failing_source(prefect_api, tiny_model_dir, tiny_qwen_dir, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.compare import compare

    missing = tmp_path / "no-such-model"
    store_dir = tmp_path / "store"
    cfg = load_compare_config(overrides=[
        f"models=[{tiny_model_dir}, {tiny_qwen_dir}, {missing}, finetune:latest]",
        "modes=[bf16, 4bit]", f"storage.url=file://{store_dir}", "threads=1",
        "eval.items=2", "eval.max_new_tokens=4", "eval.batch_size=2",
        "speed.new_tokens=3", "speed.runs=2", "speed.warmup=0", "speed.batch_sizes=[1, 2]",
        'prompts=["대한민국의 수도는?", "What is 2+2?"]', "answer_max_new_tokens=4",
    ])
    threads_before = torch.get_num_threads()
    state = compare(cfg, return_state=True)
    assert state.is_completed(), state
    out = state.result()

    rows = {(r["model"], r["mode"]): r for r in out["rows"]}
    assert len(out["rows"]) == 6, list(rows)
    for model in (tiny_model_dir.name, tiny_qwen_dir.name):
        for mode in ("bf16", "4bit"):
            r = rows[(model, mode)]
            assert r["status"] == "ok", r
            assert r["footprint_mb"] > 0 and r["load_s"] > 0
            # the selection guide's estimator, from the config alone, within 10% of what loaded
            assert abs(r["estimated_mb"] - r["footprint_mb"]) <= 0.10 * r["footprint_mb"], r
            assert r["peak_mb"] >= r["peak_gen_mb"] >= r["peak_load_mb"] >= 0
            assert r["decode_tps_b1"] > 0 and r["decode_tps_bN"] > 0 and r["batch_N"] == 2
            assert r["ttft_ms"] > 0 and r["ttft_ms_spread"] is not None
            assert r["attn_implementation"] == "sdpa"
            assert r["answer_loss"] > 0 and r["eval_n"] == 2 and r["char_f1"] is not None
        assert rows[(model, "bf16")]["n_params"] == rows[(model, "4bit")]["n_params"]  # 4-bit counted unpacked
    bad = rows[(missing.name, "all")]
    assert bad["status"] == "error" and "no such directory" in bad["error"]
    assert rows[("finetune:latest", "all")]["status"] == "skipped"

    store = ArtifactStore(cfg.storage.url)
    assert out["key"].startswith("compare/") and store.exists(out["key"])
    d = store.get_dir(out["key"])
    assert {"report.md", "results.csv", "results.json", "quality_vs_memory.png"} <= {p.name for p in d.iterdir()}
    assert (d / "quality_vs_memory.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((d / "results.json").read_text())
    full = {(r["model"], r["mode"]): r for r in results["rows"]}
    answers = full[(tiny_model_dir.name, "4bit")]["answers"]
    assert [a["prompt"] for a in answers] == ["대한민국의 수도는?", "What is 2+2?"]
    assert results["memory_method"].startswith("CPU peak RSS delta")
    assert full[(tiny_model_dir.name, "bf16")]["torch_threads"] == 1 and torch.get_num_threads() == threads_before
    with open(d / "results.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 6
    report = (d / "report.md").read_text()
    assert "no such directory" in report and "What is 2+2?" in report and "quality_vs_memory.png" in report
    assert any(row["error"] for row in out["table"])

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["compare-table", "compare-report"])))

    assert {a.key for a in asyncio.run(artifacts())} == {"compare-table", "compare-report"}


# -- fanned out over a pool (the two-worker run itself: tests/test_stack.py) ----------------------

def test_the_per_model_deployment_setting_is_a_deployment_name_or_off():
    assert CompareConfig().per_model_deployment == "compare-model/fan-out"
    assert load_compare_config(overrides=["per_model_deployment="]).per_model_deployment is None
    for bad in ("fan-out", "a/b/c", "/fan-out"):
        with pytest.raises(ConfigError, match="per_model_deployment"):
            load_compare_config(overrides=[f"per_model_deployment={bad}"])


def test_a_comparison_not_started_from_a_deployment_measures_in_its_own_run(prefect_api):
    from prefect import flow

    from tasks.compare import fan_out_deployment

    @flow
    def local():
        return fan_out_deployment(CompareConfig())

    assert local() is None  # no deployment, no workers to fan out to: one process, as before


def test_a_model_run_that_crashed_or_wrote_nothing_keeps_its_row_with_why(tmp_path):
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Completed, Crashed

    from tasks.compare import collect_part, part, part_key, write_part

    cfg = CompareConfig(storage={"url": f"file://{tmp_path}/store"})
    store = ArtifactStore.from_config(cfg.storage)
    parent = str(uuid.uuid4())
    crashed = FlowRun(flow_id=uuid.uuid4(), name="brave-otter", state=Crashed(message="process exited -9"))
    got = collect_part("/models/a", crashed, store, part_key(parent, "/models/a"))
    assert got["entry"]["kind"] == "error" and got["rows"][0]["status"] == "error"
    assert "brave-otter" in got["rows"][0]["errors"][0] and "Crashed: process exited -9" in got["rows"][0]["errors"][0]
    assert got["rows"][0]["model"] == "a"

    done = FlowRun(flow_id=uuid.uuid4(), name="calm-heron", state=Completed())
    key = part_key(parent, "/models/b")
    assert "ended Completed" in collect_part("/models/b", done, store, key)["rows"][0]["errors"][0]  # no part written
    written = part({"name": "b", "spec": "/models/b", "kind": "path"}, [{"model": "b", "mode": "bf16", "status": "ok"}],
                   [{}, {}])
    write_part(written, key, cfg)
    assert collect_part("/models/b", done, store, key) == {**written, "gpu": False}


def test_two_comparisons_of_the_same_settings_each_keep_their_own_report(tmp_path):
    """The store never replaces an output, so a comparison keyed by its settings alone would adopt the
    first run's report: the store's report.md would not be the one the second run measured."""
    from tasks.compare import compare_key, error_row, write_report

    cfg = CompareConfig(storage={"url": f"file://{tmp_path}/store"})
    store = ArtifactStore.from_config(cfg.storage)
    entries = [{"spec": "m", "kind": "error", "error": "x"}]
    for run, error in (("run-1", "first run's error"), ("run-2", "second run's error")):
        key = compare_key(cfg, entries, False, run)
        write_report([error_row({"spec": "m"}, "all", error)], cfg, key, store, time.time(), 0, log=lambda m: None)
        rows = json.loads((store.get_dir(key) / "results.json").read_text())["rows"]
        assert rows[0]["errors"] == [error], (run, rows)


def test_a_model_run_waits_for_busy_workers_but_not_for_a_pool_without_any(prefect_api):
    """A fanned-out model run that no worker can ever pick up is cancelled with why (the comparison
    waited forever before); one whose pool has a worker online waits however long it queues."""
    import threading

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Completed

    from tasks.compare import wait_for_model_run

    @flow(name="compare-model-test")
    def model_run():
        pass

    def scheduled_run(client, pool: str):
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = client.create_flow_from_name("compare-model-test")
        deployment = client.create_deployment(flow_id=flow_id, name=pool, work_pool_name=pool)
        return client.create_flow_run_from_deployment(deployment)

    def wait(run_id, pool: str, log=print):
        """wait_for_model_run in a thread, so a guard that never fires fails the test instead of hanging it"""
        out = []
        waiter = threading.Thread(target=lambda: out.append(wait_for_model_run(
            get_client(sync_client=True).__enter__(), run_id, pool, patience_s=1, poll_s=0.2, log=log)), daemon=True)
        waiter.start()
        waiter.join(timeout=60)
        assert out, f"no result for {run_id} on pool {pool!r} in 60 s (still waiting, or it raised: see above)"
        return out[0]

    def complete_later(run_id):
        with get_client(sync_client=True) as c:
            c.set_flow_run_state(run_id, Completed(), force=True)

    logged = []
    with get_client(sync_client=True) as client:
        orphan = scheduled_run(client, "nobody-polls")
        run = wait(orphan.id, "nobody-polls", log=logged.append)
        assert run.state.is_cancelled(), run.state
        assert "no worker online" in run.state.message and "nobody-polls" in run.state.message
        assert logged and "nobody-polls" in logged[0]

        gone = scheduled_run(client, "deleted-since")
        client.delete_work_pool("deleted-since")
        run = wait(gone.id, "deleted-since")
        assert run.state.is_cancelled() and "(missing;" in run.state.message, run.state

        queued = scheduled_run(client, "busy")
        client.send_worker_heartbeat("busy", "gpu-worker-1")  # a worker online, busy with other runs
        assert client.read_work_pool("busy").status.value == "READY"
        threading.Timer(3, complete_later, args=(queued.id,)).start()
        run = wait(queued.id, "busy")
        assert run.state.is_completed(), run.state  # waited past the patience: the pool had a worker
