"""Input faults, early: each bad setting, data file, model source or store URL makes `slmforge
finetune` exit non-zero within seconds, before any weights load, with one `error: ...` line that
names the problem, and leaves nothing new in the store but (for bad data) a validation report.

The CLI runs in-process (`flows.cli.main`) for speed, and once as a real subprocess. The Hub is
offline (HF_HUB_OFFLINE=1), so an unknown Hub id fails at once instead of waiting on the network.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults

PROJECT = Path(__file__).resolve().parent.parent
SECONDS = 20  # "in seconds": generous for 2 shared cores; most cases take well under 3


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weird_gguf(path: Path) -> Path:
    """A well-formed GGUF file of an architecture transformers does not know."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch="weirdarch")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad-inputs")
    f = {}
    f["bad_jsonl"] = d / "bad.jsonl"
    f["bad_jsonl"].write_text('{"question": "q", "answer": "a"}\nnot json\n{"question": 3, "answer": "b"}\n')
    f["empty"] = d / "empty.jsonl"
    f["empty"].write_text("")
    f["xlsx"] = d / "qa.xlsx"
    f["xlsx"].write_bytes(b"PK\x03\x04 not really a spreadsheet")
    f["no_question"] = d / "noq.csv"
    f["no_question"].write_text("prompt,answer\nhi,there\nfoo,bar\n")
    f["utf16"] = d / "u16.jsonl"
    f["utf16"].write_bytes('{"question": "q", "answer": "a"}\n'.encode("utf-16"))
    f["not_gguf"] = d / "model.gguf"
    f["not_gguf"].write_text("this is not a GGUF file")
    f["weird_gguf"] = _weird_gguf(d / "weird.gguf")
    f["no_config"] = d / "weights-only"
    f["no_config"].mkdir()
    (f["no_config"] / "model.safetensors").write_bytes(b"\0" * 16)
    f["broken_config"] = d / "broken-config"
    f["broken_config"].mkdir()
    (f["broken_config"] / "config.json").write_text("{ not json")
    f["a_file"] = d / "a-file"
    f["a_file"].write_text("a file where the store's directory should be")
    f["list_yaml"] = d / "list.yaml"
    f["list_yaml"].write_text("- just\n- a list\n")
    f["tiny"] = tiny_model_dir
    f["softcapped"] = d / "softcapped"  # Gemma 2's final_logit_softcapping: no temperature folds into it
    shutil.copytree(tiny_model_dir, f["softcapped"])
    config = json.loads((f["softcapped"] / "config.json").read_text())
    (f["softcapped"] / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    f["head_bias"] = d / "head_bias"  # Phi's LM head has a bias: scaling the norm does not divide the logits
    shutil.copytree(tiny_model_dir, f["head_bias"])
    phi = {k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "max_position_embeddings", "bos_token_id", "eos_token_id")}
    (f["head_bias"] / "config.json").write_text(json.dumps({**phi, "model_type": "phi", "architectures": ["PhiForCausalLM"]}))
    f["logits_scaled"] = d / "logits_scaled"  # Granite divides the head's output by logits_scaling
    shutil.copytree(tiny_model_dir, f["logits_scaled"])
    (f["logits_scaled"] / "config.json").write_text(json.dumps(
        {**config, "model_type": "granite", "architectures": ["GraniteForCausalLM"], "logits_scaling": 8.0}))
    return f


# (id, --set overrides or ["--config", path], text the first error line must contain).
# `{name}` in a value is replaced by the path of files[name].
CASES = [
    # settings
    ("epochs-zero", ["train.epochs=0"], "train.epochs"),
    ("batch-not-a-number", ["train.batch_size=zero"], "train.batch_size"),
    ("lora-rank-zero", ["lora.r=0"], "lora.r"),
    ("misspelt-setting", ["train.epoch=3"], "train.epoch: unknown setting"),
    ("unknown-scheduler", ["train.lr_scheduler=bogus"], "train.lr_scheduler"),
    ("override-without-value", ["train.max_steps"], "expected key=value"),
    ("config-file-missing", ["--config", "/nonexistent/finetune.yaml"], "config file not found"),
    ("config-file-not-a-mapping", ["--config", "{list_yaml}"], "mapping"),
    ("hub-repo-invalid", ["publish.hub_repo=not a repo"], "publish.hub_repo"),
    ("data-max-length-beyond-context", ["data.max_length=1024"], "data.max_length: 1024 exceeds the model's context of 512"),
    ("lora-targets-match-nothing", ["lora.target_modules=[q_proj, zz_proj]"], "lora.target_modules: ['zz_proj']"),
    ("lora-target-not-linear", ["lora.target_modules=[input_layernorm]"], "lora.target_modules"),
    ("modules-to-save-match-nothing", ["lora.modules_to_save=[nonexistent_head]"], "lora.modules_to_save"),
    ("calibrate-soft-capped-logits", ["model.source={softcapped}"], "calibrate.enabled: the model soft-caps"),
    ("calibrate-head-with-bias", ["model.source={head_bias}"], "calibrate.enabled: the model's LM head has a bias"),
    ("calibrate-norm-trained", ["lora.modules_to_save=[norm]"], "calibrate.enabled: the final norm 'model.norm'"),
    ("calibrate-vector-logits-scaled", ["model.source={logits_scaled}", "calibrate.method=vector"],
     "calibrate.method: the model scales its logits"),
    # store URLs
    ("store-scheme-unsupported", ["storage.url=ftp://host/x"], "storage.url"),
    ("store-s3-without-bucket", ["storage.url=s3://"], "storage.url"),
    ("store-not-writable", ["storage.url=file://{a_file}/store"], "storage.url"),
    ("store-unreachable", ["storage.url=s3://bucket/prefix", "storage.endpoint_url=http://127.0.0.1:{port}"],
     "storage.url"),
    # model sources
    ("model-path-missing", ["model.source=/nonexistent/model"], "model.source: no such directory or file"),
    ("model-dir-without-config", ["model.source={no_config}"], "model.source"),
    ("model-config-broken", ["model.source={broken_config}"], "model.source"),
    ("model-hub-id-unknown-offline", ["model.source=nobody-org/no-such-model"], "model.source: 'nobody-org/no-such-model'"),
    ("model-name-garbage", ["model.source=not a model!"], "model.source"),
    ("gguf-missing", ["model.source=/nonexistent/model.gguf"], "model.source: GGUF file not found"),
    ("gguf-not-gguf", ["model.source={not_gguf}"], "not a GGUF file"),
    ("gguf-unsupported-architecture", ["model.source={weird_gguf}"], "weirdarch"),
    # settings this (GPU-less) hardware cannot run: the runtime decision refuses them before loading
    ("compute-float16-on-cpu", ["model.compute_dtype=float16"], "model.compute_dtype: float16 needs a GPU"),
    ("flash-attention-without-gpu", ["model.attn_implementation=flash_attention_2"],
     "model.attn_implementation: flash_attention_2 needs a CUDA GPU"),
    # data files
    ("data-missing", ["data.source=/nonexistent/qa.jsonl"], "data.source: file not found"),
    ("data-invalid-json", ["data.source={bad_jsonl}"], "data.max_bad_fraction"),
    ("data-empty", ["data.source={empty}"], "holds no rows"),
    ("data-unsupported-type", ["data.source={xlsx}"], "unsupported file type"),
    ("data-no-question-column", ["data.source={no_question}"], "rows are bad"),
    ("data-utf16", ["data.source={utf16}"], "UTF-16"),
    ("data-unknown-bundled", ["data.source=bundled:nope"], "data.source: unknown bundled dataset"),
]


def _argv(args: list[str], files: dict[str, Path], store: Path) -> list[str]:
    fill = {k: str(v) for k, v in files.items()} | {"port": str(_closed_port())}
    args = [a.format(**fill) for a in args]
    argv = ["finetune", "--set", f"model.source={files['tiny']}", "--set", f"storage.url=file://{store}",
            "--set", "data.max_length=128"]
    if args[0] == "--config":
        return argv + args
    for a in args:
        argv += ["--set", a]
    return argv


def _store_files(store: Path) -> set[str]:
    return {p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()} if store.exists() else set()


def _check(rc: int, err: str, expected: str, seconds: float, store: Path, before: set[str]) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0, "bad input accepted"
    assert lines and lines[0].startswith("error: "), err
    assert expected in lines[0], f"expected {expected!r} in the first line:\n{err}"
    assert "Traceback" not in err
    assert seconds < SECONDS, f"took {seconds:.1f} s"
    new = _store_files(store) - before
    assert all(p.startswith("validation/") for p in new), f"written to the store: {sorted(new)}"


@pytest.mark.parametrize("args,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_fast_naming_the_problem(args, expected, files, tmp_path, capsys):
    from flows.cli import main

    store = tmp_path / "store"
    store.mkdir()
    (store / "existing.txt").write_text("already here")
    before = _store_files(store)
    t0 = time.perf_counter()
    rc = main(_argv(args, files, store))
    seconds = time.perf_counter() - t0
    _check(rc, capsys.readouterr().err, expected, seconds, store, before)


def test_hub_repo_without_a_token_fails_fast(prefect_api, files, tmp_path, capsys):
    """The token is looked up in a Prefect Secret block, then HF_TOKEN: with neither, it fails at once."""
    from flows.cli import main

    store = tmp_path / "store"
    t0 = time.perf_counter()
    rc = main(_argv(["publish.hub_repo=me/korean-qa", "publish.token_secret_block=no-such-block"], files, store))
    _check(rc, capsys.readouterr().err, "publish.hub_repo: me/korean-qa is set but no Hub token",
           time.perf_counter() - t0, store, set())


def test_the_real_cli_in_a_subprocess(files, tmp_path):
    """`python -m flows.cli finetune` as a user runs it: exit code 2, one error line on stderr."""
    store = tmp_path / "store"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT)}
    env.pop("PREFECT_API_URL", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli",
                           *_argv(["model.source=nobody-org/no-such-model"], files, store)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, proc
    _check(proc.returncode, proc.stderr, "model.source: 'nobody-org/no-such-model'", seconds, store, set())
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1, proc.stderr


def test_lora_targets_are_checked_on_the_meta_device(files):
    """The check builds the model from its config without memory or weights."""
    from slmforge.config import ConfigError, LoraSettings
    from slmforge.modeling import load_config, resolve_source
    from slmforge.lora_targets import check_lora_targets, meta_module_names

    names, linear = meta_module_names(load_config(resolve_source(str(files["tiny"]))))
    assert any(n.endswith("q_proj") for n in linear) and not any(n.endswith("norm") for n in linear)
    check_lora_targets(LoraSettings(target_modules=["q_proj", "v_proj"]), names, linear)
    check_lora_targets(LoraSettings(), names, linear)
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['qkv'\]"):
        check_lora_targets(LoraSettings(target_modules=["qkv"]), names, linear)


def test_validation_report_is_the_only_thing_written_for_bad_data(files, tmp_path, capsys):
    from flows.cli import main

    store = tmp_path / "store"
    rc = main(_argv(["data.source={bad_jsonl}"], files, store))
    captured = capsys.readouterr()
    assert rc == 2
    written = _store_files(store)
    assert len(written) == 1 and next(iter(written)).startswith("validation/"), written
    report = json.loads((store / next(iter(written))).read_text())
    assert report["bad_rows"] == 2
    assert "validation report: file://" in captured.err
