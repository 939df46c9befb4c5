"""The shape of a decoder-only LLM (layers, widths, heads, vocabulary, tying), read from its
config, a catalog entry or given by hand: what the memory estimates in `slmforge.memory` count.
Pure Python: no torch import."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping


def parse_param_count(value: Any) -> int | None:
    """Parse a published count: ``"1.24B"``, ``"135M"``, ``7.6e9`` or an int."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMBT]?)\s*", str(value), re.I)
    if not m:
        raise ValueError(f"cannot parse parameter count {value!r}")
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2).upper()]
    return int(round(float(m.group(1)) * scale))


@dataclass(frozen=True)
class ModelShape:
    """The tensor shapes that decide memory; build with :meth:`from_catalog` or :meth:`from_config`.

    ``qkv_bias`` (Qwen2), ``o_bias``/``mlp_bias`` (Llama's ``attention_bias``/``mlp_bias``),
    ``norms_per_layer`` (4 for Gemma 2), ``qk_norm`` (Qwen3) and ``fused_qkv``/``fused_gate_up``
    (Phi-3/4: one Linear instead of three/two, which changes LoRA size but not the count) are
    the per-family differences that matter for counting.
    """

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    model_type: str = "llama"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2
    fused_qkv: bool = False
    fused_gate_up: bool = False
    published_params: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    # -- constructors -------------------------------------------------------------------
    @staticmethod
    def _family_defaults(model_type: str) -> dict[str, Any]:
        mt = (model_type or "llama").lower()
        if mt == "qwen2":
            return {"qkv_bias": True}
        if mt == "qwen3":
            return {"qk_norm": True}
        if mt in ("gemma2", "gemma3_text", "gemma3"):
            return {"norms_per_layer": 4, "qk_norm": mt != "gemma2"}
        if mt in ("phi3", "phi4"):
            return {"fused_qkv": True, "fused_gate_up": True}
        return {}

    @classmethod
    def from_catalog(cls, entry: Mapping[str, Any]) -> "ModelShape":
        """From a ``data/model_catalog.yaml`` entry (keys as in config.json, plus ``params``)."""
        mt = entry.get("model_type", "llama")
        kw = cls._family_defaults(mt)
        return cls(
            num_hidden_layers=int(entry["num_hidden_layers"]),
            hidden_size=int(entry["hidden_size"]),
            intermediate_size=int(entry["intermediate_size"]),
            num_attention_heads=int(entry["num_attention_heads"]),
            num_key_value_heads=int(entry.get("num_key_value_heads") or entry["num_attention_heads"]),
            vocab_size=int(entry["vocab_size"]),
            tie_word_embeddings=bool(entry.get("tie_word_embeddings", False)),
            head_dim=entry.get("head_dim"),
            model_type=mt,
            published_params=parse_param_count(entry.get("params")),
            name=entry.get("id", ""),
            **kw,
        )

    @classmethod
    def from_config(cls, config: Any, published_params: Any = None, name: str = "") -> "ModelShape":
        """From a ``transformers`` config object or a config.json dict.

        Multimodal configs with a ``text_config`` use the text decoder. Missing
        ``tie_word_embeddings`` defaults to False (the llama/qwen2/mistral/phi3 config default).
        """
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        text = get("text_config")
        if text is not None:
            return cls.from_config(text, published_params, name)
        mt = get("model_type") or "llama"
        kw = cls._family_defaults(mt)
        if get("attention_bias"):  # llama-style: bias on q, k, v and o
            kw.update(qkv_bias=True, o_bias=True)
        if get("mlp_bias"):
            kw["mlp_bias"] = True
        heads = int(get("num_attention_heads"))
        return cls(
            num_hidden_layers=int(get("num_hidden_layers")),
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads") or heads),
            vocab_size=int(get("vocab_size")),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            head_dim=get("head_dim"),
            model_type=mt,
            published_params=parse_param_count(published_params),
            name=name or get("_name_or_path") or "",
            **kw,
        )

    # -- derived sizes ------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_modules(self) -> list[tuple[str, int, int]]:
        """``(name, in_features, out_features)`` of the Linear layers in ONE decoder layer.

        These are what bitsandbytes quantizes and what PEFT's ``"all-linear"`` adapts.
        """
        h, i = self.hidden_size, self.intermediate_size
        attn = (
            [("qkv_proj", h, self.q_dim + 2 * self.kv_dim)]
            if self.fused_qkv
            else [("q_proj", h, self.q_dim), ("k_proj", h, self.kv_dim), ("v_proj", h, self.kv_dim)]
        )
        attn.append(("o_proj", self.q_dim, h))
        mlp = [("gate_up_proj", h, 2 * i)] if self.fused_gate_up else [("gate_proj", h, i), ("up_proj", h, i)]
        mlp.append(("down_proj", i, h))
        return attn + mlp

    def param_breakdown(self) -> dict[str, int]:
        """Parameter counts by role; ``total`` is what ``model.num_parameters()`` reports.

        ``linear`` = decoder Linear weights (quantized by bitsandbytes); ``linear_rows`` = their
        summed out_features (int8 keeps one scale per row); ``other16`` = everything that stays
        in the 16-bit dtype when quantized (embeddings, untied lm_head, norms, biases).
        """
        L, h = self.num_hidden_layers, self.hidden_size
        mods = self.linear_modules()
        linear = L * sum(fi * fo for _, fi, fo in mods)
        rows = L * sum(fo for _, _, fo in mods)
        bias = 0
        if self.qkv_bias:
            bias += self.q_dim + 2 * self.kv_dim
        if self.o_bias:
            bias += h
        if self.mlp_bias:
            bias += 2 * self.intermediate_size + h
        bias *= L
        norms = L * self.norms_per_layer * h + h + (L * 2 * self.head_dim if self.qk_norm else 0)
        embed = self.vocab_size * h
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * h
        total = linear + bias + norms + embed + lm_head
        return {
            "total": total,
            "linear": linear,
            "linear_rows": rows,
            "linear_modules": L * len(mods),
            "bias": bias,
            "norms": norms,
            "embed": embed,
            "lm_head": lm_head,
            "other16": bias + norms + embed + lm_head,
        }

    def param_count(self) -> int:
        """Parameters computed from the shape (tied embeddings counted once)."""
        return self.param_breakdown()["total"]

    @property
    def params(self) -> int:
        """Published count when given, else the count computed from the shape."""
        return self.published_params or self.param_count()
