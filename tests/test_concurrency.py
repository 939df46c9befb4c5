"""Runs that share a store: writers of one key at the same moment, readers beside them, publishes
that race, and whole finetune runs started together. On `file://` and on a real S3 server
(SeaweedFS). A complete output is never deleted or replaced, and no publish entry is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from slmforge import publish_record
from slmforge.storage import DATA_PREFIX, MANIFEST, ArtifactStore, StoreError

pytestmark = pytest.mark.faults

WRITERS = 6


@pytest.fixture(params=["file", "s3"])
def open_store(request, tmp_path):
    """Opens the test's store as another process would: its own client and its own local cache."""
    if request.param == "file":
        return lambda cache="cache": ArtifactStore(f"file://{tmp_path / 'store'}", cache_dir=tmp_path / cache)
    weed = request.getfixturevalue("weed")
    return lambda cache="cache": ArtifactStore(f"s3://{weed.bucket}/{tmp_path.name}", endpoint_url=weed.endpoint,
                                               cache_dir=tmp_path / cache)


@pytest.fixture
def store(open_store) -> ArtifactStore:
    return open_store()


def _together(n: int, fn) -> list:
    """Run fn(i) for i < n in threads released at the same moment; re-raise the first error."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list[BaseException] = []

    def go(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


def _stage(store: ArtifactStore, key: str, writer: int) -> Path:
    staging = store.staging_dir(key)
    (staging / "weights.bin").write_bytes(os.urandom(300_000))  # several requests' worth on S3
    (staging / "sub").mkdir()
    (staging / "sub" / "writer.json").write_text(json.dumps({"writer": writer}))
    return staging


def test_writers_of_one_key_at_once_leave_one_complete_output(store, open_store):
    """Six writers commit the same key together while a reader polls it: all of them return the
    same manifest (the first commit's), it verifies in full, its files are one writer's, and nothing
    any writer staged is left behind."""
    key = "adapters/same"
    staged = [_stage(store, key, i) for i in range(WRITERS)]
    weights = [(s / "weights.bin").read_bytes() for s in staged]
    seen: list[int] = []
    mixed: list[int] = []
    stop = threading.Event()

    def reader():
        other = open_store("reader-cache")
        while not stop.is_set():
            try:
                d = other.get_dir(key, verify="full")
            except StoreError:
                continue  # not committed yet
            w = json.loads((d / "sub" / "writer.json").read_text())["writer"]
            (seen if (d / "weights.bin").read_bytes() == weights[w] else mixed).append(w)

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        manifests = _together(WRITERS, lambda i: store.commit_dir(staged[i], key, meta={"writer": i}))
    finally:
        stop.set()
        watcher.join(60)

    assert len({json.dumps(m, sort_keys=True) for m in manifests}) == 1, "every writer reports the live output"
    winner = manifests[0]["meta"]["writer"]
    local = store.get_dir(key, verify="full")
    assert json.loads((local / "sub" / "writer.json").read_text())["writer"] == winner
    assert (local / "weights.bin").read_bytes() == weights[winner]
    assert not mixed, "a reader saw files of two writers in one output"
    assert set(seen) <= {winner}, "a reader never saw an output replaced"
    assert not any(s.exists() for s in staged), "every staging directory is consumed"
    if store.scheme == "file":
        assert sorted(p.name for p in Path(store.path("adapters")).iterdir()) == ["same"]
    else:
        names = store.children(key)
        assert names == sorted([MANIFEST, "sub", "weights.bin"]) or names == sorted(
            [MANIFEST, store.manifest(key)["data"]]), f"losers' uploads left behind: {names}"


def test_a_commit_never_replaces_a_complete_output(store):
    first = store.commit_dir(_stage(store, "k/x", 1), "k/x", meta={"writer": 1})
    again = store.commit_dir(_stage(store, "k/x", 2), "k/x", meta={"writer": 2})
    assert again == first and store.manifest("k/x")["meta"] == {"writer": 1}
    assert json.loads((store.get_dir("k/x", verify="full") / "sub" / "writer.json").read_text()) == {"writer": 1}


def test_a_crashed_upload_is_kept_while_young_and_removed_when_stale(weed, tmp_path, monkeypatch):
    """An object-store writer's data directory without a manifest may be an upload in progress:
    the partial sweep leaves it alone until it is STALE_UPLOAD_S old."""
    import slmforge.storage as S

    store = ArtifactStore(f"s3://{weed.bucket}/{tmp_path.name}", endpoint_url=weed.endpoint,
                          cache_dir=tmp_path / "cache")
    now = int(S.time.time())
    young, old = f"{DATA_PREFIX}{now}-aaaa", f"{DATA_PREFIX}{now - S.STALE_UPLOAD_S - 60}-bbbb"
    for name in (young, old):
        store.fs.pipe(store.path(f"checkpoints/k/checkpoint-4/{name}/optimizer.pt"), b"cut off")
    assert store.discard_partial("checkpoints/k/checkpoint-4")
    assert store.children("checkpoints/k/checkpoint-4") == [young]


def test_publishes_at_once_each_keep_their_entry(store):
    """Runs that publish different results at the same moment: every entry is in the record, and
    the index `published/record.json` ends up listing all of them."""
    def publish(i):
        staging = store.staging_dir(f"published/h{i}")
        (staging / "README.md").write_text(f"card {i}")
        store.commit_dir(staging, f"published/h{i}", meta={
            "content_hash": f"h{i}", "target": "dry-run", "primary": "key_accuracy", "primary_value": i / 10,
            "published_at": 1000.0 + i, "location": store.uri(f"published/h{i}")})
        return publish_record.write_index(store)

    _together(WRITERS, publish)
    record = publish_record.record(store)
    assert sorted(record["published"]) == [f"h{i}" for i in range(WRITERS)]
    assert record["latest"]["dry-run"]["content_hash"] == f"h{WRITERS - 1}"
    assert store.read_json(publish_record.INDEX) == json.loads(json.dumps(record))


# -- whole runs -----------------------------------------------------------------------------------
PROJECT = Path(__file__).resolve().parent.parent


def _all_outputs(store: ArtifactStore) -> list[str]:
    """Every committed key in the store (the directories that hold a manifest)."""
    root = store.path("")
    found = store.fs.find(root) if store.scheme != "file" else [str(p) for p in Path(root).rglob(MANIFEST)]
    return sorted(p[len(root) + 1:].rsplit("/", 1)[0] for p in found if p.endswith("/" + MANIFEST)
                  and f"/{DATA_PREFIX}" not in p)


def _where(stdout: str) -> dict[str, str]:
    """The CLI's "Where everything went" lines as {stage: uri}."""
    lines = stdout.split("Where everything went:", 1)[1].split("\n\n", 1)[0].strip().splitlines()
    return dict(line.split(None, 1) for line in lines)


@pytest.mark.e2e
def test_finetune_runs_started_together_share_one_store(prefect_api, open_store, tiny_model_dir, tmp_path):
    """Three `slmforge finetune` processes started at once on one store (and one machine's cache):
    two with the same settings, one with another seed that shares their dataset and base. All
    complete, every output in the store verifies in full, the two alike report the same outputs, and
    the publish record holds both results."""
    from prefect.settings import PREFECT_API_URL

    store = open_store()
    sets = [f"model.source={tiny_model_dir}", f"storage.url={store.url}",
            "data.train_limit=16", "data.test_limit=6", "data.max_length=256",
            "train.max_steps=2", "train.batch_size=4", "eval.max_new_tokens=4", "eval.batch_size=6",
            "merge.min_answer_agreement=0", "eval.min_improvement=-1"]  # a random model: publish regardless
    if store.endpoint_url:
        sets.append(f"storage.endpoint_url={store.endpoint_url}")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "SLMFORGE_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(PROJECT)}
    runs = {"a": [], "a-again": [], "b": ["train.seed=7"]}
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "finetune", *(a for s in sets + extra for a in ("--set", s))],
        cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, extra in runs.items()}
    out = {name: p.communicate(timeout=600) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} failed:\n{out[name][1][-3000:]}"
        assert "Published:" in out[name][0], out[name][0][-2000:]
    where = {name: _where(o[0]) for name, o in out.items()}

    assert where["a"] == where["a-again"], "runs with the same settings share every output"
    for stage in ("dataset", "base", "quantized"):
        assert where["b"][stage] == where["a"][stage], stage
    assert where["b"]["adapter"] != where["a"]["adapter"]
    keys = _all_outputs(store)
    assert {u.split(store.url + "/", 1)[1] for w in where.values() for u in w.values()} <= set(keys)
    for key in keys:
        store.get_dir(key, verify="full")
    record = publish_record.record(store)
    assert len(record["published"]) == 2, record
    assert {e["evaluation"] for e in record["published"].values()} == \
        {where["a"]["report"].split(store.url + "/", 1)[1], where["b"]["report"].split(store.url + "/", 1)[1]}
    assert store.read_json(publish_record.INDEX) == json.loads(json.dumps(record))


def test_a_second_download_never_pulls_a_cached_copy_from_under_its_reader(tmp_path):
    """Two processes on one machine fetch the same output into the shared cache; the one that
    finishes second keeps the first's copy (which the other may be loading) instead of replacing it.
    (Seen in the three-run test: a rank loading the base found its files gone.)"""
    import random

    store = ArtifactStore(f"memory://slmforge-{random.randrange(1 << 30)}", cache_dir=tmp_path / "cache")
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(os.urandom(10_000))
    store.put_dir(src, "models/q")
    first = store.get_dir("models/q")
    inode = (first / "model.safetensors").stat().st_ino
    other = ArtifactStore(store.url, cache_dir=tmp_path / "cache")
    other._download("models/q", other.manifest("models/q"), first)  # the slower process, finishing now
    assert (first / "model.safetensors").stat().st_ino == inode, "the copy in use was replaced"
    assert not [p for p in first.parent.iterdir() if ".tmp-" in p.name], "its own download is removed"
