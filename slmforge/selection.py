"""Model selection guide: the tutorial's catalog comparison (§2.3) and §9 flowchart as code.

Why: the tutorial answers "which small LLM?" with a flowchart and a rule-of-thumb memory table.
The catalog and its comparison are
:mod:`slmforge.catalog`. Here the flowchart picks the candidate families, and the architecture-based estimates in
:mod:`slmforge.memory` decide what actually fits, at which precision, for inference and for
QLoRA. Everything works offline from ``data/model_catalog.yaml``; the Hub is read only when
``slmforge.catalog.compare_models(..., use_hub=True)`` asks for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

from slmforge.catalog import QLORA_RECIPE, fmt_float, fmt_params, load_catalog, normalize_use_case, text_table
from slmforge.memory import GB, inference_bytes, normalize_precision, qlora_training_bytes
from slmforge.model_shape import ModelShape, parse_param_count

#: §9: "memory < 8 GB?" → the small branch; "small" = up to 2 B parameters (SmolLM2-1.7B,
#: Qwen2.5-1.5B, Llama-3.2-1B, and the 1.5B specialists; not Gemma-2-2B at 2.6 B).
SMALL_MEMORY_GB = 8.0
SMALL_MAX_PARAMS = 2.0e9

#: CUDA context + allocator slack that the estimators leave out (nvidia-smi sees it,
#: torch.cuda.max_memory_allocated does not).
DEFAULT_OVERHEAD_GB = 0.5

#: catalog ``use_cases`` tag for each normalized use case.
USE_CASE_TAG = {"general": "chat"}

#: §9 flowchart: families per use case, and the reason text.
FLOWCHART: dict[str, dict[str, Any]] = {
    "coding": {
        "families": ["Qwen2.5-Coder"],
        "why": "§9 coding → Qwen-Coder; DeepSeek-Coder and CodeLlama, also named there, are not in the catalog",
    },
    "math": {
        "families": ["Phi-3", "Phi-3.5", "Phi-4", "Qwen2.5-Math", "DeepSeek-R1-Distill-Qwen"],
        "why": "§9 math/reasoning → Phi-3/4, Qwen-Math, DeepSeek-R1 distills",
    },
    "multilingual": {"families": ["Qwen2.5", "Gemma 2"], "why": "§9 multilingual → Qwen2.5, Gemma 2"},
    "general": {"families": ["Llama 3.2", "Qwen2.5", "Gemma 2"], "why": "§9 general → Llama 3.2, Qwen2.5, Gemma 2"},
    "edge": {"families": ["SmolLM2", "Qwen2.5", "Llama 3.2"], "why": "§2.2 edge → SmolLM2, Qwen2.5-0.5B, Llama-3.2-1B"},
    "function-calling": {"families": [], "why": "§1.2 function calling (7B–14B suggested): card lists tool use"},
}
CODING_NOT_IN_CATALOG = "the tutorial's other coding picks, DeepSeek-Coder and CodeLlama, are not in the catalog"
SMALL_BRANCH_FAMILIES = ("SmolLM2", "Qwen2.5", "Llama 3.2")
SMALL_BRANCH_WHY = "§9 memory < 8 GB → SmolLM, Qwen-0.5B/1.5B, Llama-1B"

_QUALITY = ("bf16", "int8", "nf4")
QUANTIZATION_MODES = {
    "auto": _QUALITY,              # best quality that fits
    "quality": ("bf16",),
    "balance": ("int8", "nf4"),
    "memory": ("nf4",),
}
_PRECISION_WHY = {
    "bf16": "bf16: fits unquantized (best quality)",
    "int8": "8-bit (LLM.int8): bf16 does not fit; balance of quality and memory",
    "nf4": "4-bit NF4: short of memory for 8-bit",
}


# --------------------------------------------------------------------------- recommend


@dataclass
class Candidate:
    """One recommendation. Memory figures are GB (1e9 B) and include ``overhead_gb``."""

    model_id: str
    family: str
    params: int
    precision: str
    inference_gb: float
    weights_gb: float
    kv_cache_gb: float
    overhead_gb: float
    training_gb: float | None
    method: str
    license: str
    korean: bool
    max_context: int
    rank: int
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rank(entry: Mapping[str, Any], use_case: str, small_branch: bool) -> int:
    """0: the flowchart's family for the use case; 1: catalog-tagged for the use case (or, in
    the small branch, the §9 small list); 2: anything else (a fallback only)."""
    tag = USE_CASE_TAG.get(use_case, use_case)
    fam = entry.get("family")
    if use_case == "edge":
        in_flow = fam in FLOWCHART["edge"]["families"] and parse_param_count(entry["params"]) <= SMALL_MAX_PARAMS
    else:
        in_flow = fam in FLOWCHART[use_case]["families"]
    if in_flow or (small_branch and tag in entry.get("use_cases", [])):
        return 0
    if tag in entry.get("use_cases", []) or (small_branch and fam in SMALL_BRANCH_FAMILIES):
        return 1
    return 2


def recommend(
    memory_gb: float,
    use_case: str = "general",
    finetune: bool = False,
    korean: bool = False,
    context: int = 2048,
    *,
    quantization: str = "auto",
    overhead_gb: float = DEFAULT_OVERHEAD_GB,
    top_k: int | None = None,
    qlora: Mapping[str, Any] | None = None,
    catalog: Iterable[Mapping[str, Any]] | None = None,
    left_out: list[str] | None = None,
) -> list[Candidate]:
    """Walk the §9 flowchart for a memory budget and return the catalog models that fit.

    1. ``memory_gb < 8`` → only small models (≤ 2 B params): the use case's specialists first,
       then SmolLM2 / Qwen2.5-0.5B/1.5B / Llama-3.2-1B.
    2. Otherwise by use case: coding → Qwen2.5-Coder; math → Phi, Qwen2.5-Math, R1 distills;
       multilingual → Qwen2.5, Gemma 2; general → Llama 3.2, Qwen2.5, Gemma 2; then other
       catalog models tagged with the use case. Untagged models only if none of those fit.
    3. Precision (``quantization="auto"``): the best of bf16 → int8 → nf4 whose weights + bf16
       KV cache (``context`` tokens, batch 1) + ``overhead_gb`` fit. ``"quality"``/``"balance"``
       /``"memory"`` or an explicit precision restrict the choice.
    4. ``finetune`` → QLoRA (NF4 base, LoRA r=16 all-linear, AdamW, checkpointing, seq 512,
       batch 4) must fit too; its estimate is reported in ``training_gb`` (None otherwise).
       ``qlora`` overrides :data:`QLORA_RECIPE` / ``lora_training_bytes`` arguments, e.g.
       ``{"full_logits": False, "adapter_dtype": "bf16"}`` for trl ≥ 1's SFTTrainer.
    5. ``korean`` → only models whose card lists Korean; if no such model serves the use case,
       Korean-listed models of any use case, saying so.

    Models whose ``max_context`` is below ``context`` are left out. Sorted by rank, then larger
    models first (a bigger model at 4 bit usually beats a smaller one at 16 bit), then precision.
    ``left_out``, if given, receives one line per flowchart model (rank 0) that memory ruled out,
    with the estimate that did not fit, so a user sees why the obvious choice is missing.
    """
    if not memory_gb > 0:
        raise ValueError(f"memory_gb (--memory-gb): must be a positive number of GB, got {memory_gb}")
    if context < 1:
        raise ValueError(f"context (--context): must be at least 1 token, got {context}")
    uc = normalize_use_case(use_case)
    cat = list(catalog) if catalog is not None else load_catalog()
    small_branch = memory_gb < SMALL_MEMORY_GB
    if quantization in QUANTIZATION_MODES:
        order = QUANTIZATION_MODES[quantization]
    else:
        order = (normalize_precision(quantization),)

    found: list[Candidate] = []
    for entry in cat:
        params = parse_param_count(entry["params"])
        if small_branch and params > SMALL_MAX_PARAMS:
            continue
        if korean and not entry.get("korean"):
            continue
        if context > int(entry.get("max_context") or 0):
            continue
        shape = ModelShape.from_catalog(entry)
        chosen = None
        for prec in order:
            inf = inference_bytes(shape, prec, context)
            if inf["total"] / GB + overhead_gb <= memory_gb:
                chosen = (prec, inf)
                break
        rank = _rank(entry, uc, small_branch)
        if chosen is None:
            if left_out is not None and rank == 0:
                need = inference_bytes(shape, order[-1], context)["total"] / GB + overhead_gb
                left_out.append(f"{entry['id']}: inference needs ≈ {need:.2f} GB even in {order[-1]}")
            continue
        training_gb = None
        if finetune:
            training_gb = qlora_training_bytes(shape, **{**QLORA_RECIPE, **(qlora or {})})["total"] / GB + overhead_gb
            if training_gb > memory_gb:
                if left_out is not None and rank == 0:
                    left_out.append(f"{entry['id']}: QLoRA training needs ≈ {training_gb:.2f} GB "
                                    f"(inference alone would fit in {chosen[0]})")
                continue
        prec, inf = chosen
        found.append(
            Candidate(
                model_id=entry["id"],
                family=entry["family"],
                params=params,
                precision=prec,
                inference_gb=round(inf["total"] / GB + overhead_gb, 3),
                weights_gb=round(inf["weights"] / GB, 3),
                kv_cache_gb=round(inf["kv_cache"] / GB, 3),
                overhead_gb=overhead_gb,
                training_gb=None if training_gb is None else round(training_gb, 3),
                method="QLoRA + SFTTrainer" if finetune else "use as is",
                license=entry.get("license", ""),
                korean=bool(entry.get("korean")),
                max_context=int(entry["max_context"]),
                rank=rank,
                why="",
            )
        )

    best = min((c.rank for c in found), default=None)
    keep_max = 1 if best is not None and best <= 1 else 2
    out = [c for c in found if c.rank <= keep_max]
    out.sort(key=lambda c: (c.rank, -c.params, _QUALITY.index(c.precision) if c.precision in _QUALITY else 9))
    for c in out:
        c.why = _why(c, uc, small_branch, korean, context, memory_gb, quantization)
    return out[:top_k] if top_k else out


def _why(c: Candidate, uc: str, small_branch: bool, korean: bool, context: int,
         memory_gb: float, quantization: str) -> str:
    parts = []
    if small_branch:
        parts.append(SMALL_BRANCH_WHY + (f"; suits {uc}" if c.rank == 0 else ""))
    if c.rank == 0 and not small_branch:
        parts.append(FLOWCHART[uc]["why"])
    elif c.rank == 1 and not small_branch:
        parts.append(f"catalog tags it for {uc}")
    elif c.rank == 2:
        parts.append(f"fallback: no {uc} model fits" + (" and lists Korean" if korean else ""))
    if uc == "coding" and c.rank == 0 and small_branch:
        parts.append(CODING_NOT_IN_CATALOG)
    if korean:
        parts.append("card lists Korean")
    if quantization == "auto":
        parts.append(_PRECISION_WHY[c.precision])
    else:
        parts.append(f"{c.precision} as requested ({quantization})")
    parts.append(
        f"inference ≈ {c.inference_gb:.2f} GB (weights {c.weights_gb:.2f} + KV {c.kv_cache_gb:.2f} at "
        f"{context} tokens + {c.overhead_gb:.1f} runtime) of {memory_gb:g} GB"
    )
    if c.training_gb is not None:
        parts.append(
            f"QLoRA ≈ {c.training_gb:.2f} GB (NF4 base, LoRA r=16 all-linear, AdamW, "
            f"checkpointing, seq 512 × batch 4)"
        )
    parts.append(f"licence {c.license}")
    return f"{c.model_id.split('/')[-1]} ({fmt_params(c.params)}): " + "; ".join(parts) + "."


def format_recommendations(
    candidates: list[Candidate],
    memory_gb: float | None = None,
    use_case: str | None = None,
    *,
    show_why: bool = True,
    left_out: list[str] | None = None,
) -> str:
    """Plain-text table of :func:`recommend`'s candidates for a CLI, reasons listed below, then
    the flowchart's models that did not fit (``left_out`` from :func:`recommend`)."""
    title = "Recommended models"
    if memory_gb is not None or use_case:
        title += " for " + ", ".join(x for x in (use_case, f"{memory_gb:g} GB" if memory_gb is not None else None) if x)
    missing = ("\n\nLeft out for memory:\n" + "\n".join(f"- {line}" for line in left_out)) if left_out else ""
    if not candidates:
        return title + ": none of the catalog models fits; try 4-bit, a shorter context or more memory." + missing
    train = any(c.training_gb is not None for c in candidates)
    header = ["#", "model", "params", "precision", "infer GB"] + (["QLoRA GB"] if train else []) + ["licence"]
    rows = [
        [str(i), c.model_id, fmt_params(c.params), c.precision, fmt_float(c.inference_gb)]
        + ([fmt_float(c.training_gb)] if train else []) + [c.license]
        for i, c in enumerate(candidates, 1)
    ]
    text = title + "\n" + text_table(header, rows)
    if show_why:
        text += "\n\n" + "\n".join(f"{i}. {c.why}" for i, c in enumerate(candidates, 1))
    return text + missing


__all__ = ["Candidate", "recommend", "format_recommendations"]
