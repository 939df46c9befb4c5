"""slmforge.memory: the estimator against the tutorial's table, the catalog's published counts
and measured footprints of tiny random models (fp32, bf16, and bitsandbytes int8/nf4 on CPU)."""

from __future__ import annotations

import pytest

from slmforge import memory as M
from slmforge.memory import GB, ModelShape
from slmforge.catalog import load_catalog

SHAPE_FIELDS = {
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "params",
}


# --------------------------------------------------------------------------- tutorial table


def _tolerance(printed: str) -> float:
    """Half a unit of the printed value's last digit: "0.5" → 0.05, "14" → 0.5."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return 0.5 * 10 ** -decimals


def test_tutorial_table_reproduced_within_rounding():
    table = M.tutorial_table()
    for size, cols in M.TUTORIAL_TABLE.items():
        for prec, printed in cols.items():
            est = table[size][prec]
            assert abs(est - float(printed)) <= _tolerance(printed) + 1e-9, (size, prec, est, printed)


def test_tutorial_table_is_computed_not_copied():
    table = M.tutorial_table()
    # fp16 is exactly 2 B/param; quantized rows carry their constants on top of 1 / 0.5 B/param
    assert table["7B"]["fp16"] == pytest.approx(14.0)
    assert table["7B"]["int8"] > 7.0
    assert table["7B"]["nf4"] == pytest.approx(3.5 * (1 + 1 / 32 + 1 / 2048))
    # without double quant the fp32 absmax costs 4 B per 64 weights
    assert M.tutorial_table(double_quant=False)["7B"]["nf4"] == pytest.approx(3.5 * 1.125)


def test_llama2_shapes_explain_the_4bit_overhead():
    """The table's "~4"/"~7" for 7B/13B: Llama-2 shapes keep their embeddings in 16 bit."""
    l7 = ModelShape(32, 4096, 11008, 32, 32, 32000, tie_word_embeddings=False)
    l13 = ModelShape(40, 5120, 13824, 40, 40, 32000, tie_word_embeddings=False)
    assert round(M.weight_bytes(l7, "nf4") / GB) == 4
    assert round(M.weight_bytes(l13, "nf4") / GB) == 7
    assert round(M.weight_bytes(l7, "fp16") / GB) == 13  # 6.74 B params, printed as "7B"


# --------------------------------------------------------------------------- parameter counts


def test_param_count_matches_published_catalog_counts():
    checked = 0
    for entry in load_catalog():
        if SHAPE_FIELDS & set(entry.get("unsure", [])):
            continue
        shape = ModelShape.from_catalog(entry)
        published = M.parse_param_count(entry["params"])
        assert abs(shape.param_count() - published) / published <= 0.03, (entry["id"], shape.param_count())
        checked += 1
    assert checked >= 20


def _tiny_configs():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return [
        LlamaConfig(**common, tie_word_embeddings=True),
        LlamaConfig(**common, attention_bias=True, mlp_bias=True),
        Qwen2Config(**common, tie_word_embeddings=False),
        MistralConfig(**common),
        Phi3Config(**common),
        Gemma2Config(**{**common, "head_dim": 32}),
    ]


@pytest.mark.parametrize("idx", range(6))
def test_param_count_equals_transformers(idx):
    import torch
    from transformers import AutoModelForCausalLM

    config = _tiny_configs()[idx]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = model.num_parameters()
    assert ModelShape.from_config(config).param_count() == n, config.model_type
    assert ModelShape.from_config(config.to_dict()).param_count() == n


def test_parse_param_count():
    assert M.parse_param_count("1.24B") == 1_240_000_000
    assert M.parse_param_count("135M") == 135_000_000
    assert M.parse_param_count(7.6e9) == 7_600_000_000
    assert M.parse_param_count(None) is None
    with pytest.raises(ValueError):
        M.parse_param_count("lots")


# --------------------------------------------------------------------------- measured footprints


def _tiny(kind: str):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    return cls(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_estimate_matches_measured_footprint(kind, precision):
    import torch
    from transformers import AutoModelForCausalLM

    config = _tiny(kind)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    measured = model.get_memory_footprint()
    est = M.weight_bytes(ModelShape.from_config(config), precision)
    assert abs(est - measured) / measured <= 0.10, (est, measured)


def _quant_state_bytes(model) -> int:
    """Bytes bitsandbytes keeps outside parameters(): int8 row scales, 4-bit absmax/code tables."""
    total = 0
    for p in model.parameters():
        scb = getattr(p, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
        qs = getattr(p, "quant_state", None)
        while qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                if t is not None:
                    total += t.numel() * t.element_size()
            qs = getattr(qs, "state2", None)
    return total


@pytest.fixture(scope="module")
def saved_tiny_llama(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    config = _tiny("llama")
    path = tmp_path_factory.mktemp("tiny_llama")
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    return config, path


@pytest.mark.parametrize("precision,double_quant", [("int8", True), ("nf4", True), ("nf4", False)])
def test_estimate_matches_bitsandbytes_on_cpu(saved_tiny_llama, precision, double_quant):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config, path = saved_tiny_llama
    if precision == "int8":
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=double_quant)
    # bitsandbytes loads on CPU (make installs it): a failure here is a failure, not a skip
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu", dtype=torch.bfloat16)
    shape = ModelShape.from_config(config)
    footprint = model.get_memory_footprint()
    measured = footprint + _quant_state_bytes(model)
    est = M.weight_bytes(shape, precision, double_quant=double_quant)
    assert abs(est - measured) / measured <= 0.10, (est, measured)
    # what get_memory_footprint() itself reports: the same layout without the constants
    est_fp = M.weight_bytes(shape, precision, double_quant=double_quant, include_quant_state=False)
    assert abs(est_fp - footprint) / footprint <= 0.10, (est_fp, footprint)


def test_kv_cache_matches_dynamic_cache():
    import torch
    from transformers import AutoModelForCausalLM

    config = _tiny("llama")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(torch.randint(3, 1000, (2, 24)), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    measured = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert M.kv_cache_bytes(ModelShape.from_config(config), seq_len=24, batch_size=2) == measured


# --------------------------------------------------------------------------- LoRA / QLoRA


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_lora_params_match_peft(kind):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Phi3Config

    config = _tiny("llama") if kind == "llama" else Phi3Config(
        hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert M.lora_params(ModelShape.from_config(config), r=16) == trainable


def test_lora_params_tutorial_example():
    # README: a Qwen2.5-3B-shaped model has ~30 M trainable parameters with r=16 all-linear
    entry = next(e for e in load_catalog() if e["id"] == "Qwen/Qwen2.5-3B-Instruct")
    assert M.lora_params(ModelShape.from_catalog(entry), r=16) == pytest.approx(30e6, rel=0.02)
    assert M.lora_params(ModelShape.from_catalog(entry), r=16, target_modules=["q_proj", "v_proj"]) < 5e6


def test_qlora_breakdown_is_consistent():
    entry = next(e for e in load_catalog() if e["id"] == "Qwen/Qwen2.5-3B-Instruct")
    shape = ModelShape.from_catalog(entry)
    q = M.qlora_training_bytes(shape)
    n = q["lora_params"]
    assert q["adapter_weights"] == q["adapter_grads"] == 4 * n and q["optimizer_states"] == 8 * n
    # prepare_model_for_kbit_training leaves embeddings/norms in fp32
    assert q["base_weights"] == M.weight_bytes(shape, "nf4", other_dtype="fp32")
    assert M.qlora_training_bytes(shape, frozen_dtype="bf16")["base_weights"] == M.weight_bytes(shape, "nf4")
    bf16 = M.qlora_training_bytes(shape, adapter_dtype="bf16")
    assert bf16["adapter_weights"] + bf16["adapter_grads"] + bf16["optimizer_states"] == 8 * n
    assert M.qlora_training_bytes(shape, full_logits=False)["logits"] == 0
    parts = sum(v for k, v in q.items() if k not in ("total", "lora_params"))
    assert q["total"] == pytest.approx(parts)
    no_ckpt = M.qlora_training_bytes(shape, gradient_checkpointing=False)
    assert no_ckpt["activations"] > 5 * q["activations"]
    assert M.lora_training_bytes(shape, base_precision="bf16")["total"] > q["total"]
    # logits term: batch 4 × 512 tokens × vocab × 10 B
    assert q["logits"] == 4 * 512 * shape.vocab_size * M.LOGIT_BYTES


def test_precision_aliases_and_order():
    assert M.normalize_precision("4bit") == "nf4" and M.normalize_precision("float16") == "fp16"
    with pytest.raises(ValueError):
        M.normalize_precision("int3")
    entry = next(e for e in load_catalog() if e["id"] == "Qwen/Qwen2.5-7B-Instruct")
    s = ModelShape.from_catalog(entry)
    sizes = [M.weight_bytes(s, p) for p in ("fp32", "bf16", "int8", "nf4")]
    assert sizes == sorted(sizes, reverse=True)
    assert M.weight_bytes(s, "nf4", double_quant=False) > M.weight_bytes(s, "nf4")


@pytest.mark.parametrize("adapter_dtype", ["fp32", "bf16"])
def test_activation_formula_against_saved_tensors(adapter_dtype):
    """The per-layer coefficients, checked on a shape they were not fitted on (±20 %)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    def saved_per_token(layers: int) -> float:
        config = LlamaConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=layers,
                             num_attention_heads=6, num_key_value_heads=2, vocab_size=500,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16),
                               LoraConfig(r=16, lora_dropout=0.05, target_modules="all-linear",
                                          task_type="CAUSAL_LM"))
        if adapter_dtype == "bf16":
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        model.train()
        params = {p.data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            if t.data_ptr() not in params:
                seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        x = torch.randint(3, 500, (2, 64))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=x, labels=x)
        return sum(seen.values()) / x.numel(), config

    one, _ = saved_per_token(1)
    two, config = saved_per_token(2)
    shape = ModelShape.from_config(config)
    est = M.activation_bytes(shape, 64, 2, gradient_checkpointing=False, adapter_dtype=adapter_dtype,
                             full_logits=False)["layers"] / shape.num_hidden_layers / 128
    assert abs(est - (two - one)) / (two - one) <= 0.20, (est, two - one)
