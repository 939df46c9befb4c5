"""Nightly runs on changing data: each source kind, run → change one row (or push one commit) → run
→ run unchanged. The second night prepares the data anew and trains; the third is all cache hits.
And a nightly on data without key facts is judged by a metric it can yield (eval.primary_metric auto)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowruns import STAGES, stage_states
from slmforge.config import PROJECT_DIR, load_config
from slmforge.storage import ArtifactStore


def _rows(n=24, shift=0):
    return [{"question": f"What is {a} plus {a + 3}?", "answer": f"{2 * a + 3 + shift}.", "key": str(2 * a + 3 + shift),
             "split": "test" if a % 6 == 5 else "train"} for a in range(2, 2 + n)]


def _jsonl(rows) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def _sets(tiny_model_dir, store_url, source, **extra):
    """A nightly as small as a flow gets: one step, short answers, no calibration."""
    return [f"model.source={tiny_model_dir}", f"storage.url={store_url}", f"data.source={source}",
            "data.test_limit=4", "data.max_length=128", "train.max_steps=1", "train.batch_size=4",
            "calibrate.enabled=false", "eval.max_new_tokens=2", "eval.batch_size=4", "eval.samples=1",
            "merge.min_answer_agreement=0", "retention.after_run=false"] + [f"{k}={v}" for k, v in extra.items()]


def _nights(run, change, changed="dataset"):
    """run() -> (stage states, result) three times, `change()` between the first two; the output
    named `changed` must differ between the first two nights."""
    first_states, first = run()
    assert first_states["train_qlora"] == "Completed", first_states
    change()
    second_states, second = run()
    assert second_states["prepare_dataset"] != "Cached", f"changed data served from the cache: {second_states}"
    assert second_states["train_qlora"] == "Completed", second_states
    assert second[changed] != first[changed], f"the change is not in the {changed}"
    third_states, third = run()
    assert all(third_states[s] == "Cached" for s in STAGES), third_states
    assert third["nightly"].startswith("no new data since"), third["nightly"]
    return first, second, third


def _in_process(cfg):
    from flows.finetune import finetune

    state = finetune(cfg, return_state=True)
    assert state.is_completed(), state
    return stage_states(state), state.result()


def test_a_changed_local_file_is_trained_on(prefect_api, tiny_model_dir, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_bytes(_jsonl(_rows()))
    cfg = load_config(overrides=_sets(tiny_model_dir, f"file://{tmp_path}/store", str(data)))

    def change():
        rows = _rows()
        rows[0] = {**rows[0], "answer": "Five and two.", "key": "7"}  # one row edited
        data.write_bytes(_jsonl(rows + [{"question": "What is 1 plus 1?", "answer": "2.", "key": "2"}]))

    first, second, _ = _nights(lambda: _in_process(cfg), change)
    report = json.loads((ArtifactStore(cfg.storage.url).get_dir(second["report"].split("store/", 1)[1])
                         / "report.json").read_text())
    assert report["dataset"]["identity"]["source"] == str(data) and report["dataset"]["identity"]["version"]


def test_a_changed_directory_read_through_hf_is_trained_on(prefect_api, tiny_model_dir, tmp_path):
    d = tmp_path / "qa-dir"
    d.mkdir()
    (d / "train.jsonl").write_bytes(_jsonl(_rows()))
    cfg = load_config(overrides=_sets(tiny_model_dir, f"file://{tmp_path}/store", f"hf:{d}"))
    _nights(lambda: _in_process(cfg), lambda: (d / "train.jsonl").write_bytes(_jsonl(_rows(shift=1))))


def test_a_changed_s3_object_is_trained_on(prefect_api, tiny_model_dir, weed):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": weed.endpoint}, skip_instance_cache=True)
    uri = f"s3://{weed.bucket}/nightly-in/qa.jsonl"
    fs.pipe_file(uri, _jsonl(_rows()))
    cfg = load_config(overrides=_sets(tiny_model_dir, f"s3://{weed.bucket}/nightly-store", uri,
                                      **{"storage.endpoint_url": weed.endpoint}))
    first, second, _ = _nights(lambda: _in_process(cfg), lambda: fs.pipe_file(uri, _jsonl(_rows(shift=1))))
    report_key = second["report"].split(f"{weed.bucket}/nightly-store/", 1)[1]
    store = ArtifactStore(cfg.storage.url, weed.endpoint)
    identity = json.loads((store.get_dir(report_key) / "report.json").read_text())["dataset"]["identity"]
    assert identity["kind"] == "object" and identity["files"][0]["etag"], identity


# -- Hub sources: through the CLI, in processes whose huggingface_hub points at the local Hub ----------

def _cli_night(env, sets) -> str:
    cmd = [sys.executable, "-m", "flows.cli", "finetune"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture
def hub_env(prefect_api, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from hub_server import LocalHub, use_local_hub

    with LocalHub(tmp_path / "hub") as hub:
        use_local_hub(monkeypatch, hub.token, tmp_path / "hf-home-test")  # this process's uploads
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(tmp_path / "hf-home"), "PREFECT_API_URL": PREFECT_API_URL.value(),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}
        yield hub, env


def _hub_nights(env, sets, change, changed="dataset"):
    outputs = []

    def run():
        out = _cli_night(env, sets)
        outputs.append(out)
        line = out.strip().splitlines()[-1]
        return ({s: "Cached" for s in STAGES} if line.startswith("no new data since") else
                {"prepare_dataset": "?", "train_qlora": "Completed" if line.startswith("trained on") else line},
                {"nightly": line, **{name: next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
                                     for name in ("dataset", "base")}})

    _nights(run, change, changed)
    return outputs


def test_a_new_commit_of_a_hub_dataset_is_trained_on(hub_env, tiny_model_dir, tmp_path):
    from huggingface_hub import HfApi

    hub, env = hub_env
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo("team/qa", repo_type="dataset")
    up = tmp_path / "up"
    up.mkdir()

    def push(rows, message):
        (up / "train.jsonl").write_bytes(_jsonl(rows))
        api.upload_folder(repo_id="team/qa", repo_type="dataset", folder_path=up, commit_message=message)

    push(_rows(), "first night")
    sets = _sets(tiny_model_dir, f"file://{tmp_path}/store", "hf:team/qa")
    outputs = _hub_nights(env, sets, lambda: push(_rows(shift=1), "one row changed"))
    head = hub.head("team/qa", repo_type="dataset")
    assert head[:12] in outputs[1], "the run names the commit it trained on"


def test_a_new_commit_of_a_hub_model_is_trained_on(hub_env, tiny_model_dir, tmp_path, sums_file):
    from huggingface_hub import HfApi

    hub, env = hub_env
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo("team/tiny-llama")
    api.upload_folder(repo_id="team/tiny-llama", folder_path=tiny_model_dir)
    sets = _sets("team/tiny-llama", f"file://{tmp_path}/store", str(sums_file))

    def new_commit():
        api.upload_file(repo_id="team/tiny-llama", path_or_fileobj=b"# tiny llama\n\nretrained\n",
                        path_in_repo="README.md", commit_message="a new commit of the base")

    outputs = _hub_nights(env, sets, new_commit, changed="base")
    assert hub.head("team/tiny-llama")[:12] in outputs[1]


# -- data without key facts -----------------------------------------------------------------------

def _alpaca(tmp_path) -> Path:
    rows = [{"instruction": f"Add {a} and {a + 3}.", "input": "", "output": f"The sum is {2 * a + 3}."}
            for a in range(2, 62)]
    path = tmp_path / "alpaca.jsonl"
    path.write_bytes(_jsonl(rows))
    return path


def test_keyless_data_is_judged_by_chrf_and_published(prefect_api, tiny_model_dir, tmp_path):
    cfg = load_config(overrides=_sets(tiny_model_dir, f"file://{tmp_path}/store", str(_alpaca(tmp_path)),
                                      **{"eval.min_improvement": -1.0}))
    states, out = _in_process(cfg)
    assert out["publish"]["primary"] == "chrf" and out["publish"]["published"] is True, out["publish"]
    assert out["publish"]["published_model"] is not None
    card = (ArtifactStore(cfg.storage.url).get_dir(out["publish"]["location"].split("/store/", 1)[1])
            / "README.md").read_text()
    assert f"Trained on `{cfg.data.source}` at sha256 `" in card and "Base model: `" in card, card[:2000]


def test_key_accuracy_on_keyless_data_is_refused_before_training(prefect_api, tiny_model_dir, tmp_path):
    from flows.finetune import finetune
    from slmforge.data import DataError

    store = tmp_path / "store"
    cfg = load_config(overrides=_sets(tiny_model_dir, f"file://{store}", str(_alpaca(tmp_path)),
                                      **{"eval.primary_metric": "key_accuracy"}))
    with pytest.raises(DataError, match=r"eval.primary_metric: key_accuracy needs key facts"):
        finetune(cfg)
    assert not (store / "adapters").exists() and not (store / "models").exists(), "refused after loading a model"
    # and the CLI says so in seconds, before Prefect starts
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "finetune"]
                          + [a for s in _sets(tiny_model_dir, f"file://{store}", str(_alpaca(tmp_path)),
                                              **{"eval.primary_metric": "key_accuracy"}) for a in ("--set", s)],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert proc.returncode == 2 and "eval.primary_metric" in proc.stderr, proc.stderr[-2000:]


# -- a source that cannot be read fails while being pinned, naming it, before anything loads -----------

def test_an_unreadable_source_fails_when_pinned_naming_it(weed, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    from hub_server import LocalHub
    from slmforge.config import DataConfig, ModelConfig
    from slmforge.data import DataError
    from slmforge.identity import data_identity, model_identity
    from slmforge.modeling import ModelSourceError
    from tasks.dataset import object_fs

    store = ArtifactStore(f"s3://{weed.bucket}/pin-store", weed.endpoint)
    missing = f"s3://{weed.bucket}/nowhere/qa.jsonl"
    with pytest.raises(DataError, match=f"data.source: cannot read {missing}"):
        data_identity(DataConfig(source=missing), object_fs=lambda u: object_fs(u, store))
    with LocalHub(tmp_path / "hub") as hub:
        monkeypatch.setattr(hc, "ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        with pytest.raises(DataError, match="data.source: cannot read hf:team/absent"):
            data_identity(DataConfig(source="hf:team/absent"))
        with pytest.raises(ModelSourceError, match="model.source: cannot resolve 'team/absent-model'"):
            model_identity(ModelConfig(source="team/absent-model"))
