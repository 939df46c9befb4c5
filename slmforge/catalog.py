"""The model catalog (`data/model_catalog.yaml`) and the tutorial's comparison of it (§2.3):
parameters, context and the memory each precision needs, from the architecture, offline; the Hub
is read only when `compare_models(..., use_hub=True)` asks for it."""

from __future__ import annotations

import copy
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from slmforge.memory import GB, kv_cache_bytes, qlora_training_bytes, weight_bytes
from slmforge.model_shape import ModelShape

#: repo's data/model_catalog.yaml (this file's parent's parent).
DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "data" / "model_catalog.yaml"

#: QLoRA recipe used for the training estimate (tutorial §5.3); the rest of
#: :func:`slmforge.memory.lora_training_bytes`'s defaults are its conservative ones (fp32
#: adapters, fp32 non-quantized params after prepare_model_for_kbit_training, full logits).
QLORA_RECIPE = {"r": 16, "seq_len": 512, "batch_size": 4, "gradient_checkpointing": True}

USE_CASE_ALIASES = {
    "general": "general", "chat": "general", "general_chat": "general", "general-chat": "general",
    "coding": "coding", "code": "coding", "coder": "coding",
    "math": "math", "reasoning": "math", "math/reasoning": "math", "math-reasoning": "math",
    "multilingual": "multilingual", "multi-lingual": "multilingual", "translation": "multilingual",
    "edge": "edge", "mobile": "edge", "on-device": "edge",
    "function-calling": "function-calling", "function_calling": "function-calling",
    "function calling": "function-calling", "tools": "function-calling", "tool-use": "function-calling",
}


def fmt_params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def fmt_float(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain columns for a terminal, padded to the widest cell."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda cells: "  ".join(str(x).ljust(w) for x, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# --------------------------------------------------------------------------- catalog


@lru_cache(maxsize=8)
def _load(path: str) -> tuple[dict[str, Any], ...]:
    import yaml

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    return tuple(data["models"])


def load_catalog(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Catalog entries (dicts as in the YAML); default ``data/model_catalog.yaml`` of the repo."""
    return copy.deepcopy(list(_load(str(Path(path or DEFAULT_CATALOG).resolve()))))


def catalog_entry(model_id: str, catalog: Iterable[Mapping[str, Any]] | None = None) -> dict[str, Any] | None:
    """The entry for ``model_id`` (case-insensitive), or None."""
    for e in catalog if catalog is not None else load_catalog():
        if e["id"].lower() == model_id.lower():
            return dict(e)
    return None


def normalize_use_case(use_case: str) -> str:
    key = str(use_case).strip().lower()
    if key not in USE_CASE_ALIASES:
        raise ValueError(f"unknown use case {use_case!r}; use one of {sorted(set(USE_CASE_ALIASES.values()))}")
    return USE_CASE_ALIASES[key]


# --------------------------------------------------------------------------- compare


def _estimates(shape: ModelShape, context: int) -> dict[str, float]:
    return {
        "bf16_gb": weight_bytes(shape, "bf16") / GB,
        "int8_gb": weight_bytes(shape, "int8") / GB,
        "nf4_gb": weight_bytes(shape, "nf4") / GB,
        "kv_cache_gb": kv_cache_bytes(shape, context) / GB,
        "qlora_gb": qlora_training_bytes(shape, **QLORA_RECIPE)["total"] / GB,
    }


def _hub_lookup(model_id: str) -> tuple[Any, Any, list[str]]:
    """(config, model_info, errors) from the Hub; either may be None."""
    errors: list[str] = []
    config = info = None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_id)  # no trust_remote_code: catalog models are native
    except Exception as exc:  # gated, offline, unknown id ...
        errors.append(f"config: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(model_id)
    except Exception as exc:
        errors.append(f"model_info: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    return config, info, errors


def compare_models(
    model_ids: Iterable[str],
    use_hub: bool = False,
    *,
    context: int = 2048,
    catalog: Iterable[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Compare models as the tutorial's ``compare_models()`` does, returning one dict per model.

    Rows hold the config fields (hidden size, layers, heads, KV heads, vocab, context), licence,
    languages, downloads/likes (Hub only) and the estimated weights at bf16/int8/nf4, the KV
    cache at ``context`` and the QLoRA training estimate, all in GB. With ``use_hub`` the config
    comes from ``AutoConfig.from_pretrained`` and the stats from ``HfApi().model_info``; any
    failure (offline, gated, ``HF_HUB_OFFLINE=1``) falls back to the catalog and is recorded in
    ``hub_error``. Without ``use_hub`` nothing touches the network.
    """
    cat = list(catalog) if catalog is not None else load_catalog()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    rows = []
    for model_id in model_ids:
        entry = catalog_entry(model_id, cat)
        row: dict[str, Any] = {"model_id": model_id, "source": "catalog" if entry else None}
        config = info = None
        if use_hub and not offline:
            config, info, errors = _hub_lookup(model_id)
            if errors:
                row["hub_error"] = "; ".join(errors)
        elif use_hub:
            row["hub_error"] = "HF_HUB_OFFLINE is set"

        published = entry.get("params") if entry else None
        if info is not None and getattr(info, "safetensors", None) is not None:
            published = getattr(info.safetensors, "total", None) or published
        if config is not None:
            shape = ModelShape.from_config(config, published, model_id)
            row["source"] = "hub"
        elif entry is not None:
            shape = ModelShape.from_catalog(entry)
        else:
            row["error"] = "not in the catalog" + ("" if use_hub else " (use_hub=False)")
            rows.append(row)
            continue

        max_ctx = getattr(config, "max_position_embeddings", None) if config is not None else None
        row.update(
            family=entry.get("family") if entry else None,
            model_type=shape.model_type,
            params=shape.params,
            params_from_shape=shape.param_count(),
            num_hidden_layers=shape.num_hidden_layers,
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_key_value_heads,
            head_dim=shape.head_dim,
            vocab_size=shape.vocab_size,
            tie_word_embeddings=shape.tie_word_embeddings,
            max_context=max_ctx or (entry.get("max_context") if entry else None),
            license=(entry or {}).get("license"),
            languages=(entry or {}).get("languages", []),
            korean=bool((entry or {}).get("korean", False)),
            use_cases=(entry or {}).get("use_cases", []),
            downloads=None,
            likes=None,
        )
        if info is not None:
            row["downloads"] = getattr(info, "downloads", None)
            row["likes"] = getattr(info, "likes", None)
            card = getattr(info, "card_data", None) or getattr(info, "cardData", None)
            lic = getattr(card, "license", None) if card is not None else None
            if lic:
                row["license"] = lic
            if row["source"] == "catalog":
                row["source"] = "catalog+hub stats"
        row.update({k: round(v, 3) for k, v in _estimates(shape, context).items()})
        if entry and entry.get("notes"):
            row["notes"] = " ".join(str(entry["notes"]).split())
        rows.append(row)
    return rows


def format_comparison(rows: list[Mapping[str, Any]]) -> str:
    """Plain-text table of :func:`compare_models` rows."""
    cols = [
        ("model", lambda r: r["model_id"]),
        ("params", lambda r: fmt_params(r.get("params"))),
        ("layers", lambda r: r.get("num_hidden_layers", "")),
        ("hidden", lambda r: r.get("hidden_size", "")),
        ("heads/kv", lambda r: f"{r['num_attention_heads']}/{r['num_key_value_heads']}" if "num_attention_heads" in r else ""),
        ("vocab", lambda r: r.get("vocab_size", "")),
        ("ctx", lambda r: r.get("max_context", "")),
        ("bf16 GB", lambda r: fmt_float(r.get("bf16_gb"))),
        ("int8 GB", lambda r: fmt_float(r.get("int8_gb"))),
        ("nf4 GB", lambda r: fmt_float(r.get("nf4_gb"))),
        ("QLoRA GB", lambda r: fmt_float(r.get("qlora_gb"))),
        ("licence", lambda r: r.get("license") or ""),
        ("downloads", lambda r: f"{r['downloads']:,}" if r.get("downloads") is not None else "-"),
    ]
    text = text_table([c[0] for c in cols], [[str(fn(r)) for _, fn in cols] for r in rows if "error" not in r])
    errors = [f"{r['model_id']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join([text] + errors)
