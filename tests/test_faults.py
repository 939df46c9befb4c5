"""Injected faults: half-written artifacts, a training process killed after a checkpoint, out of
memory on the first attempts, an object store that goes away, a token planted in the environment,
and the determinism all of that relies on. Tiny random Llama, a 25-row data file, CPU only."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from slmforge.config import DataConfig, LoraSettings, ModelConfig, StorageConfig, TrainConfig
from weed import Weed  # tests/weed.py; its fixtures come through conftest.py
from slmforge.storage import DATA_PREFIX, MANIFEST, ArtifactStore, StoreError

pytestmark = pytest.mark.faults

PROJECT = Path(__file__).resolve().parent.parent
TRAIN = dict(max_steps=4, batch_size=2, save_steps=2, logging_steps=1, learning_rate=1e-3, warmup_steps=1)


def _quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir, sums_file):
    """A store holding the prepared dataset and the 4-bit tiny base: what training reads."""
    from tasks.dataset import prepare
    from tasks.model import materialise_base, quantize_base

    store_dir = tmp_path_factory.mktemp("prepared") / "store"
    store = ArtifactStore(f"file://{store_dir}", cache_dir=store_dir.parent / "cache")
    model = ModelConfig(source=str(tiny_model_dir))
    data = DataConfig(source=str(sums_file), max_length=64)
    dataset = prepare(data, model, store, log=_quiet)
    base = materialise_base(model, store, log=_quiet)
    quantized = quantize_base(model, base, store, log=_quiet)
    return SimpleNamespace(store_dir=store_dir, dataset=dataset, base={"base": base, "quantized": quantized},
                           model=model, data=data)


def _copy_store(prepared, dest: Path) -> ArtifactStore:
    shutil.copytree(prepared.store_dir, dest)
    return ArtifactStore(f"file://{dest}", cache_dir=dest.parent / f"{dest.name}-cache")


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


# -- atomic artifacts -----------------------------------------------------------------------------
def test_half_written_stage_output_is_ignored_and_replaced(tiny_model_dir, tmp_path):
    """A crash left the base model's directory half-written (no manifest) and a staging directory
    of a process that is gone: the stage treats the output as absent, rebuilds it, and both are gone."""
    from tasks.model import base_key, materialise_base

    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    model = ModelConfig(source=str(tiny_model_dir))
    key = base_key(model)
    final = Path(store.path(key))
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"half a file")
    (final / "leftover.tmp").write_text("from the crashed attempt")
    stale = Path(f"{final}.tmp-{_dead_pid()}")
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"staged, never committed")
    assert not store.exists(key)
    with pytest.raises(StoreError, match="missing or incomplete"):
        store.get_dir(key)

    record = materialise_base(model, store, log=_quiet)

    assert store.exists(key) and record["key"] == key
    manifest = store.manifest(key)
    assert _files(final) == {e["path"] for e in manifest["files"]} | {MANIFEST}
    assert "leftover.tmp" not in _files(final)
    assert (final / "model.safetensors").stat().st_size > 1000
    assert not stale.exists(), "the dead process's staging directory is swept"
    store.get_dir(key, verify="full")


def test_readers_verify_sizes_and_with_full_verification_hashes(tmp_path):
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    staging = store.staging_dir("s/k")
    (staging / "w.bin").write_bytes(b"a" * 100)
    (staging / "c.json").write_text("{}")
    store.commit_dir(staging, "s/k")
    w = tmp_path / "store" / "s" / "k" / "w.bin"
    w.write_bytes(b"b" * 100)  # same size, other bytes
    store.get_dir("s/k")  # sizes only: cheap, passes
    with pytest.raises(StoreError, match="w.bin: sha256 differs"):
        store.get_dir("s/k", verify="full")
    w.write_bytes(b"a" * 99)
    with pytest.raises(StoreError, match="w.bin: size differs"):
        store.get_dir("s/k")
    w.unlink()
    with pytest.raises(StoreError, match="w.bin: missing"):
        store.get_dir("s/k")


def test_a_damaged_download_is_fetched_again(tmp_path):
    store = ArtifactStore(f"memory://slmforge-{random.randrange(1 << 30)}", cache_dir=tmp_path / "cache")
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(1000))
    store.put_dir(src, "s/k")
    local = store.get_dir("s/k", verify="full")
    (local / "w.bin").write_bytes(b"x" * 1000)  # the local copy is damaged (disk, a killed copy)
    assert (store.get_dir("s/k", verify="full") / "w.bin").read_bytes() == (src / "w.bin").read_bytes()


# -- resume, not restart --------------------------------------------------------------------------
RUNNER = """
import json, sys
from slmforge.config import LoraSettings, ModelConfig, TrainConfig
from slmforge.storage import ArtifactStore
from tasks.train import run_training

a = json.load(open(sys.argv[1]))
rec = run_training(a["dataset"], a["base"], ModelConfig(**a["model"]), LoraSettings(**a["lora"]),
                   TrainConfig(**a["train"]), ArtifactStore(a["store"]), log=lambda m: print(m, flush=True))
json.dump(rec, open(a["out"], "w"))
"""


def _run_training_process(args: dict, tmp_path: Path, name: str, **env) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**args, "out": str(tmp_path / f"{name}-out.json")}))
    full_env = {k: v for k, v in os.environ.items() if k not in ("SLMFORGE_INJECT_FAULT", "SLMFORGE_CACHE_DIR")}
    full_env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT), **env)
    return subprocess.run([sys.executable, "-c", RUNNER, str(path)], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=600)


def _train_losses(store: ArtifactStore, key: str) -> list[tuple[int, float]]:
    metrics = json.loads((store.get_dir(key) / "train_metrics.json").read_text())
    return [(h["step"], h["loss"]) for h in metrics["loss_curve"] if "loss" in h]


def test_training_killed_after_a_checkpoint_resumes_from_the_store(prepared, tmp_path):
    """SIGKILL right after checkpoint 2 reached the store; the re-run, on a 'new machine' (empty
    work dir), downloads it, resumes at step 2 and ends where an uninterrupted run ends, with the
    same loss curve."""
    from tasks.train import adapter_key, checkpoint_prefix, run_training

    store = _copy_store(prepared, tmp_path / "store")
    lora, train = LoraSettings(), TrainConfig(**TRAIN)
    key = adapter_key(prepared.dataset, prepared.base, lora, train)
    prefix = checkpoint_prefix(key)
    args = {"dataset": prepared.dataset, "base": prepared.base, "model": prepared.model.model_dump(),
            "lora": lora.model_dump(), "train": train.model_dump(), "store": store.url}

    killed = _run_training_process(args, tmp_path, "killed", SLMFORGE_INJECT_FAULT="kill-after-checkpoint",
                                   SLMFORGE_CACHE_DIR=str(tmp_path / "machine-1"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert "checkpoint 2 saved" in killed.stdout
    assert not store.exists(key), "no adapter from a killed run"
    assert store.children(prefix) == ["checkpoint-2"] and store.exists(f"{prefix}/checkpoint-2")
    saved = {e["path"] for e in store.manifest(f"{prefix}/checkpoint-2")["files"]}
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= saved

    rerun = _run_training_process(args, tmp_path, "rerun", SLMFORGE_CACHE_DIR=str(tmp_path / "machine-2"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from checkpoint 2" in rerun.stdout
    record = json.loads((tmp_path / "rerun-out.json").read_text())
    assert record["train"]["resumed_from_step"] == 2
    assert record["train"]["steps"] == train.max_steps
    assert store.exists(key)
    assert store.children(prefix) == [], "checkpoints are removed once the adapter is in"

    clean = _copy_store(prepared, tmp_path / "clean")
    reference = run_training(prepared.dataset, prepared.base, prepared.model, lora, train, clean, log=_quiet)
    assert reference["train"]["resumed_from_step"] is None
    assert reference["train"]["steps"] == record["train"]["steps"]
    resumed_curve, reference_curve = _train_losses(store, key), _train_losses(clean, key)
    assert [s for s, _ in resumed_curve] == [s for s, _ in reference_curve] == [1, 2, 3, 4]
    assert [x for _, x in resumed_curve] == pytest.approx([x for _, x in reference_curve], rel=1e-4), \
        (resumed_curve, reference_curve)
    assert record["train"]["train_loss"] == pytest.approx(reference["train"]["train_loss"], rel=1e-3)


def test_two_runs_of_one_adapter_on_one_machine_train_it_once(prepared, tmp_path, monkeypatch):
    """Two processes train the same adapter at once with one cache directory (two identical runs
    started together: CI's concurrency test once failed when one removed the checkpoints the other
    was writing). The test holds the adapter's lock until both wait on it; then one trains and
    commits, the other takes that adapter without training, and both succeed."""
    from slmforge.checkpoints import one_trainer_per_machine
    from tasks.train import adapter_key

    store = _copy_store(prepared, tmp_path / "store")
    lora, train = LoraSettings(), TrainConfig(**TRAIN)
    key = adapter_key(prepared.dataset, prepared.base, lora, train)
    args = {"dataset": prepared.dataset, "base": prepared.base, "model": prepared.model.model_dump(),
            "lora": lora.model_dump(), "train": train.model_dump(), "store": store.url}
    cache = tmp_path / "machine"
    monkeypatch.setenv("SLMFORGE_CACHE_DIR", str(cache))
    work = ArtifactStore(store.url).cache_dir / "checkpoints" / key  # as the runs' stage computes it
    env = {k: v for k, v in os.environ.items() if k not in ("SLMFORGE_INJECT_FAULT", "SLMFORGE_CACHE_DIR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT), SLMFORGE_CACHE_DIR=str(cache))
    procs, logs = {}, {}
    with one_trainer_per_machine(work, log=_quiet):
        for name in ("a", "b"):
            path = tmp_path / f"{name}.json"
            path.write_text(json.dumps({**args, "out": str(tmp_path / f"{name}-out.json")}))
            logs[name] = tmp_path / f"{name}.log"
            procs[name] = subprocess.Popen([sys.executable, "-c", RUNNER, str(path)], cwd=tmp_path, env=env,
                                           stdout=logs[name].open("w"), stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while not all("waiting for another process" in logs[n].read_text() for n in procs):
            assert all(p.poll() is None for p in procs.values()), {n: logs[n].read_text()[-2000:] for n in procs}
            assert time.monotonic() < deadline, {n: logs[n].read_text()[-2000:] for n in procs}
            time.sleep(0.5)
    for name, p in procs.items():
        assert p.wait(timeout=600) == 0, logs[name].read_text()[-3000:]
    trained = [n for n in procs if "adapter: " in logs[n].read_text()]
    assert len(trained) == 1, {n: logs[n].read_text()[-2000:] for n in procs}
    other = "b" if trained == ["a"] else "a"
    assert "runtime:" not in logs[other].read_text(), "the second run loaded no model"
    records = [json.loads((tmp_path / f"{n}-out.json").read_text()) for n in procs]
    assert records[0] == records[1] and records[0]["key"] == key
    store.get_dir(key, verify="full")


def test_a_run_waiting_for_the_adapter_lock_says_so_until_it_gets_it(tmp_path):
    """A second run of the same adapter waits for the first as long as it trains (hours on a GPU),
    and its log says again at every reminder that it is waiting, not hung; then it goes on."""
    from slmforge.checkpoints import one_trainer_per_machine

    work = tmp_path / "checkpoints" / "adapters" / "k"
    said, entered = [], threading.Event()

    def second():
        with one_trainer_per_machine(work, log=said.append, remind_every_s=0.1):
            entered.set()

    with one_trainer_per_machine(work, log=_quiet):
        waiter = threading.Thread(target=second)
        waiter.start()
        deadline = time.monotonic() + 30
        while sum("still waiting" in m for m in said) < 3:
            assert time.monotonic() < deadline, said
            time.sleep(0.05)
        assert not entered.is_set()
    waiter.join(timeout=30)
    assert entered.is_set(), said
    assert "waiting for another process" in said[0] and all(f"{work}.lock" in m for m in said[1:]), said


def test_a_partial_checkpoint_upload_is_ignored_and_cleaned(prepared, tmp_path):
    """checkpoint-4 was cut off mid-upload (no manifest): the restore uses checkpoint-2 and removes it."""
    from tasks.train import restore_checkpoint

    store = ArtifactStore(f"file://{tmp_path / 'store'}", cache_dir=tmp_path / "cache")
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "trainer_state.json").write_text('{"global_step": 2}')
    (src / "slmforge_checkpoint.json").write_text('{"step": 2}')
    store.upload_dir(src, "checkpoints/a/checkpoint-2")
    partial = Path(store.path("checkpoints/a/checkpoint-4"))
    partial.mkdir(parents=True)
    (partial / "trainer_state.json").write_text('{"global_step": 4}')
    work = tmp_path / "work"
    work.mkdir()
    assert restore_checkpoint(store, "checkpoints/a", work, log=_quiet) == 2
    assert (work / "checkpoint-2" / "trainer_state.json").is_file()
    assert not partial.exists()


# -- retries that adapt ---------------------------------------------------------------------------
def _task_run_count(state) -> int:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return (await client.read_task_run(state.state_details.task_run_id)).run_count

    return asyncio.run(read())


def _train_task(prepared, store: ArtifactStore, train: TrainConfig):
    """The real train task with its retries (no waiting between them, no cache); its final state."""
    from prefect.cache_policies import NO_CACHE

    from tasks.train import train_qlora

    task = train_qlora.with_options(retry_delay_seconds=0, retry_jitter_factor=None, cache_policy=NO_CACHE,
                                    persist_result=False)
    return task(prepared.dataset, prepared.base, prepared.model, LoraSettings(), train,
                StorageConfig(url=store.url), return_state=True)


def test_out_of_memory_twice_then_success_at_a_quarter_micro_batch(prefect_api, prepared, tmp_path, monkeypatch):
    """Through the real Prefect task and its retries: OOM on attempts 1 and 2, success on 3 with
    micro-batch 4 -> 1 and accumulation 1 -> 4 (the effective batch stays 4); the record says so."""
    store = _copy_store(prepared, tmp_path / "store")
    monkeypatch.setenv("SLMFORGE_INJECT_FAULT", "oom:2")
    monkeypatch.setenv("SLMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    train = TrainConfig(max_steps=2, batch_size=4, grad_accum=1, logging_steps=1, save_steps=50)
    state = _train_task(prepared, store, train)
    assert state.is_completed(), state
    t = state.result()["train"]
    assert (t["micro_batch"], t["grad_accum"], t["effective_batch"]) == (1, 4, 4)
    assert (t["oom_retries"], t["attempt"], t["steps"]) == (2, 3, 2)
    assert _task_run_count(state) == 3
    assert store.manifest(state.result()["key"])["meta"]["train"]["micro_batch"] == 1


def test_out_of_memory_at_micro_batch_one_fails_at_once_saying_what_would_fit(prefect_api, prepared, tmp_path,
                                                                            monkeypatch):
    from tasks.train import TrainingMemoryError

    store = _copy_store(prepared, tmp_path / "store")
    monkeypatch.setenv("SLMFORGE_INJECT_FAULT", "oom:5")
    monkeypatch.setenv("SLMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    state = _train_task(prepared, store, TrainConfig(max_steps=2, batch_size=1))
    assert state.is_failed()
    with pytest.raises(TrainingMemoryError) as err:
        state.result()
    message = str(err.value)
    assert "train.batch_size: out of memory even at micro-batch 1" in message
    assert "GB" in message and "gradient_checkpointing" in message
    assert _task_run_count(state) == 1, "retrying cannot help: not retried"


def test_out_of_memory_inside_a_step_resumes_its_checkpoint_at_half_the_micro_batch(prefect_api, prepared, tmp_path,
                                                                                 monkeypatch):
    """The OOM strikes inside the forward pass of step 3, after checkpoint 2 is in the store: the
    retry (same process) frees the failed attempt's model, resumes from checkpoint 2 at micro-batch 1
    x accumulation 2 (effective batch 2 unchanged) and ends at step 4, with the loss curve of a run
    that never failed."""
    import gc
    import weakref

    from tasks import faults
    from tasks.train import run_training

    store = _copy_store(prepared, tmp_path / "store")
    monkeypatch.setenv("SLMFORGE_INJECT_FAULT", "oom-in-step:3")
    monkeypatch.setenv("SLMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    hooked = []
    real_hook = faults.in_training_step

    def remember(model, attempt, grad_accum, log=print):  # which models the attempts trained
        gc.collect()
        hooked.append((attempt, [r() is not None for _, _, r in hooked], weakref.ref(model)))
        return real_hook(model, attempt, grad_accum, log)

    monkeypatch.setattr(faults, "in_training_step", remember)
    train = TrainConfig(**{**TRAIN, "batch_size": 2, "grad_accum": 1})
    state = _train_task(prepared, store, train)
    assert state.is_completed(), state
    t = state.result()["train"]
    assert (t["micro_batch"], t["grad_accum"], t["effective_batch"]) == (1, 2, 2)
    assert (t["oom_retries"], t["attempt"], t["resumed_from_step"], t["steps"]) == (1, 2, 2, 4)
    assert _task_run_count(state) == 2
    assert [a for a, _, _ in hooked] == [1, 2]
    assert hooked[1][1] == [False], "the failed attempt's model was freed before the retry loaded its own"

    monkeypatch.delenv("SLMFORGE_INJECT_FAULT")
    clean = _copy_store(prepared, tmp_path / "clean")
    reference = run_training(prepared.dataset, prepared.base, prepared.model, LoraSettings(), train, clean,
                             log=_quiet)
    resumed, uninterrupted = _train_losses(store, state.result()["key"]), _train_losses(clean, reference["key"])
    assert [s for s, _ in resumed] == [s for s, _ in uninterrupted] == [1, 2, 3, 4]
    # steps 3-4 ran as 2 micro-batches of 1 instead of 1 of 2: the same sums in another order
    assert [x for _, x in resumed] == pytest.approx([x for _, x in uninterrupted], rel=1e-3), (resumed, uninterrupted)


def test_a_cuda_error_is_not_retried_in_the_process_and_crashes_the_run(prefect_api, prepared, tmp_path, monkeypatch):
    """A device-side assert can leave the CUDA context unusable: the stage is not retried in the
    same process (one attempt despite retries=2) and the flow run ends Crashed, the state the crash
    re-run automation starts a fresh process for."""
    import asyncio

    from prefect import flow
    from prefect.cache_policies import NO_CACHE
    from prefect.client.orchestration import get_client

    from tasks.retry import DeviceUnusable
    from tasks.train import train_qlora

    store = _copy_store(prepared, tmp_path / "store")
    monkeypatch.setenv("SLMFORGE_INJECT_FAULT", "cuda-error")
    monkeypatch.setenv("SLMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    task = train_qlora.with_options(retry_delay_seconds=0, retry_jitter_factor=None, cache_policy=NO_CACHE,
                                    persist_result=False)
    run_ids = []

    @flow(name="one-stage")
    def one_stage():
        from prefect.runtime import flow_run

        run_ids.append(flow_run.get_id())
        return task(prepared.dataset, prepared.base, prepared.model, LoraSettings(), TrainConfig(**TRAIN),
                    StorageConfig(url=store.url))

    with pytest.raises(DeviceUnusable, match="device-side assert.*not retried in this process"):
        one_stage()

    async def states():
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async with get_client() as client:
            run = await client.read_flow_run(run_ids[0])
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            return run.state.type.value, [(t.state.type.value, t.run_count) for t in tasks]

    flow_state, task_states = asyncio.run(states())
    assert flow_state == "CRASHED"
    assert task_states == [("CRASHED", 1)]


_TINY_FLOW = ["data.train_limit=16", "data.test_limit=6", "data.max_length=256", "train.max_steps=2",
              "train.batch_size=4", "eval.max_new_tokens=4", "eval.batch_size=6", "merge.min_answer_agreement=0"]


def test_killed_mid_merge_and_mid_evaluate_the_rerun_completes_and_reads_nothing_half_written(
        prefect_api, tiny_model_dir, tmp_path):
    """`slmforge finetune` SIGKILLed with the merged weights half-staged, then again with the
    evaluation half-staged; each re-run serves the finished stages from the cache, never reads a
    staged output, sweeps the dead process's staging directory and completes."""
    from prefect.settings import PREFECT_API_URL

    store_dir = tmp_path / "store"
    store = ArtifactStore(f"file://{store_dir}")
    sets = [f"model.source={tiny_model_dir}", f"storage.url={store.url}", *_TINY_FLOW]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(PROJECT),
           "SLMFORGE_CACHE_DIR": str(tmp_path / "cache"), "SLMFORGE_INJECT_FAULT": "kill-in-merge,kill-in-evaluate"}

    def run():
        return subprocess.run([sys.executable, "-m", "flows.cli", "finetune", *(a for x in sets for a in ("--set", x))],
                              cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)

    def staged(prefix):
        return [p for p in (store_dir / prefix).glob("*.tmp-*")] if (store_dir / prefix).is_dir() else []

    first = run()
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert "killing this process in merge" in first.stdout + first.stderr
    assert [p.name for p in staged("merged")] and any(staged("merged")[0].glob("*.safetensors")), "weights half-staged"
    assert not list((store_dir / "merged").glob(f"*/{MANIFEST}")), "nothing committed"

    second = run()
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    assert "killing this process in evaluate" in second.stdout + second.stderr
    assert not staged("merged"), "the dead process's staging directory is swept"
    assert len(list((store_dir / "merged").glob(f"*/{MANIFEST}"))) == 1
    assert any(staged("eval")[0].glob("*.png")), "the evaluation half-staged"

    third = run()
    assert third.returncode == 0, third.stderr[-3000:]
    assert "Where everything went" in third.stdout
    assert not staged("merged") and not staged("eval")
    assert not [p for p in store_dir.rglob("*.tmp-*")], "no leftovers anywhere"
    for manifest in store_dir.rglob(MANIFEST):
        store.get_dir(manifest.parent.relative_to(store_dir).as_posix(), verify="full")


# -- determinism ----------------------------------------------------------------------------------
def test_same_seed_same_loss_curve(prepared, tmp_path):
    from slmforge import modeling as M
    from slmforge import training as T
    from slmforge.records import read_jsonl

    store = ArtifactStore(f"file://{prepared.store_dir}")
    records = read_jsonl(store.get_dir(prepared.dataset["key"]) / "train.jsonl")
    model_dir = store.get_dir(prepared.base["quantized"]["key"])
    curves = []
    for run in ("a", "b"):
        model = M.load_model(model_dir, "saved")
        tok = M.load_tokenizer(model_dir)
        _, result = T.train(model, tok, records, None, LoraSettings(), TrainConfig(**{**TRAIN, "max_steps": 3}),
                            tmp_path / run)
        curves.append([(h["step"], h["loss"]) for h in result.loss_curve if "loss" in h])
        del model
    assert len(curves[0]) == 3 and curves[0] == curves[1]


# -- object store faults (a real S3 server: SeaweedFS) --------------------------------------------
def _s3_store(weed, tmp_path) -> ArtifactStore:
    return ArtifactStore(f"s3://{weed.bucket}/{tmp_path.name}", endpoint_url=weed.endpoint,
                         cache_dir=tmp_path / "cache")


def _interrupt_after_first_file(monkeypatch, store: ArtifactStore, weed: Weed, restart_after: float | None):
    """Stop the server once the first file of the output is up; start it again after a while (or never)."""
    real = store._put_file
    seen = {"n": 0, "errors": 0}

    def put(path, target):
        seen["n"] += 1
        if seen["n"] == 2:
            weed.stop()
            if restart_after is not None:
                seen["restart"] = threading.Timer(restart_after, weed.start)
                seen["restart"].start()
        try:
            return real(path, target)
        except Exception:
            seen["errors"] += 1
            raise

    monkeypatch.setattr(store, "_put_file", put)
    return seen


def test_store_down_for_seconds_during_an_upload_is_ridden_out(weed, tiny_model_dir, tmp_path, monkeypatch):
    from tasks.model import materialise_base

    store = _s3_store(weed, tmp_path)
    seen = _interrupt_after_first_file(monkeypatch, store, weed, restart_after=1.0)
    model = ModelConfig(source=str(tiny_model_dir))
    record = materialise_base(model, store, log=_quiet)
    seen["restart"].join(60)  # its start() may still be polling; the next test must not race it
    assert seen["errors"] >= 1, "the upload met the outage and was retried"
    assert weed.proc is not None, "the server was stopped and started again during the upload"
    assert store.exists(record["key"])
    store.get_dir(record["key"], verify="full")


def test_store_down_for_good_fails_clearly_with_nothing_visible(weed, tiny_model_dir, tmp_path, monkeypatch):
    from tasks.model import base_key, materialise_base

    store = _s3_store(weed, tmp_path)
    _interrupt_after_first_file(monkeypatch, store, weed, restart_after=None)
    model = ModelConfig(source=str(tiny_model_dir))
    t0 = time.perf_counter()
    with pytest.raises(StoreError, match=r"uploading s3://faults/.*/models/base/.* still failing after 5 attempts"):
        materialise_base(model, store, log=_quiet)
    assert time.perf_counter() - t0 < 60
    weed.start()  # back up: what did the failed stage leave?
    key = base_key(model)
    assert not store.exists(key)
    with pytest.raises(StoreError, match="missing or incomplete"):
        store.get_dir(key)
    store = _s3_store(weed, tmp_path)  # the next attempt, the store healthy, completes beside it
    materialise_base(model, store, log=_quiet)
    manifest = store.manifest(key)
    listed = {p.rsplit(f"{key}/", 1)[1] for p in store.fs.find(store.path(key))}
    committed = {f"{manifest['data']}/{e['path']}" for e in manifest["files"]} | {MANIFEST}
    assert committed <= listed
    # the failed attempt's upload could not be removed while the store was down: no manifest names
    # it, so no reader sees it, and the partial sweep removes it once it is stale
    assert all(p.startswith(DATA_PREFIX) for p in listed - committed)
    store.get_dir(key, verify="full")


def test_checkpoints_restore_from_s3_skipping_a_partial_upload(weed, tmp_path):
    from tasks.train import restore_checkpoint

    store = _s3_store(weed, tmp_path)
    for step in (2, 4):
        src = tmp_path / f"ckpt-{step}"
        src.mkdir()
        (src / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (src / "slmforge_checkpoint.json").write_text(json.dumps({"step": step}))
        (src / "optimizer.pt").write_bytes(os.urandom(5000))
        store.upload_dir(src, f"checkpoints/a/checkpoint-{step}")
    store.fs.pipe(store.path("checkpoints/a/checkpoint-6/optimizer.pt"), b"cut off")  # no manifest
    work = tmp_path / "work"
    work.mkdir()
    assert restore_checkpoint(store, "checkpoints/a", work, log=_quiet) == 4
    assert (work / "checkpoint-4" / "optimizer.pt").read_bytes() == (tmp_path / "ckpt-4" / "optimizer.pt").read_bytes()
    assert not (work / "checkpoint-4" / MANIFEST).exists()
    assert store.children("checkpoints/a") == ["checkpoint-2", "checkpoint-4"]


# -- secrets --------------------------------------------------------------------------------------
FAKE_HF = "hf_FAKEfaultsTOKEN0123456789abcdefXYZ"
FAKE_AWS = "FAKEawsSECRETfaults/0123456789+abcdefXYZ"


def test_planted_secrets_appear_in_no_store_file_and_no_log_line(prefect_api, tiny_model_dir, sums_file, tmp_path,
                                                               monkeypatch, capfd):
    """A tiny finetune flow run end to end (publishing to a local Hub, so the token is really used)
    with fake secrets in HF_TOKEN and AWS_SECRET_ACCESS_KEY: neither is in any file of the store
    (artifacts, task results, reports, the card), any pushed file, any log line the Prefect API
    holds for the run, any artifact, or the console output."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hub_server import LocalHub, use_local_hub

    from flows.finetune import finetune
    from slmforge.config import load_config

    use_local_hub(monkeypatch, FAKE_HF, tmp_path / "hf_home")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_AWS)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "faults-test")
    monkeypatch.setenv("SLMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    store_dir = tmp_path / "store"
    with LocalHub(tmp_path / "hub", token=FAKE_HF) as hub:
        cfg = load_config(overrides=[
            f"model.source={tiny_model_dir}", f"storage.url=file://{store_dir}", f"data.source={sums_file}",
            "data.max_length=64", "data.test_limit=3", "train.max_steps=2", "train.batch_size=4",
            "train.save_steps=1", "eval.max_new_tokens=2", "eval.batch_size=3", "eval.samples=1",
            "eval.adapter_on_4bit=false", "eval.min_improvement=-1", f"publish.hub_endpoint={hub.url}",
            "merge.min_answer_agreement=0",  # a random model's greedy answers flip under bf16 rounding
            "publish.hub_repo=tester/faults-adapter", "publish.token_secret_block=no-such-block"])
        state = finetune(cfg, return_state=True)
        assert state.is_completed(), state
        assert state.result()["publish"]["published"], state.result()["publish"]
        pushed = [p for p in (tmp_path / "hub").rglob("*") if p.is_file()]

    secrets = [FAKE_HF.encode(), FAKE_AWS.encode()]
    files = [p for p in store_dir.rglob("*") if p.is_file()] + pushed
    assert any(p.name == "README.md" for p in files) and any("prefect-results" in str(p) for p in files)
    leaked = [str(p) for p in files if any(s in p.read_bytes() for s in secrets)]
    assert not leaked, leaked

    async def logs_and_artifacts(flow_run_id):
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            artifacts = await client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return [log.message for log in logs], [json.dumps(a.data, default=str) for a in artifacts]

    messages, artifacts = asyncio.run(logs_and_artifacts(state.state_details.flow_run_id))
    assert any("adapter:" in m for m in messages) and any("checkpoint 1 saved" in m for m in messages)
    console = capfd.readouterr()
    for text in messages + artifacts + [console.out, console.err]:
        assert FAKE_HF not in text and FAKE_AWS not in text
