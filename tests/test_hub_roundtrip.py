"""The Hub push round-trips (issue 15): what a nightly run publishes is the model it trained and
measured.

The real finetune flow runs on the tiny random Llama and pushes the adapter and the merged model
(`publish.push_merged`) to the local Hub API (tests/hub_server.py). The test then downloads the
repo with `huggingface_hub.snapshot_download`, loads both models the way the pushed model card's
"How to load" says, and decodes the held-out prompts with the evaluation's own greedy decoder: the
answers must be exactly the ones the evaluate stage reported for `trained` (the adapter on the 4-bit
base) and `published` (the merged model). The downloaded bytes must also be the bytes the store
holds.

The card's merged-model snippet must load the merged model although the adapter sits at the repo
root, and the pushed adapter_config.json must name the card's base, not the training machine's
store path (both were wrong before this test).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import LocalHub, use_local_hub  # noqa: E402

from slmforge.storage import sha256_file  # noqa: E402

FAKE_HF = "hf_FAKEroundtripTOKEN0123456789abcdefXYZ"
REPO = "tester/roundtrip"


@pytest.fixture(scope="module")
def bf16_base_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny random Llama saved in bfloat16, as real bases (SmolLM2 and most Hub models) are stored.

    The model stage materialises every base in bf16 before quantizing it; the card's way quantizes
    the base as it is stored. For an fp32-stored base (conftest's tiny model) the two are different
    4-bit models, so the round trip is checked on a bf16-stored base, where both are the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-llama-bf16")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(out)
    return out


def _how_to_load(card: str) -> str:
    """The python blocks of the card's "How to load" section."""
    section = card.split("## How to load", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, section
    return "\n".join(blocks)


def _answers(model, tokenizer, records, ev) -> list[str]:
    from slmforge.evaluation import generate_answers

    with torch.no_grad():
        return [a["answer"] for a in generate_answers(model, tokenizer, records, ev.max_new_tokens, ev.batch_size,
                                                      ev.seed)]


@pytest.fixture(scope="module")
def pushed(prefect_api, bf16_base_dir, sums_file, tmp_path_factory):
    """One real finetune flow run that pushes the adapter and the merged model to a local Hub, and
    the repo downloaded back with `snapshot_download`."""
    from huggingface_hub import snapshot_download

    from flows.finetune import finetune
    from slmforge.config import load_config
    from slmforge.storage import ArtifactStore

    tmp = tmp_path_factory.mktemp("roundtrip")
    store_dir = tmp / "store"
    with pytest.MonkeyPatch.context() as mp:
        use_local_hub(mp, FAKE_HF, tmp / "hf_home")
        mp.setenv("SLMFORGE_CACHE_DIR", str(tmp / "cache"))
        with LocalHub(tmp / "hub", token=FAKE_HF) as hub:
            cfg = load_config(overrides=[
                f"model.source={bf16_base_dir}", f"storage.url=file://{store_dir}",
                f"data.source={sums_file}", "data.max_length=64",
                "train.max_steps=2", "train.batch_size=4", "train.logging_steps=1",
                # 8 new tokens, 2 batches (left padding in play) per model
                "eval.max_new_tokens=8", "eval.batch_size=3", "eval.samples=1",
                "eval.adapter_on_4bit=true",  # the report must hold the `trained` answers
                "eval.min_improvement=-1",  # a random model must pass the gate
                # a random model's near-tied logits flip greedy answers under bf16 rounding: check logits only
                "merge.min_answer_agreement=0",
                f"publish.hub_endpoint={hub.url}", f"publish.hub_repo={REPO}", "publish.push_merged=true",
                "publish.token_secret_block=no-such-block"])
            state = finetune(cfg, return_state=True)
            assert state.is_completed(), state
            out = state.result()
            assert out["publish"]["published"], out["publish"]
            local = tmp / "download"
            snapshot_download(REPO, endpoint=hub.url, token=FAKE_HF, local_dir=local)
            assert not hub.server_errors, hub.server_errors

    store = ArtifactStore(cfg.storage.url)

    def key(uri: str) -> str:
        return uri.split(f"{store_dir}/", 1)[1]

    files = {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*"))
             if p.is_file() and ".cache" not in p.relative_to(local).parts}
    return SimpleNamespace(cfg=cfg, out=out, store=store, key=key, local=local, files=files,
                           card=files["README.md"].read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def evaluated(pushed):
    """The held-out records and, per record, the answers the evaluate stage reported."""
    from slmforge.records import read_jsonl

    report = json.loads(pushed.files["report.json"].read_text(encoding="utf-8"))
    records = read_jsonl(pushed.store.get_dir(pushed.key(pushed.out["dataset"])) / "test.jsonl")
    assert len(records) >= 4
    answers = {name: [{i["id"]: i["answer"] for i in report["items"][name]}[r["id"]] for r in records]
               for name in ("trained", "published")}
    assert all(any(a for a in v) for v in answers.values()), answers  # something was generated
    return records, answers


def _runtime():
    """The card's code is the GPU path (device_map="auto", bf16 4-bit compute, the checkpoint's dtype);
    on a CPU the evaluation computed the 4-bit layers, and held the unquantized weights, in what
    slmforge's runtime decision says (float32), so the test loads them that way there."""
    from slmforge.runtime import decide

    return decide()


def test_the_hub_holds_the_stores_bytes(pushed):
    """What was downloaded is what the publish stage listed as pushed, and that is the adapter,
    the merged model and the evaluation report the store holds, byte for byte."""
    from slmforge.storage import MANIFEST

    store, key, files = pushed.store, pushed.key, pushed.files
    listed = json.loads((Path(store.get_dir(f"published/{pushed.out['publish']['content_hash']}"))
                         / "pushed_files.json").read_text())
    assert set(files) == set(listed) | {".gitattributes"}, sorted(set(files) ^ set(listed))
    for name, entry in listed.items():
        assert sha256_file(files[name]) == entry["sha256"], f"{name} on the Hub is not what publish pushed"
    # adapter_config.json is rewritten to name the card's base (its own test below)
    adapter = {e["path"]: e["sha256"] for e in store.manifest(key(pushed.out["adapter"]))["files"]
               if e["path"] not in ("README.md", "adapter_config.json")}
    merged = {f"merged/{e['path']}": e["sha256"] for e in store.manifest(key(pushed.out["merged"]))["files"]}
    report = {e["path"]: e["sha256"] for e in store.manifest(key(pushed.out["report"]))["files"]
              if e["path"] in ("report.json", "report.md")}
    assert "adapter_model.safetensors" in set(adapter) and "adapter_config.json" in files
    assert {"merged/model.safetensors", "merged/config.json"} <= set(merged) and len(report) == 2
    for name, sha in {**adapter, **merged, **report}.items():
        assert name in files, f"{name} was not pushed"
        assert sha256_file(files[name]) == sha, f"{name} on the Hub differs from the store's"
    assert MANIFEST not in files and f"merged/{MANIFEST}" not in files


def test_the_card_loads_the_adapter_on_the_4bit_base(pushed):
    """The card's "How to load" quantizes the base to 4-bit (what the adapter was trained and
    evaluated on) and names the merged/ folder."""
    code = _how_to_load(pushed.card)
    assert "BitsAndBytesConfig(load_in_4bit=True" in code and "quantization_config=quantization" in code, code
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in code, code
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}", subfolder="merged"' in code, code


def test_the_adapter_loaded_the_cards_way_answers_like_the_evaluated_trained_model(pushed, evaluated):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from slmforge import modeling as M

    records, answers = evaluated
    code = _how_to_load(pushed.card)
    base_ref = re.search(r'base = AutoModelForCausalLM\.from_pretrained\("([^"]+)", quantization_config', code)[1]
    quant_type = re.search(r'bnb_4bit_quant_type="(\w+)"', code)[1]
    double_quant = re.search(r"bnb_4bit_use_double_quant=(True|False)", code)[1] == "True"
    assert (base_ref, quant_type, double_quant) == (pushed.cfg.model.source, pushed.cfg.model.quant_type,
                                                    pushed.cfg.model.double_quant)
    rt = _runtime()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                      bnb_4bit_use_double_quant=double_quant,
                                      bnb_4bit_compute_dtype=rt.compute_torch_dtype)
    base = AutoModelForCausalLM.from_pretrained(base_ref, quantization_config=quantization,
                                                device_map=rt.device_map, dtype=rt.weights_torch_dtype)
    # bitsandbytes' packed AVX512-bf16 kernel (CPU only) computes a slightly different function; the
    # evaluation, like every slmforge stage, keeps the 4-bit layers off it (a no-op on a GPU)
    M.keep_4bit_unpacked(base)
    model = PeftModel.from_pretrained(base, str(pushed.local)).eval()  # the card: PeftModel.from_pretrained(base, repo)
    tokenizer = AutoTokenizer.from_pretrained(str(pushed.local))
    assert _answers(model, tokenizer, records, pushed.cfg.eval) == answers["trained"]


def test_the_merged_folder_answers_like_the_evaluated_published_model(pushed, evaluated):
    """The downloaded merged/ folder, loaded as a model folder, is the published model. (The card's
    own `subfolder="merged"` call is the next test.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records, answers = evaluated
    rt = _runtime()
    model = AutoModelForCausalLM.from_pretrained(str(pushed.local / "merged"), device_map=rt.device_map,
                                                 dtype=rt.weights_torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(pushed.local))
    assert _answers(model, tokenizer, records, pushed.cfg.eval) == answers["published"]


def test_the_cards_merged_snippet_loads_the_merged_model(pushed, evaluated):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records, answers = evaluated
    rt = _runtime()
    # the card's call, with this CPU's device map and dtype for its "auto"s
    assert 'subfolder="merged", adapter_kwargs={"subfolder": "merged"}' in pushed.card
    model = AutoModelForCausalLM.from_pretrained(str(pushed.local), subfolder="merged",
                                                 adapter_kwargs={"subfolder": "merged"}, device_map=rt.device_map,
                                                 dtype=rt.weights_torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(pushed.local))
    assert _answers(model, tokenizer, records, pushed.cfg.eval) == answers["published"]


def test_the_pushed_adapter_config_names_the_cards_base(pushed):
    config = json.loads(pushed.files["adapter_config.json"].read_text())
    code = _how_to_load(pushed.card)
    base_ref = re.search(r'base = AutoModelForCausalLM\.from_pretrained\("([^"]+)", quantization_config', code)[1]
    assert config["base_model_name_or_path"] == base_ref
