"""Typed settings: one pydantic model per stage, composed into `FinetuneConfig`.

The same model is the CLI's `--set` keys, the YAML file's schema and the form the Prefect UI
draws for the flow's parameter. Every value is checked here, before any model loads, so a typo
fails in a second with the field's dotted name instead of an hour into a run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROJECT_DIR = Path(__file__).resolve().parent.parent


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the Q&A pairs come from and how they become chat turns."""

    source: str = Field(
        "bundled:korean-qa-quick",
        description="`bundled:korean-qa` (464 train rows), `bundled:korean-qa-quick` (only the 132 train rows of the "
        "66 facts the test asks again in new wording: a CPU run of minutes can learn them), a local/object-store (s3://…) JSONL/JSON/CSV/TSV/Parquet file, or "
        "`hf:<dataset id, local data dir or save_to_disk dir>`.",
    )
    split: str = Field("train", description="Split to read for a Hugging Face dataset source.")
    hf_config: str | None = Field(None, description="Configuration (subset) name of a Hugging Face dataset.")
    hf_data_files: str | list[str] | None = Field(
        None, description="`data_files` for `hf:json`, `hf:csv` or `hf:parquet` (local paths or URLs).")
    hf_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of an `hf:` dataset.")
    question_field: str = Field("question", description="Column holding the question (user turn).")
    answer_field: str = Field("answer", description="Column holding the reference answer (assistant turn).")
    key_field: str = Field("key", description="Column holding the key fact(s) a correct answer must contain.")
    system_prompt: str | None = Field(None, description="Optional system turn prepended to every example.")
    max_length: int = Field(256, ge=16, le=131072, description="Longest templated example in tokens.")
    overlong: Literal["drop", "truncate"] = Field("drop", description="What to do with longer examples.")
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0, description="Fail when more rows than this are bad.")
    near_duplicate_threshold: float = Field(
        0.9, gt=0.0, le=1.0,
        description="Questions this similar (character-bigram Jaccard, same numbers) count as near duplicates; "
        "1.0 = exact duplicates only.",
    )
    train_limit: int | None = Field(None, ge=1, description="Use only the first N training rows (quick runs).")
    test_limit: int | None = Field(
        64, ge=1, description="Evaluate on at most N held-out rows, balanced across test parts."
    )
    test_fraction: float = Field(
        0.15, gt=0.0, lt=0.9, description="Held-out share for a user file that has no `split` column."
    )


class ModelConfig(_Section):
    """The base model and how it is quantized for training."""

    source: str = Field(
        "smollm2-135m-instruct",
        description="A bundled alias (`smollm2-135m-instruct`), a local directory, or a Hub model id.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a Hub model id.")
    load_in_4bit: bool = Field(True, description="Load the base in 4-bit NF4 for QLoRA (False: plain LoRA).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Matmul dtype of the 4-bit layers; `auto` = bfloat16 on GPU, float32 on CPU."
    )
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="Storage dtype of the packed 4-bit weights (bitsandbytes' bnb_4bit_quant_storage); "
        "uint8 unless a sharding scheme needs them in a float dtype.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; `auto` picks FlashAttention 2 when installed on GPU, else SDPA."
    )


class LoraSettings(_Section):
    """LoRA adapter shape (the tutorial's §5.2 defaults)."""

    r: int = Field(16, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="`all-linear` or a list of module-name suffixes, e.g. [q_proj, v_proj]."
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Fully trained modules; leave empty unless tokens were added (costs memory and speed).",
    )


# Why train.fsdp=true is refused (read from the installed libraries; never run on a GPU): each rank
# loads the whole 4-bit model onto its GPU before any FSDP setting exists; transformers 5 defaults
# to FSDP2, which ignores use_orig_params/sync_module_states, and accelerate's FSDP2 auto-wrap
# returns None for peft's wrap policy (only the root would be sharded); peft's fp32 upcast of the
# non-4-bit parameters mixes dtypes in one flat shard; and rank 0 alone saves a sharded model.
FSDP_REFUSED = ("train.fsdp: FSDP-QLoRA is not supported (not verified on a GPU, and under transformers 5's FSDP2 "
                "the settings it needs are not applied); leave it false: train.processes trains DDP with a whole "
                "4-bit replica per GPU, enough for models that fit one GPU in 4-bit (a 7B in NF4 is ~5 GB)")


class TrainConfig(_Section):
    """Optimisation. CPU-sized by default; the README lists the tutorial's GPU recipe."""

    epochs: float = Field(5.0, gt=0, description="Passes over the training split (ignored if max_steps > 0). A 135M "
                          "model needs about five passes over a fact to answer it asked in a new wording (README: "
                          "Choosing the defaults).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 = use epochs.")
    batch_size: int = Field(4, ge=1, description="Micro-batch per step.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-3, gt=0, lt=1, description="Peak learning rate (fp32 adapter: 2e-3 is stable).")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field("cosine")
    warmup_steps: int = Field(5, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Train towards (1 - e) on the answer's token and "
                                   "e spread over the vocabulary: a model less sure of everything, including the "
                                   "facts it was not taught (README: Choosing the defaults). 0 = plain cross-entropy.")
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute activations to save memory; `auto` = on for GPU, off on CPU."
    )
    packing: bool = Field(False, description="Pack several examples into one sequence (padding-free).")
    padding_free: bool | Literal["auto"] = Field(
        "auto", description="Join each micro-batch's rows into one row whose position ids restart per example "
        "(trl's padding_free) instead of padding them to the longest: attention stays within each example and LoRA "
        "dropout draws the padded batch's masks, so a seed gives the padded run's figures without the pad tokens' "
        "work (13-25% faster steps on the bundled rows on a 2-core CPU; README: Choosing the defaults). `auto` = on.")
    evaluate_each_epoch: bool = Field(False, description="Validation loss after every epoch (one more forward pass "
                                      "over the validation split each time), drawn in the loss curve.")
    logging_steps: int = Field(5, ge=1, description="Log the loss (and draw it in the loss curve) every N steps.")
    save_steps: int = Field(
        50, ge=1, description="Write a resumable checkpoint (adapter, optimizer, scheduler, RNG, step) to the store "
        "every N optimizer steps; a retried or re-run training resumes from the latest one.")
    seed: int = Field(42, description="Seed for adapter init and data order.")
    # -- scaling out (README: Scaling out) --
    processes: int | Literal["auto"] = Field(
        "auto", description="Training processes on this node, launched by torchrun with DDP (NCCL on GPUs, gloo on "
        "CPU), each with a whole replica on its own GPU; `auto` = one per visible GPU (1 on CPU, trained in the "
        "flow's own process). One process with several GPUs visible is refused. The effective batch "
        "(batch_size x grad_accum) is kept: each process takes its share.")
    nnodes: int = Field(1, ge=1, description="Nodes taking part (torchrun --nnodes); each other node runs the "
                        "command the train stage logs.")
    node_rank: int = Field(0, ge=0, description="This node's rank (torchrun --node-rank); 0 runs the flow.")
    rdzv_endpoint: str | None = Field(None, description="host:port of the rendezvous (node 0's address) when "
                                      "nnodes > 1 (torchrun --rdzv-endpoint, c10d backend).")
    fsdp: bool = Field(False, description="FSDP-QLoRA. Not supported: `true` is refused. train.processes trains "
                       "DDP with a whole 4-bit replica per GPU instead.")

    @property
    def joins_rows(self) -> bool:
        """Whether micro-batches are padding-free: `padding_free`, with auto resolved."""
        return True if self.padding_free == "auto" else self.padding_free

    @field_validator("processes")
    @classmethod
    def _processes(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be at least 1, or auto")
        return v

    @model_validator(mode="after")
    def _scale_out(self):
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("train.rdzv_endpoint: nnodes > 1 needs the rendezvous host:port (node 0's address)")
        if self.rdzv_endpoint and not re.fullmatch(r"[\w.\-\[\]:]+:\d+", self.rdzv_endpoint):
            raise ValueError(f"train.rdzv_endpoint: expected host:port, got {self.rdzv_endpoint!r}")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"train.node_rank: {self.node_rank} is not below train.nnodes ({self.nnodes})")
        if self.fsdp:
            raise ValueError(FSDP_REFUSED)
        return self


class CalibrateConfig(_Section):
    """Calibration between training and merging: the final norm's output scaled, fitted on the validation split."""

    enabled: bool = Field(
        True, description="Fit a scale of the final norm's output (`method`) on the validation split's answers and "
        "fold it into the adapter (its final norm), so the answer loss on facts the model was not taught falls. Skipped "
        "when there is no validation split. A model whose logits cannot be scaled through its final norm "
        "(soft-capped logits, an LM head with a bias, no final norm) is refused before anything loads: set false "
        "for it.")
    method: Literal["temperature", "vector"] = Field(
        "temperature", description="`temperature`: one T, every logit divided by it (greedy answers unchanged); "
        "`vector`: T, then one scale per hidden dimension fitted from 1/T: a lower answer loss on unseen facts, but "
        "greedy answers change, and on the default run it cost taught key accuracy on some seeds (README "
        "\"Calibration\").")
    l2: float = Field(3.0, ge=0, description="`vector`: strength of the pull of each dimension's scale towards 1/T "
                      "(mean squared distance); 3 had the lowest 5-fold cross-validated loss on the validation "
                      "answers for each of three seeds of the default run; 0 overfits.")
    steps: int = Field(20, ge=1, description="`vector`: L-BFGS iterations (the default run's fit had converged by 20).")
    items: int = Field(256, ge=1, description="At most this many validation answers to fit on (one forward pass).")


class MergeConfig(_Section):
    """How the adapter becomes the published model, and how closely it must match the trained one."""

    into: Literal["quantized", "original"] = Field(
        "quantized",
        description="`quantized`: merge into the dequantized 4-bit base the adapter was trained on (the published "
        "model computes what training produced and evaluation measured); `original`: into the original weights, as "
        "the tutorial does (adds back the quantization error the adapter learned around; for some models the "
        "better base, so the check only warns then).")
    # Tolerances measured on the default run (SmolLM2-135M, 16 held-out prompts, bf16 published, compared
    # in float32 on an AVX512-bf16 CPU): merged into the dequantized 4-bit base, max logit diff 0.71, mean
    # 0.046, 14/16 identical greedy answers (the 2 others part after a few tokens: bf16 rounding flips
    # near-ties); merged into the original weights, 24.7, 2.61 and 0/16.
    check_items: int = Field(16, ge=1, description="Held-out prompts on which the published model is compared with "
                             "the trained one (logits and greedy answers).")
    max_logit_diff: float = Field(2.0, gt=0, description="Largest logit difference allowed between the published "
                                  "(saved in bf16, reloaded) and the trained model; default runs measured 0.50-0.71.")
    min_answer_agreement: float = Field(0.5, ge=0, le=1, description="Share of the check's greedy answers that must "
                                        "be identical; default runs measured 12-16 of 16.")


class EvalConfig(_Section):
    """Held-out evaluation before/after."""

    max_new_tokens: int = Field(48, ge=1, le=4096, description="Greedy generation budget per answer.")
    batch_size: int = Field(16, ge=1, description="Rows per forward pass that scores the reference answers "
                            "(answer loss).")
    generation_batch_size: int = Field(
        64, ge=1, description="Rows per batched greedy generation. Each new token reads every weight once for the "
        "whole batch, so a larger batch costs less per answer: the bundled base's 64 answers took 29-31 s at 64 "
        "against 47-53 s at 16 on a 2-core CPU, the same answers (benchmarks/generation_batch.py).")
    primary_metric: Literal["auto", "key_accuracy", "chrf", "char_f1", "exact_match"] = Field(
        "auto", description="The metric the publish gate judges. `auto`: key accuracy when the test split carries "
        "key facts (a `key` column), else chrF against the reference answers. A metric the data cannot yield "
        "(key_accuracy without keys) is refused before training.")
    min_improvement: float = Field(
        0.05, description="Publish only if the tuned model beats the base by this much on the primary metric."
    )
    samples: int = Field(8, ge=0, description="Side-by-side sample answers in the report.")
    adapter_on_4bit: bool = Field(
        False, description="Also evaluate the trained model (the adapter on the 4-bit base) beside the published one: "
        "one more pass over the test split (about 80 s on a 2-core CPU). The merge stage already checks on held-out "
        "prompts that the published model answers like the trained one.")
    seed: int = Field(0)


class PublishConfig(_Section):
    """Where a run that passed the gate goes."""

    hub_repo: str | None = Field(None, description="`user/name` on the Hub; empty = dry run into the store.")
    hub_endpoint: str = Field("https://huggingface.co", description="Hub API base URL (a mirror, a test server).")
    private: bool = Field(True)
    revision: str = Field("main", description="Branch to commit to.")
    commit_message: str | None = Field(
        None,
        description="Hub commit message; may use {run}, {primary}, {base}, {tuned}. "
        "Default: `slmforge <run>: <primary> <base> -> <tuned>`.",
    )
    push_merged: bool = Field(False, description="Also push the merged bf16 model (under `merged/`).")
    token_secret_block: str = Field("hf-token", description="Prefect Secret block holding the token (else HF_TOKEN).")

    @field_validator("hub_repo")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        if not re.fullmatch(r"[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}", v) or ".." in v or "--" in v:
            raise ValueError(f"{v!r} is not a Hub repo id of the form `user/name`")
        return v


class RetentionConfig(_Section):
    """What the store keeps; `slmforge gc` and the step at the end of every finetune run remove the rest."""

    after_run: bool = Field(True, description="Collect at the end of every finetune run (a nightly schedule "
                            "then keeps its store bounded); `slmforge gc` collects on demand.")
    keep_last_runs: int = Field(7, ge=1, description="Keep every output the last N finetune runs on this store "
                                "used or wrote (a week of nightly runs).")
    keep_published: int | Literal["all"] = Field(
        "all", description="Published entries to keep per target (Hub repo or dry run), with their adapter, "
        "merged model and evaluation: `all`, or the newest K.")
    min_age_hours: float = Field(24.0, ge=0, description="Never remove an output younger than this, nor one "
                                 "written since a run that is still going started: it may still be read.")

    @field_validator("keep_published")
    @classmethod
    def _keep_published(cls, v):
        if v != "all" and v < 1:
            raise ValueError("must be at least 1, or all")
        return v


class StorageConfig(_Section):
    """The artifact store. Credentials never go here: s3fs reads them from AWS_* variables."""

    url: str = Field(
        "file://./.slmforge/store",
        description="`file://DIR` (relative to the working directory) or `s3://bucket/prefix`.",
    )
    endpoint_url: str | None = Field(
        None, description="S3 endpoint (SeaweedFS, MinIO); default from AWS_ENDPOINT_URL or AWS."
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if "://" not in v:
            v = "file://" + v
        scheme = v.split("://", 1)[0]
        if scheme not in ("file", "s3", "memory"):
            raise ValueError(f"unsupported store scheme {scheme!r}; use file:// or s3://")
        if scheme == "s3" and not v[len("s3://") :].strip("/"):
            raise ValueError("an s3:// store needs a bucket: s3://bucket/prefix")
        return v


class FinetuneConfig(_Section):
    """Everything one fine-tuning run needs; the finetune flow's single parameter."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)


class ConfigError(ValueError):
    """A setting is wrong; the message names the field."""


def _parse_value(raw: str) -> Any:
    """`--set` values are YAML scalars/lists: `3`, `true`, `null`, `[q_proj, v_proj]`, `s3://b/p`."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=2")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(raw)
    return data


def format_validation_error(err: ValidationError, origin: str) -> str:
    """One line per problem, the field first; the first line also says where the settings came from."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown setting"
        named = re.match(r"Value error, ([\w.]+: .*)", msg, re.S)
        lines.append(named.group(1) if named else f"{field}: {msg}")  # a check across fields names its own
    lines[0] += f" (invalid configuration: {origin})"
    return "\n  ".join(lines)


def read_settings(path: str | Path | None, overrides: list[str] | None) -> tuple[dict, str]:
    """YAML file (optional) + `key=value` overrides -> (raw settings, where they came from)."""
    data: dict = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of settings")
        data = loaded or {}
    if overrides:
        origin += " + --set"
        data = apply_overrides(data, overrides)
    return data, origin


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """YAML file (optional) + `key=value` overrides -> validated config, or ConfigError naming the field."""
    data, origin = read_settings(path, overrides)
    try:
        return FinetuneConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None


def describe_options(model: type[BaseModel] = FinetuneConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every setting: the CLI's --help is generated from this."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe_options(ann, f"{prefix}{name}.")
            continue
        default = field.default_factory() if field.default_factory else field.default
        rows.append((f"{prefix}{name}", repr(default), field.description or ""))
    return rows
