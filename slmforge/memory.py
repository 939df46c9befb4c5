"""Memory estimates for decoder-only LLMs, computed from the architecture.

Why: the tutorial's selection guide (§9) answers "will it fit?" from a rule of thumb
(1B ≈ 2 GB in fp16). Counting tensors from the config instead tells where the rule holds
(large models) and where it does not (small models, whose 16-bit embeddings are a big share
of the weights under 4-bit quantization).

All sizes are bytes; ``GB`` is 1e9 bytes, the unit of ``get_memory_footprint() / 1e9`` in
the tutorial. Supported layouts: llama / mistral / qwen2 / qwen3 / gemma2 / phi3 style
decoders (RMSNorm, gated MLP, grouped-query attention). Pure Python: no torch import.
"""

from __future__ import annotations

import math
from typing import Any

from slmforge.model_shape import ModelShape, parse_param_count

GB = 1e9

#: bitsandbytes 4-bit layout (``bnb.functional.quantize_4bit``): one absmax per 64 weights;
#: with double quant the absmaxes are 8-bit, with one fp32 absmax per 256 of them.
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
#: per quantized Linear constants: 16-entry fp32 quant map, and with double quant a 256-entry
#: fp32 nested quant map plus an fp32 offset.
NF4_QUANT_MAP_BYTES = 16 * 4
NF4_NESTED_CONST_BYTES = 256 * 4 + 4

_DTYPE_BYTES = {
    "fp32": 4, "float32": 4, "float": 4,
    "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2,
    "int8": 1, "8bit": 1, "8-bit": 1, "llm.int8": 1,
    "nf4": 0.5, "fp4": 0.5, "4bit": 0.5, "4-bit": 0.5, "int4": 0.5,
}
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "nf4")


def normalize_precision(precision: str) -> str:
    """Map aliases (``float16``, ``8bit``, ``4-bit``, ``int4`` ...) to fp32/bf16/fp16/int8/nf4."""
    p = str(precision).lower().replace("torch.", "")
    if p not in _DTYPE_BYTES:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    if p in ("fp32", "float32", "float"):
        return "fp32"
    if p in ("bf16", "bfloat16"):
        return "bf16"
    if p in ("fp16", "float16", "half"):
        return "fp16"
    if p in ("int8", "8bit", "8-bit", "llm.int8"):
        return "int8"
    return "nf4"


def dtype_bytes(precision: str) -> float:
    """Bytes per element of a precision name (nf4 → 0.5)."""
    return _DTYPE_BYTES[normalize_precision(precision)]


# --------------------------------------------------------------------------- weights


def weight_bytes(
    shape: ModelShape,
    precision: str = "bf16",
    *,
    double_quant: bool = True,
    other_dtype: str = "bf16",
    include_quant_state: bool = True,
) -> float:
    """Bytes of the model's weights as loaded at ``precision``.

    * fp32 / bf16 / fp16: every parameter at that width.
    * int8 (bitsandbytes LLM.int8): decoder Linear weights 1 byte + one fp32 scale per output
      row (``Int8Params.SCB``); embeddings, lm_head (skipped by transformers), norms and biases
      stay in ``other_dtype``.
    * nf4: decoder Linear weights 0.5 byte + per 64-weight block one fp32 absmax, or with
      ``double_quant`` one uint8 absmax plus one fp32 per 256 blocks, plus a few small
      per-layer code tables; the rest stays in ``other_dtype``.

    ``include_quant_state=False`` drops the scales/absmaxes, which is what
    ``get_memory_footprint()`` counts (bitsandbytes keeps them outside ``parameters()``).
    """
    p = normalize_precision(precision)
    b = shape.param_breakdown()
    if p in ("fp32", "bf16", "fp16"):
        return b["total"] * dtype_bytes(p)
    other = b["other16"] * dtype_bytes(other_dtype)
    if p == "int8":
        state = b["linear_rows"] * 4 if include_quant_state else 0
        return b["linear"] * 1 + state + other
    # nf4 / fp4, per module so block rounding is exact
    packed = 0
    state = 0.0
    for _, fi, fo in shape.linear_modules():
        n = fi * fo
        packed += math.ceil(n / 2)
        blocks = math.ceil(n / NF4_BLOCKSIZE)
        if double_quant:
            state += blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCKSIZE) + NF4_NESTED_CONST_BYTES
        else:
            state += 4 * blocks
        state += NF4_QUANT_MAP_BYTES
    L = shape.num_hidden_layers
    return L * packed + (L * state if include_quant_state else 0) + other


def kv_cache_bytes(shape: ModelShape, seq_len: int, batch_size: int = 1, dtype: str = "bf16") -> float:
    """KV cache: 2 (K and V) × layers × kv_heads × head_dim × seq × batch × bytes.

    Upper bound for sliding-window layers (Gemma 2 caps half its layers at 4096 tokens).
    """
    return (
        2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim
        * seq_len * batch_size * dtype_bytes(dtype)
    )


def inference_bytes(
    shape: ModelShape, precision: str = "bf16", context: int = 2048, batch_size: int = 1, **kw: Any
) -> dict[str, float]:
    """Weights at ``precision`` + bf16 KV cache for ``context`` tokens; activations ignored
    (at batch 1 generation only the last position's logits are kept)."""
    w = weight_bytes(shape, precision, **kw)
    kv = kv_cache_bytes(shape, context, batch_size)
    return {"weights": w, "kv_cache": kv, "total": w + kv}


# --------------------------------------------------------------------------- LoRA / QLoRA


def lora_params(shape: ModelShape, r: int = 16, target_modules: str | list[str] = "all-linear") -> int:
    """LoRA adapter parameters: r × (in + out) for each adapted Linear, over all layers.

    ``"all-linear"`` is PEFT's: every decoder Linear, not lm_head. A list selects by name
    (``q_proj`` ... or Phi's fused ``qkv_proj``/``gate_up_proj``).
    """
    mods = shape.linear_modules()
    if target_modules != "all-linear":
        wanted = set(target_modules)
        mods = [m for m in mods if m[0] in wanted]
    return shape.num_hidden_layers * sum(r * (fi + fo) for _, fi, fo in mods)


#: Bytes kept for backward per token in ONE decoder layer with LoRA on all its Linears:
#: ``h·h_coef + i·i_coef + r·r_coef``. Measured (torch saved-tensor hooks, llama-style bf16 layer,
#: PEFT LoRA with dropout, SDPA, no autocast, transformers 5 / peft 0.21) by fitting layer
#: increments over several (h, i): fp32 adapters keep fp32 copies of each adapted input (PEFT
#: casts x to the adapter dtype before dropout), bf16 adapters keep bf16 ones.
ACT_COEFS = {"fp32": (62, 14, 30), "bf16": (38, 10, 16)}
#: bytes per logit element when the full logits are built: bf16 logits (returned in the output)
#: + fp32 log-softmax kept for backward + its fp32 gradient. Dominant for 150k–256k vocabularies.
LOGIT_BYTES = 2 + 4 + 4


def activation_bytes(
    shape: ModelShape,
    seq_len: int = 512,
    batch_size: int = 4,
    gradient_checkpointing: bool = True,
    *,
    r: int = 16,
    adapter_dtype: str = "fp32",
    hidden_dtype: str = "bf16",
    full_logits: bool = True,
) -> dict[str, float]:
    """Rough LoRA training activations per micro-batch.

    * no checkpointing: every layer keeps ``ACT_COEFS`` bytes per token;
    * checkpointing: each layer keeps only its input (``h`` in ``hidden_dtype``) and one layer's
      set is rebuilt at a time during backward;
    * logits: ``vocab × 10`` bytes per token when the loss is taken on full logits (transformers'
      own loss; slmforge's label-smoothed loss); 0 with trl ≥ 1 SFTTrainer's chunked LM head, which
      scores tiles of the vocabulary and never builds them (with or without Liger).

    Not validated against GPU peaks here: autocast, kernels and the allocator move it; read it as
    the size of the term, not a guarantee.
    """
    tokens = seq_len * batch_size
    ch, ci, cr = ACT_COEFS["fp32" if dtype_bytes(adapter_dtype) == 4 else "bf16"]
    per_layer = (ch * shape.hidden_size + ci * shape.intermediate_size + cr * r) * tokens
    L = shape.num_hidden_layers
    if gradient_checkpointing:
        layers = L * shape.hidden_size * dtype_bytes(hidden_dtype) * tokens + per_layer
    else:
        layers = L * per_layer
    logits = shape.vocab_size * LOGIT_BYTES * tokens if full_logits else 0
    return {"layers": layers, "logits": logits, "total": layers + logits}


def lora_training_bytes(
    shape: ModelShape,
    *,
    base_precision: str = "nf4",
    r: int = 16,
    target_modules: str | list[str] = "all-linear",
    seq_len: int = 512,
    batch_size: int = 4,
    gradient_checkpointing: bool = True,
    double_quant: bool = True,
    adapter_dtype: str = "fp32",
    frozen_dtype: str = "fp32",
    full_logits: bool = True,
) -> dict[str, float]:
    """(Q)LoRA training memory: frozen base + adapters + AdamW + activations (+ logits).

    * base: ``weight_bytes(base_precision)``; for a quantized base the non-quantized parameters
      (embeddings, lm_head, norms) are in ``frozen_dtype`` — fp32 by default because peft's
      ``prepare_model_for_kbit_training`` (called by ``slmforge.training``) upcasts them.
    * adapters: weight + grad + two AdamW moments, all in ``adapter_dtype``: 16 B/param in fp32
      (peft's default ``autocast_adapter_dtype=True``), 8 B/param in bf16 (what trl ≥ 1
      SFTTrainer casts them to on a quantized base).
    * activations and logits: :func:`activation_bytes`; ``full_logits=False`` for a fused loss.
    * dequant buffer: a 4/8-bit base dequantizes one Linear at a time to bf16.

    CUDA context and allocator slack are not included. The defaults are the conservative side
    of each choice, so "fits" errs towards yes-it-really-fits.
    """
    base = weight_bytes(shape, base_precision, double_quant=double_quant, other_dtype=frozen_dtype)
    n = lora_params(shape, r, target_modules)
    a = dtype_bytes(adapter_dtype)
    quantized = normalize_precision(base_precision) in ("int8", "nf4")
    hidden = frozen_dtype if quantized else base_precision
    act = activation_bytes(shape, seq_len, batch_size, gradient_checkpointing, r=r,
                           adapter_dtype=adapter_dtype, hidden_dtype=hidden, full_logits=full_logits)
    dequant = max(fi * fo for _, fi, fo in shape.linear_modules()) * 2 if quantized else 0
    out = {
        "base_weights": base,
        "lora_params": n,
        "adapter_weights": a * n,
        "adapter_grads": a * n,
        "optimizer_states": 2 * a * n,
        "activations": act["layers"],
        "logits": act["logits"],
        "dequant_buffer": dequant,
    }
    out["total"] = sum(v for k, v in out.items() if k != "lora_params")
    return out


def qlora_training_bytes(shape: ModelShape, **kw: Any) -> dict[str, float]:
    """The tutorial's QLoRA recipe (NF4 + double quant base, r=16 all-linear, AdamW, gradient
    checkpointing, seq 512, batch 4); keyword arguments override."""
    return lora_training_bytes(shape, **{"base_precision": "nf4", **kw})


# --------------------------------------------------------------------------- tutorial table

#: §9 of the tutorial: parameter count → GB at fp16 / 8-bit / 4-bit, as printed.
TUTORIAL_TABLE: dict[str, dict[str, str]] = {
    "1B": {"fp16": "2", "int8": "1", "nf4": "0.5"},
    "3B": {"fp16": "6", "int8": "3", "nf4": "1.5"},
    "7B": {"fp16": "14", "int8": "7", "nf4": "4"},
    "13B": {"fp16": "26", "int8": "13", "nf4": "7"},
}
#: row length assumed for int8's per-row fp32 scale in the naive estimate (a 4096-wide model).
NAIVE_ROW = 4096


def naive_weight_bytes(params: int, precision: str, double_quant: bool = True) -> float:
    """Rule-of-thumb weights from a bare parameter count: bytes/param (4, 2, 1, 0.5) plus the
    quantization constants bitsandbytes adds, treating every parameter as quantized.

    Overheads: int8 one fp32 scale per 4096-weight row (+0.1 %); nf4 the absmaxes, with double
    quant 1 byte per 64 weights + 4 bytes per 16384 (+3.2 %: 7B → 3.61 GB, 13B → 6.70 GB,
    printed "~4" and "~7"), without it 4 bytes per 64 (+12.5 %). 16-bit embeddings are NOT
    modelled here: the table's 1B and 3B rows (0.5, 1.5) leave no room for them (Llama 3.2 1B
    is 1.03 GB in nf4 by :func:`weight_bytes`). For real models use :func:`weight_bytes`:
    Llama-2-7B/13B shapes give 3.87/7.20 GB in nf4, the table's "~4"/"~7", because their
    262 M/328 M embedding parameters stay 16-bit.
    """
    p = normalize_precision(precision)
    if p in ("fp32", "bf16", "fp16"):
        return params * dtype_bytes(p)
    if p == "int8":
        return params + 4 * params / NAIVE_ROW
    blocks = params / NF4_BLOCKSIZE
    consts = blocks + 4 * blocks / NF4_NESTED_BLOCKSIZE if double_quant else 4 * blocks
    return params * 0.5 + consts


def tutorial_table(double_quant: bool = True) -> dict[str, dict[str, float]]:
    """The §9 memory table recomputed: ``{"1B": {"fp16": GB, "int8": GB, "nf4": GB}, ...}``."""
    return {
        size: {p: naive_weight_bytes(parse_param_count(size), p, double_quant) / GB for p in cols}
        for size, cols in TUTORIAL_TABLE.items()
    }


def format_bytes(n: float | None) -> str:
    """``1.234 GB`` style, GB = 1e9."""
    return "-" if n is None else f"{n / GB:.2f} GB"


__all__ = [
    "GB",
    "PRECISIONS",
    "ModelShape",
    "normalize_precision",
    "dtype_bytes",
    "parse_param_count",
    "weight_bytes",
    "kv_cache_bytes",
    "inference_bytes",
    "lora_params",
    "activation_bytes",
    "lora_training_bytes",
    "qlora_training_bytes",
    "naive_weight_bytes",
    "tutorial_table",
    "TUTORIAL_TABLE",
    "format_bytes",
]
