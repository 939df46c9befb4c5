"""Typed settings of the compare flow: `CompareConfig`, its YAML file and `--set` overrides.

Kept apart from `slmforge.config` (whose classes the finetune flow owns); it reuses its sections
(`DataConfig`, `StorageConfig`) and its override/validation helpers, so both commands read the
same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from slmforge.config import (ConfigError, DataConfig, StorageConfig, _Section, read_settings,
                             format_validation_error)

MODES = ("bf16", "fp32", "8bit", "4bit", "4bit-nodq")
Mode = Literal["bf16", "fp32", "8bit", "4bit", "4bit-nodq"]
FINETUNE_LATEST = "finetune:latest"
DEFAULT_MODELS = ["smollm2-135m-instruct", "gemma3-270m", FINETUNE_LATEST]
DEFAULT_PROMPTS = [
    "대한민국의 수도는 어디인가요?",
    "물은 섭씨 몇 도에서 끓나요? 한 문장으로 답하세요.",
    "What is the capital of France?",
    "Explain in one sentence what 4-bit quantization does to a language model.",
]


class CompareEvalConfig(_Section):
    """The quality half: greedy answers on held-out Q&A items, scored like the finetune evaluation."""

    items: int | Literal["auto"] = Field(
        "auto", description="Evaluation items from the test split, balanced over test parts; `auto` = 32 on CPU (enough for "
                    "a fine-tuned model's key accuracy to stand out from its base's), 64 on GPU "
                    "(this replaces data.test_limit, which the compare flow does not use).")
    max_new_tokens: int | Literal["auto"] = Field(
        "auto", description="Greedy budget per answer; `auto` = 48 on CPU (the finetune evaluation's: Korean takes about "
                            "3 SmolLM2 tokens a syllable, so fewer cut answers before their fact), 64 on GPU.")
    batch_size: int = Field(32, ge=1, description="Evaluation batch size (one decoding pass over 32 items on a CPU).")
    seed: int = Field(0)

    @field_validator("items", "max_new_tokens")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or `auto`")
        return v


class SpeedConfig(_Section):
    """The speed half: time to first token and decode tokens/s."""

    batch_sizes: list[int] = Field([1, 4], description="Batch sizes to time (the first prompts, repeated if fewer).")
    new_tokens: int | Literal["auto"] = Field(
        "auto", description="Tokens generated per timed run (forced, greedy); `auto` = 8 on CPU, 64 on GPU.")
    runs: int = Field(3, ge=1, le=100, description="Timed runs per batch size; the median and spread are reported.")
    warmup: int = Field(1, ge=0, le=10, description="Untimed runs before the timed ones.")

    @field_validator("new_tokens")
    @classmethod
    def _tokens(cls, v):
        if isinstance(v, int) and not 2 <= v <= 4096:
            raise ValueError("must be between 2 and 4096, or `auto`")
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("needs one or more batch sizes >= 1")
        return sorted(set(v))


class CompareConfig(_Section):
    """Everything one comparison run needs; the compare flow's single parameter."""

    models: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MODELS),
        description="Model sources: bundled aliases (smollm2-135m-instruct, gemma3-270m), local directories or "
                    "`.gguf` files, Hub ids, `finetune:latest` (the newest merged model in the store; skipped if "
                    "none) or `store:<key>` (a model directory in the store).")
    modes: list[Mode] = Field(
        default_factory=lambda: ["bf16", "8bit", "4bit"],
        description="Precisions: bf16, fp32, 8bit (LLM.int8), 4bit (NF4 + double quant; a merged fine-tuned model "
                    "runs as its adapter on the 4-bit base it was trained on, the '4bit + adapter' row), "
                    "4bit-nodq (NF4 only).")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS),
                               description="Prompts answered side by side; also the inputs of the speed runs.")
    answer_max_new_tokens: int | Literal["auto"] = Field(
        "auto", description="Greedy budget for the prompt answers; `auto` = 32 on CPU, 128 on GPU.")
    data: DataConfig = Field(default_factory=lambda: DataConfig(test_limit=None),
                             description="The evaluation set (its test split).")
    eval: CompareEvalConfig = Field(default_factory=CompareEvalConfig)
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Matmul dtype of 8/4-bit layers; `auto` = bfloat16 on GPU, float32 on CPU.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; `auto` = FlashAttention 2 on GPU when installed, else SDPA.")
    threads: int | Literal["auto"] = Field(
        "auto", description="CPU threads for torch while measuring; `auto` = torch's default (all cores). "
                            "On a machine other work also uses, fewer threads can be faster.")
    quality_metric: Literal["key_accuracy", "char_f1", "chrf", "exact_match"] = Field(
        "key_accuracy", description="Quality axis of the chart's first panel; char F1 is drawn beside it.")
    concurrency_limit: str | None = Field(
        "gpu", description="Prefect global concurrency limit held while a model is measured (one at a time "
                           "across runs); a limit that does not exist is skipped (one log line). Empty = none.")
    per_model_deployment: str | None = Field(
        "compare-model/fan-out",
        description="Deployment that measures one model (all its precisions) per flow run. When the comparison "
                    "itself runs from a deployment and this one exists on the server, every model is its own flow "
                    "run on that deployment's pool, so N GPU workers share one comparison; otherwise (a local run, "
                    "a missing deployment: one log line) every model is measured in this flow run. Empty = never.")
    no_worker_timeout_s: float = Field(
        900, gt=0, description="A fanned-out model run that has not started while its work pool has no worker "
        "online (none polls it, or it is paused) for this long is cancelled and its row says so; runs queued "
        "behind other runs while workers are online wait as long as it takes.")
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        v = [s.strip() for s in v if s and s.strip()]
        if not v:
            raise ValueError("needs at least one model source")
        if len(set(v)) != len(v):
            raise ValueError("lists a model source twice")
        return v

    @field_validator("modes")
    @classmethod
    def _modes(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"needs at least one of {', '.join(MODES)}")
        return list(dict.fromkeys(v))

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str]) -> list[str]:
        v = [p for p in v if p and p.strip()]
        if not v:
            raise ValueError("needs at least one prompt")
        return v

    @field_validator("threads")
    @classmethod
    def _threads(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or `auto`")
        return v

    @field_validator("answer_max_new_tokens")
    @classmethod
    def _answer_tokens(cls, v):
        if isinstance(v, int) and not 1 <= v <= 4096:
            raise ValueError("must be between 1 and 4096, or `auto`")
        return v

    @field_validator("concurrency_limit", "per_model_deployment")
    @classmethod
    def _name_or_none(cls, v: str | None) -> str | None:
        return (v or "").strip() or None

    @field_validator("per_model_deployment")
    @classmethod
    def _deployment(cls, v: str | None) -> str | None:
        if v and (v.count("/") != 1 or not all(v.split("/"))):
            raise ValueError(f"{v!r} is not a deployment name: `<flow name>/<deployment name>`, e.g. compare-model/fan-out")
        return v

    def eval_items(self, gpu: bool) -> int:
        return self.eval.items if self.eval.items != "auto" else (64 if gpu else 32)

    def eval_max_new_tokens(self, gpu: bool) -> int:
        return self.eval.max_new_tokens if self.eval.max_new_tokens != "auto" else (64 if gpu else 48)

    def speed_new_tokens(self, gpu: bool) -> int:
        return self.speed.new_tokens if self.speed.new_tokens != "auto" else (64 if gpu else 8)

    def answer_tokens(self, gpu: bool) -> int:
        return self.answer_max_new_tokens if self.answer_max_new_tokens != "auto" else (128 if gpu else 32)

    def resolved(self, gpu: bool) -> dict:
        """The `auto` settings as this machine runs them."""
        return {"eval_items": self.eval_items(gpu), "eval_max_new_tokens": self.eval_max_new_tokens(gpu),
                "speed_new_tokens": self.speed_new_tokens(gpu), "answer_max_new_tokens": self.answer_tokens(gpu)}


def load_compare_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CompareConfig:
    """YAML file (optional) + `key=value` overrides -> validated CompareConfig, or ConfigError naming the field.

    Same rules as `slmforge.config.load_config`; lists are YAML too: `--set modes=[bf16,4bit]`.
    """
    data, origin = read_settings(path, overrides)
    for key in ("models", "modes", "prompts"):  # `--set models=a` means a list of one
        value = data.get(key)
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                raise ConfigError(f"{key}: {value!r} is not a valid YAML list (quote items that contain "
                                  "'?', ':', ',' or '#', e.g. [\"What is 2+2?\", \"...\"])")
            data[key] = [value]
    try:
        return CompareConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None
