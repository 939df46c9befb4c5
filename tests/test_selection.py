"""slmforge.selection: catalog, offline compare_models, and the §9 flowchart in recommend()."""

from __future__ import annotations

import itertools
import socket
from types import SimpleNamespace

import pytest

from slmforge import memory as M
from slmforge import catalog
from slmforge import selection as S
from slmforge.catalog import compare_models, load_catalog
from slmforge.selection import format_recommendations, recommend

REQUIRED = {
    "id", "family", "model_type", "params", "num_hidden_layers", "hidden_size", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "vocab_size", "max_context", "tie_word_embeddings",
    "license", "languages", "use_cases", "korean",
}
USE_CASES = {"chat", "coding", "math", "multilingual", "edge", "function-calling"}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_catalog_entries_are_complete():
    cat = load_catalog()
    assert len(cat) >= 24
    assert len({e["id"] for e in cat}) == len(cat)
    for e in cat:
        assert REQUIRED <= set(e), (e["id"], REQUIRED - set(e))
        assert set(e["use_cases"]) <= USE_CASES, e["id"]
        assert e["korean"] == ("ko" in e["languages"]), e["id"]
        assert e["num_attention_heads"] % e["num_key_value_heads"] == 0, e["id"]
    families = {e["family"] for e in cat}
    assert {"Llama 3.2", "Qwen2.5", "Qwen2.5-Coder", "Qwen2.5-Math", "Gemma 2", "Phi-3", "Phi-4",
            "SmolLM2", "Mistral", "DeepSeek-R1-Distill-Qwen"} <= families


def test_catalog_default_path_is_repo_data():
    assert catalog.DEFAULT_CATALOG.name == "model_catalog.yaml"
    assert catalog.DEFAULT_CATALOG.parent.name == "data"
    assert catalog.DEFAULT_CATALOG.exists()


def test_compare_models_offline(no_network):
    ids = ["Qwen/Qwen2.5-3B-Instruct", "meta-llama/Llama-3.2-3B-Instruct", "microsoft/Phi-3-mini-4k-instruct"]
    rows = compare_models(ids)
    assert [r["model_id"] for r in rows] == ids
    qwen = rows[0]
    assert qwen["source"] == "catalog"
    assert (qwen["hidden_size"], qwen["num_hidden_layers"], qwen["num_attention_heads"], qwen["vocab_size"]) == (
        2048, 36, 16, 151936)
    assert qwen["license"] == "qwen-research" and qwen["downloads"] is None
    assert qwen["nf4_gb"] < qwen["int8_gb"] < qwen["bf16_gb"]
    assert "error" in compare_models(["nobody/not-a-model"])[0]
    assert "model" in catalog.format_comparison(rows)


def test_compare_models_hub_offline_falls_back(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    row = compare_models(["Qwen/Qwen2.5-0.5B-Instruct"], use_hub=True)[0]
    assert row["source"] == "catalog" and "hub_error" in row and row["hidden_size"] == 896


def test_compare_models_hub_path_uses_config_and_info(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    config = SimpleNamespace(model_type="llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                             num_attention_heads=4, num_key_value_heads=4, vocab_size=100,
                             tie_word_embeddings=True, head_dim=None, max_position_embeddings=1024)
    info = SimpleNamespace(downloads=1234, likes=5, card_data=SimpleNamespace(license="mit"), safetensors=None)
    monkeypatch.setattr(catalog, "_hub_lookup", lambda mid: (config, info, []))
    row = compare_models(["someone/tiny"], use_hub=True)[0]
    assert row["source"] == "hub" and row["downloads"] == 1234 and row["license"] == "mit"
    assert row["hidden_size"] == 64 and row["max_context"] == 1024


def test_recommend_8gb_coding_finetune_gives_qwen_coder(no_network):
    cands = recommend(8, "coding", finetune=True)
    assert cands, "expected at least one candidate"
    assert cands[0].family == "Qwen2.5-Coder"
    coder = [c for c in cands if c.family == "Qwen2.5-Coder"]
    assert coder and all(c.rank == 0 for c in coder)
    for c in cands:
        assert c.inference_gb <= 8 and c.training_gb is not None and c.training_gb <= 8
        assert c.method.startswith("QLoRA")
    assert "DeepSeek-Coder" in cands[0].why


def test_recommend_4gb_returns_only_small_models():
    cands = recommend(4, "general")
    assert cands
    assert all(c.params <= S.SMALL_MAX_PARAMS for c in cands)
    assert {c.family for c in cands} <= {"SmolLM2", "Qwen2.5", "Llama 3.2"}
    assert all(c.inference_gb <= 4 for c in cands)


@pytest.mark.parametrize(
    "memory_gb,use_case,finetune,korean",
    list(itertools.product([2, 4, 6, 8, 12, 16, 24, 48], ["general", "coding", "math", "multilingual", "edge",
                                                            "function-calling"], [False, True], [False, True])),
)
def test_every_candidate_fits(memory_gb, use_case, finetune, korean):
    cands = recommend(memory_gb, use_case, finetune=finetune, korean=korean, context=2048)
    # only QLoRA training on 4 GB or less can leave nothing (measured: 2 GB; 4 GB with Korean)
    assert cands or (finetune and memory_gb <= 4), "nothing recommended"
    for c in cands:
        assert c.inference_gb <= memory_gb
        assert (c.training_gb is not None) == finetune
        if finetune:
            assert c.training_gb <= memory_gb
        assert c.max_context >= 2048
        assert not korean or c.korean
        if memory_gb < 8:
            assert c.params <= S.SMALL_MAX_PARAMS


def test_estimates_are_recomputable():
    c = recommend(16, "multilingual")[0]
    entry = catalog.catalog_entry(c.model_id)
    inf = M.inference_bytes(M.ModelShape.from_catalog(entry), c.precision, 2048)
    assert c.inference_gb == pytest.approx(inf["total"] / M.GB + c.overhead_gb, abs=1e-3)


def test_precision_follows_flowchart():
    big = recommend(80, "general")
    assert big and all(c.precision == "bf16" for c in big)
    assert all(c.precision == "nf4" for c in recommend(80, "general", quantization="memory"))
    assert {c.precision for c in recommend(16, "math")} > {"bf16"}  # 14B models need quantization at 16 GB
    assert all(c.precision == "int8" for c in recommend(24, "general", quantization="int8"))


def test_context_filters_short_context_models():
    ids = {c.model_id for c in recommend(40, "math", context=8192)}
    assert "Qwen/Qwen2.5-Math-7B-Instruct" not in ids
    assert "Qwen/Qwen2.5-Math-7B-Instruct" in {c.model_id for c in recommend(40, "math", context=2048)}


def test_korean_restricts_to_models_listing_korean():
    cands = recommend(24, "multilingual", korean=True)
    assert cands and all(c.korean for c in cands)
    assert all("Korean" in c.why for c in cands)


def test_sorting_rank_then_size():
    cands = recommend(24, "math")
    keys = [(c.rank, -c.params) for c in cands]
    assert keys == sorted(keys)


def test_use_case_aliases():
    assert [c.model_id for c in recommend(16, "reasoning")] == [c.model_id for c in recommend(16, "math")]
    with pytest.raises(ValueError):
        recommend(16, "poetry")


def test_format_recommendations():
    cands = recommend(8, "coding", finetune=True)
    text = format_recommendations(cands, 8, "coding")
    assert "Qwen/Qwen2.5-Coder-1.5B-Instruct" in text and "QLoRA GB" in text and "1." in text
    assert "none" in format_recommendations(recommend(0.2, "general"), 0.2, "general")


def test_flowchart_models_that_do_not_fit_are_named_with_their_estimate():
    left_out: list[str] = []
    cands = recommend(8, "coding", finetune=True, left_out=left_out)
    assert [line.split(":")[0] for line in left_out] == ["Qwen/Qwen2.5-Coder-7B-Instruct"]
    assert "QLoRA" in left_out[0] and "GB" in left_out[0]
    assert "Left out for memory:\n- Qwen/Qwen2.5-Coder-7B-Instruct" in format_recommendations(
        cands, 8, "coding", left_out=left_out)
    tiny: list[str] = []
    recommend(0.2, "general", left_out=tiny)
    assert tiny and all("even in nf4" in line for line in tiny)
    roomy: list[str] = []
    assert recommend(80, "coding", left_out=roomy) and roomy == []


@pytest.mark.parametrize("kw, field", [({"memory_gb": -1}, "memory_gb"), ({"memory_gb": 0}, "memory_gb"),
                                       ({"memory_gb": 8, "context": 0}, "context")])
def test_recommend_rejects_impossible_settings_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        recommend(**kw)
