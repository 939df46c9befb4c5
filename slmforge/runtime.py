"""The one runtime decision: device, device map, dtypes, attention kernel, gradient checkpointing
and optimizer, from the settings and the hardware.

Every stage (load, train, merge, evaluate, compare) asks `decide()` once and uses what it says;
the record is logged and written into the reports, each choice with its reason. The hardware
probe is a parameter, so every branch (CPU; a bf16 GPU such as A100/H100/H200; a GPU without bf16
such as T4/V100; several GPUs; FlashAttention installed or not) is tested without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, field, replace

import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOAD_MODES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class RuntimeSettingError(ValueError):
    """A setting the hardware cannot run; the message names the field and says why."""


@dataclass(frozen=True)
class Hardware:
    """What the decision depends on. `probe()` reads this machine; tests build their own."""

    gpus: int = 0
    gpu_name: str | None = None
    gpu_bf16: bool = False  # Ampere or newer
    flash_attn: bool = False  # the flash_attn package imports (transformers' is_flash_attn_2_available)
    cpu_threads: int = 1
    cpu_cores: int = 1  # logical CPUs of the machine (torch may use fewer threads)
    gpu_free_gb: float | None = None  # free memory of this process's GPU when probed (None: unknown)
    liger: bool = False  # the liger_kernel package is importable (fused linear cross-entropy, kernels)
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES when probed (None: not set)

    @classmethod
    def probe(cls, local_rank: int = 0) -> "Hardware":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        free = torch.cuda.mem_get_info(local_rank)[0] / 1e9 if gpus else None
        return cls(gpus=gpus,
                   gpu_name=torch.cuda.get_device_name(local_rank) if gpus else None,
                   gpu_bf16=bool(gpus) and native_bf16(local_rank),
                   flash_attn=bool(gpus) and flash_attn_importable(),
                   cpu_threads=torch.get_num_threads(), cpu_cores=os.cpu_count() or 1,
                   gpu_free_gb=free, liger=importlib.util.find_spec("liger_kernel") is not None,
                   visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))

    @property
    def gpus_hidden(self) -> bool:
        """No GPU because CUDA_VISIBLE_DEVICES is set to none ("" or -1), not because the machine has none."""
        return not self.gpus and self.visible_devices is not None and self.visible_devices.strip() in ("", "-1")


def native_bf16(device: int = 0) -> bool:
    """bf16 in hardware: compute capability 8 (Ampere) or newer. Not `torch.cuda.is_bf16_supported()`,
    whose default (`including_emulation=True`) answers True on a T4 or V100 too, where bf16 is emulated
    and FlashAttention 2 does not run."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def flash_attn_importable() -> bool:
    """FlashAttention 2 usable here: transformers' own test (a `flash-attn` distribution, version
    >= 2.3.3, CUDA available), then the import itself. Neither `find_spec("flash_attn")` nor that test
    imports it: a wheel built for another torch or CUDA is found, then fails at the model's load."""
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return False
    try:
        importlib.import_module("flash_attn")
    except Exception:  # noqa: BLE001 - ImportError, or OSError from a CUDA extension built for another torch
        return False
    return True


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_features(cpuinfo: str | None = None) -> dict:
    """The CPU's model name and the instruction-set flags that decide its speed here (bf16 in
    hardware or emulated, bitsandbytes' AVX-512 paths), from /proc/cpuinfo; empty off Linux.
    Benchmarks record it so a reader knows which kind of CPU a figure came from."""
    if cpuinfo is None:
        try:
            cpuinfo = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
        except OSError:
            return {}
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name"), **{f: f in flags for f in CPU_FLAGS}}


@dataclass(frozen=True)
class Runtime:
    device: str  # "cuda" | "cpu"
    device_map: dict | str  # {"": local_rank}: one whole replica per process, never layers split over GPUs
    compute_dtype: str  # the 4-bit layers' matmul dtype
    weights_dtype: str  # unquantized loads (base and published model in evaluation, non-4-bit modules)
    mixed_precision: str  # "bf16" | "fp16" (loss scaling) | "no": the trainer's autocast
    attn: str
    gradient_checkpointing: bool
    optim: str
    reasons: dict = field(default_factory=dict)
    liger: bool = False  # Liger's layer kernels in training (trl's use_liger_kernel; trl keeps its own LM head loss)

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def compute_torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.compute_dtype]

    @property
    def weights_torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.weights_dtype]

    @property
    def weights_mode(self) -> str:
        """The `load_model` mode of an unquantized load."""
        return LOAD_MODES[self.weights_dtype]

    def for_load(self, dtype: torch.dtype) -> "Runtime":
        """The runtime of one load in `dtype`: FlashAttention 2 runs only fp16/bf16, so a float32 load
        (compare's fp32 rows, the merge's fp32 base) takes SDPA, and the record says why."""
        if self.attn != "flash_attention_2" or dtype not in (torch.float32, torch.float64):
            return self
        return replace(self, attn="sdpa", reasons={**self.reasons, "attn": (
            "sdpa: this load is float32, which FlashAttention 2 does not run (the fp16/bf16 loads use it)")})

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        where = f"device_map {self.device_map}" if self.on_gpu else self.reasons.get("device_map", "no GPU")
        return (f"{self.device} ({where}), 4-bit compute {self.compute_dtype}, weights "
                f"{self.weights_dtype}, mixed precision {self.mixed_precision}, attention {self.attn}, gradient "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'}, optimizer {self.optim}, "
                f"Liger {'on' if self.liger else 'off'}")


def decide(compute_dtype: str = "auto", attn: str = "auto", gradient_checkpointing: bool | str = "auto",
           hw: Hardware | None = None, local_rank: int = 0) -> Runtime:
    """Settings (`model.compute_dtype`, `model.attn_implementation`, `train.gradient_checkpointing`)
    + hardware -> Runtime. A combination the hardware cannot run is refused here, before any load."""
    hw = hw or Hardware.probe(local_rank)
    reasons: dict[str, str] = {}
    if hw.gpus:
        device, device_map = "cuda", {"": local_rank}
        reasons["device_map"] = (f"{hw.gpus} GPUs visible: one whole replica on GPU {local_rank} per process "
                                 "(device_map='auto' would split layers and leave one process training)"
                                 if hw.gpus > 1 else "the whole model on the GPU")
        native = "bfloat16" if hw.gpu_bf16 else "float16"
        if compute_dtype == "bfloat16" and not hw.gpu_bf16:
            raise RuntimeSettingError(f"model.compute_dtype: bfloat16 is not supported by {hw.gpu_name or 'this GPU'} "
                                      "(needs Ampere or newer); use auto (float16 with loss scaling here) or float16")
        compute = native if compute_dtype == "auto" else compute_dtype
        reasons["compute_dtype"] = (f"{compute}: {'native bf16' if hw.gpu_bf16 else 'no bf16 on this GPU'}"
                                    if compute_dtype == "auto" else f"{compute}: set by model.compute_dtype")
        weights = native
        mixed = "bf16" if compute == "bfloat16" else ("fp16" if compute == "float16" else "no")
        reasons["mixed_precision"] = {"bf16": "bf16 autocast, fp32 adapter and optimizer state",
                                      "fp16": "fp16 autocast with loss scaling, fp32 adapter and optimizer state",
                                      "no": "float32 compute"}[mixed]
        optim = "adamw_torch_fused"
    else:
        device, device_map = "cpu", "cpu"
        reasons["device_map"] = (f"no GPU: CUDA_VISIBLE_DEVICES={hw.visible_devices!r} hides every GPU, so this runs "
                                 "on the CPU" if hw.gpus_hidden else "no GPU")
        if compute_dtype == "float16":
            raise RuntimeSettingError("model.compute_dtype: float16 needs a GPU (CPUs have no fast float16 "
                                      "matmuls); use auto (float32) or bfloat16")
        compute = "float32" if compute_dtype == "auto" else compute_dtype
        reasons["compute_dtype"] = ("float32: bf16 is emulated on CPUs without avx512_bf16, and where it is native it "
                                    "trained faster but taught fewer facts (README: Choosing the defaults)"
                                    if compute_dtype == "auto" else f"{compute}: set by model.compute_dtype")
        weights, mixed, optim = "float32", "no", "adamw_torch"
        reasons["mixed_precision"] = "none on CPU: fp32 adapter and optimizer state"
    if attn == "auto":
        if hw.gpus and hw.flash_attn and hw.gpu_bf16:
            attn, why = "flash_attention_2", "flash_attn installed on an Ampere+ GPU"
        else:
            attn = "sdpa"
            why = ("no GPU" if not hw.gpus else "flash_attn not installed" if not hw.flash_attn
                   else "FlashAttention 2 needs an Ampere or newer GPU")
        reasons["attn"] = f"{attn}: {why}"
    elif attn == "flash_attention_2" and not (hw.gpus and hw.flash_attn):
        raise RuntimeSettingError("model.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn "
                                  "package; use auto or sdpa")
    elif attn == "flash_attention_2" and not hw.gpu_bf16:
        raise RuntimeSettingError(f"model.attn_implementation: flash_attention_2 needs an Ampere or newer GPU "
                                  f"(compute capability 8+), not {hw.gpu_name or 'this GPU'}; use auto or sdpa")
    else:
        reasons["attn"] = f"{attn}: set by model.attn_implementation"
    if gradient_checkpointing == "auto":
        checkpointing = bool(hw.gpus)
        reasons["gradient_checkpointing"] = ("on unless the memory plan finds it fits without (plan_memory)"
                                             if checkpointing
                                             else "off: memory is not the limit on CPU, and recomputing costs time")
    else:
        checkpointing = bool(gradient_checkpointing)
        reasons["gradient_checkpointing"] = "set by train.gradient_checkpointing"
    liger = bool(hw.gpus) and hw.liger
    reasons["liger"] = ("on: liger_kernel installed (its layer kernels; trl's chunked LM head computes the loss)" if liger
                        else "off: " + ("needs a GPU (Triton kernels)" if not hw.gpus else "liger_kernel not installed"))
    return Runtime(device=device, device_map=device_map, compute_dtype=compute, weights_dtype=weights,
                   mixed_precision=mixed, attn=attn, gradient_checkpointing=checkpointing, optim=optim,
                   reasons=reasons, liger=liger)


GPU_MEMORY_SHARE = 0.85  # of the free GPU memory a training plan may fill (CUDA context, allocator slack)


@dataclass(frozen=True)
class MemoryPlan:
    """The micro-batch and checkpointing a GPU training process runs with: the same effective
    batch, split as the free memory allows (`slmforge.memory`'s estimate)."""

    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    estimate_gb: float | None
    budget_gb: float | None
    reason: str


def plan_memory(shape, hw: Hardware, *, micro_batch: int, grad_accum: int, cap: int, seq_len: int, lora_r: int,
                checkpointing: bool | str = "auto", label_smoothing: float = 0.0) -> MemoryPlan:
    """On a GPU with known free memory, the split of this process's share of the effective batch:
    without gradient checkpointing at the largest micro-batch that fits, if one at least as large
    as the configured `micro_batch` does (recomputing costs about a third more compute); else with
    checkpointing at the largest micro-batch that fits. Every micro-batch is a divisor of the share
    and at most `cap`. `checkpointing` True/False (the setting) is kept: only the micro-batch moves.
    On a CPU, or with unknown free memory, the configured split stays. A wrong estimate is caught by
    the out-of-memory retry, which lowers `cap`.

    Full logits (vocabulary x 10 bytes a token) are counted only with `train.label_smoothing`: trl's
    SFTTrainer otherwise scores through its chunked LM head (`trl.kernels.chunked_logprob`), which
    never builds them, Liger or not (trl turns Liger's fused cross-entropy off in favour of its own)."""
    from slmforge.memory import lora_training_bytes

    share = micro_batch * grad_accum
    keep = MemoryPlan(micro_batch, grad_accum, bool(hw.gpus) if checkpointing == "auto" else bool(checkpointing),
                      None, None, "")
    if not hw.gpus:
        return replace(keep, reason="CPU: the configured micro-batch")
    if hw.gpu_free_gb is None:
        return replace(keep, reason="free GPU memory unknown: the configured micro-batch")
    budget = hw.gpu_free_gb * GPU_MEMORY_SHARE
    full_logits = label_smoothing > 0  # the smoothed loss's logits (training.trainer_class); else trl's chunked head
    logits_note = "full logits counted: train.label_smoothing" if full_logits else "no full logits: trl's chunked LM head"
    sizes = sorted((d for d in range(1, min(cap, share) + 1) if share % d == 0), reverse=True)

    def gb(micro: int, ckpt: bool) -> float:
        return lora_training_bytes(shape, r=lora_r, seq_len=seq_len, batch_size=micro, gradient_checkpointing=ckpt,
                                   full_logits=full_logits)["total"] / 1e9

    def plan(micro: int, ckpt: bool, why: str) -> MemoryPlan:
        est = gb(micro, ckpt)
        return MemoryPlan(micro, share // micro, ckpt, round(est, 2), round(budget, 2),
                          f"micro-batch {micro} x accumulation {share // micro}, checkpointing {'on' if ckpt else 'off'}"
                          f" ({why}): estimated {est:.1f} GB of {budget:.1f} GB ({GPU_MEMORY_SHARE:.0%} of "
                          f"{hw.gpu_free_gb:.1f} GB free; {logits_note})")

    if checkpointing == "auto":
        for micro in (m for m in sizes if m >= min(micro_batch, sizes[0])):
            if gb(micro, False) <= budget:
                return plan(micro, False, "fits without recomputing")
        ckpt, why = True, "needed to fit this micro-batch"
    else:
        ckpt, why = bool(checkpointing), "set by train.gradient_checkpointing"
    for micro in sizes:
        if gb(micro, ckpt) <= budget:
            return plan(micro, ckpt, why)
    return replace(plan(sizes[-1], ckpt, why), reason=(
        f"nothing fits the estimate ({gb(sizes[-1], ckpt):.1f} GB at micro-batch {sizes[-1]} of {budget:.1f} GB): "
        f"micro-batch {sizes[-1]}, checkpointing {'on' if ckpt else 'off'}; an out-of-memory error ends the stage"))


def for_config(model_cfg, train_cfg=None, hw: Hardware | None = None, local_rank: int = 0) -> Runtime:
    """`decide()` from a ModelConfig (and TrainConfig)."""
    return decide(model_cfg.compute_dtype, model_cfg.attn_implementation,
                  train_cfg.gradient_checkpointing if train_cfg is not None else "auto", hw, local_rank)


@dataclass(frozen=True)
class ProcessPlan:
    """How training spreads over processes: `per_node` on this node, `world` in all, each with its
    share of the effective batch (`micro_batch` x `grad_accum` x `world` = batch_size x grad_accum)."""

    per_node: int
    world: int
    micro_batch: int
    grad_accum: int
    backend: str  # "nccl" | "gloo"
    reason: str

    @property
    def distributed(self) -> bool:
        return self.world > 1


def plan_processes(train_cfg, hw: Hardware | None = None, micro_batch: int | None = None) -> ProcessPlan:
    """`train.processes`/`nnodes` + hardware -> ProcessPlan, refused here (naming the field)
    when the hardware or the batch cannot be split that way. `micro_batch` is a smaller per-step
    micro-batch an out-of-memory retry chose (per process)."""
    hw = hw or Hardware.probe()
    effective = train_cfg.batch_size * train_cfg.grad_accum
    if train_cfg.processes == "auto":
        per_node = max(hw.gpus, 1)
        why = f"auto: {hw.gpus} GPUs visible" if hw.gpus else "auto: no GPU, one process"
    else:
        per_node = train_cfg.processes
        why = "set by train.processes"
        if hw.gpus and per_node > hw.gpus:
            raise RuntimeSettingError(f"train.processes: {per_node} processes but {hw.gpus} GPUs visible (one GPU "
                                      "per process; use auto)")
        if not hw.gpus and per_node > max(hw.cpu_cores, 1):
            raise RuntimeSettingError(f"train.processes: {per_node} CPU processes on {hw.cpu_cores} cores")
    world = per_node * train_cfg.nnodes
    if world == 1 and hw.gpus > 1:  # trains in the stage's own process, which already sees every GPU
        raise RuntimeSettingError(
            f"train.processes: 1 process but {hw.gpus} GPUs visible: the trainer would spread it over all of them "
            "with DataParallel, which trl refuses; use auto (one process per GPU), or give the run one GPU "
            "(CUDA_VISIBLE_DEVICES=0 in the work pool's env)")
    if hw.gpus_hidden:
        why += f"; CUDA_VISIBLE_DEVICES={hw.visible_devices!r} hides every GPU: training on the CPU"
    if effective % world:
        raise RuntimeSettingError(f"train.batch_size: the effective batch {effective} (batch_size x grad_accum) "
                                  f"does not split over {world} processes; make it a multiple of {world}")
    share = effective // world
    micro = min(micro_batch or train_cfg.batch_size, share)
    micro = max(d for d in range(1, micro + 1) if share % d == 0)
    return ProcessPlan(per_node=per_node, world=world, micro_batch=micro, grad_accum=share // micro,
                       backend="nccl" if hw.gpus else "gloo",
                       reason=f"{why}; {world} process(es) x micro-batch {micro} x accumulation {share // micro} "
                              f"= effective batch {effective}")
