"""The one runtime decision: device, device map, dtypes, attention kernel, gradient checkpointing
and optimizer, from the settings and the hardware.

Every stage (load, train, merge, evaluate, compare) asks `decide()` once and uses what it says;
the record is logged and written into the reports, each choice with its reason. The hardware
probe is a parameter, so every branch (CPU; a bf16 GPU such as A100/H100/H200; a GPU without bf16
such as T4/V100; several GPUs; FlashAttention installed or not) is tested without a GPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field

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
    flash_attn: bool = False  # the flash_attn package is importable
    cpu_threads: int = 1

    @classmethod
    def probe(cls) -> "Hardware":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return cls(gpus=gpus,
                   gpu_name=torch.cuda.get_device_name(0) if gpus else None,
                   gpu_bf16=bool(gpus) and torch.cuda.is_bf16_supported(),
                   flash_attn=importlib.util.find_spec("flash_attn") is not None,
                   cpu_threads=torch.get_num_threads())


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

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.device} (device_map {self.device_map}), 4-bit compute {self.compute_dtype}, weights "
                f"{self.weights_dtype}, mixed precision {self.mixed_precision}, attention {self.attn}, gradient "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'}, optimizer {self.optim}")


def decide(compute_dtype: str = "auto", attn: str = "auto", gradient_checkpointing: bool | str = "auto",
           hw: Hardware | None = None, local_rank: int = 0) -> Runtime:
    """Settings (`model.compute_dtype`, `model.attn_implementation`, `train.gradient_checkpointing`)
    + hardware -> Runtime. A combination the hardware cannot run is refused here, before any load."""
    hw = hw or Hardware.probe()
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
        reasons["device_map"] = "no GPU"
        if compute_dtype == "float16":
            raise RuntimeSettingError("model.compute_dtype: float16 needs a GPU (CPUs have no fast float16 "
                                      "matmuls); use auto (float32) or bfloat16")
        compute = "float32" if compute_dtype == "auto" else compute_dtype
        reasons["compute_dtype"] = ("float32: bf16 matmuls on a CPU are emulated on many CPUs"
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
    else:
        reasons["attn"] = f"{attn}: set by model.attn_implementation"
    if gradient_checkpointing == "auto":
        checkpointing = bool(hw.gpus)
        reasons["gradient_checkpointing"] = ("on: GPU memory is the limit (recompute activations)" if checkpointing
                                             else "off: memory is not the limit on CPU, and recomputing costs time")
    else:
        checkpointing = bool(gradient_checkpointing)
        reasons["gradient_checkpointing"] = "set by train.gradient_checkpointing"
    return Runtime(device=device, device_map=device_map, compute_dtype=compute, weights_dtype=weights,
                   mixed_precision=mixed, attn=attn, gradient_checkpointing=checkpointing, optim=optim,
                   reasons=reasons)


def for_config(model_cfg, train_cfg=None, hw: Hardware | None = None, local_rank: int = 0) -> Runtime:
    """`decide()` from a ModelConfig (and TrainConfig)."""
    return decide(model_cfg.compute_dtype, model_cfg.attn_implementation,
                  train_cfg.gradient_checkpointing if train_cfg is not None else "auto", hw, local_rank)
