"""QLoRA training: peft LoRA on the (4-bit) base through trl's SFTTrainer.

Why the adapter is recast to float32 after building the trainer: trl 1.16 casts every trainable
parameter of a quantized model to bfloat16 ("as the QLoRA paper recommends"). With bf16 adapter
weights, AdamW's small late updates round away and, on CPU, the loss went flat or climbed back
while the identical plain-peft loop (fp32 adapter) learned. Keeping the adapter and its optimizer
state in float32 makes NF4 training on CPU learn exactly like the fp32 base; on GPU it costs a few
MB for a 16-rank adapter.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from slmforge.config import LoraSettings, TrainConfig
from slmforge.lora_targets import check_lora_targets, module_names
from slmforge.modeling import keep_4bit_unpacked
from slmforge.padded_dropout import draw_padded_masks
from slmforge.runtime import Runtime, decide


@dataclass
class TrainResult:
    steps: int
    epochs: float
    train_loss: float
    loss_curve: list[dict]
    tokens: int
    seconds: float
    trainable_params: int
    adapter_dtype: str
    micro_batch: int
    grad_accum: int
    resumed_from_step: int | None
    runtime: dict | None = None  # the runtime decision it ran under
    world_size: int = 1  # training processes (torchrun); micro_batch and grad_accum are per process

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def lora_config(cfg: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


GC_KWARGS = {"use_reentrant": False}


def attach_adapter(model, cfg: LoraSettings, gradient_checkpointing: bool):
    """Wrap the base in a LoRA PeftModel with float32 adapter weights. Gradient checkpointing is
    switched on here and only here (the trainer is told not to do it again)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_lora_targets(cfg, *module_names(model))
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=GC_KWARGS)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GC_KWARGS)
    peft_model = get_peft_model(model, lora_config(cfg), autocast_adapter_dtype=True)
    return peft_model


def keep_adapter_fp32(model) -> str:
    """Undo trl's bf16 cast of trainable parameters (see the module docstring). Returns the dtype."""
    dtypes = set()
    for p in model.parameters():
        if p.requires_grad:
            if p.dtype != torch.float32:
                p.data = p.data.float()
            dtypes.add(str(p.dtype).replace("torch.", ""))
    return ",".join(sorted(dtypes))


@contextlib.contextmanager
def score_labelled_positions_only():
    """Make trl's fused LM head score only the labelled (answer) positions on every device.

    trl computes the vocabulary projection and log-softmax only at positions with a label on Triton
    devices; elsewhere it scores every position (to keep tile shapes fixed for compilers that CPU training
    does not use) and masks the result afterwards. The loss and gradients are the same either way; on the
    bundled rows two thirds of the positions are prompt, so on CPU the head did three times the work it
    needs. trl reads the switch from `trl.trainer.utils._use_triton`; where a trl version lacks it,
    training runs as trl ships it.
    """
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        yield
        return
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


def trainer_class(base, label_smoothing: float):
    """trl's SFTTrainer, or with label smoothing one whose loss scores the answer positions' full logits.

    trl's own `label_smoothing_factor` runs a second forward pass for the full logits of every position;
    here the LM head runs once, over the positions from the batch's first labelled one to the end (the
    answers sit at the end of each row), and the loss goes through the model's forward, so DDP still
    synchronises the gradients. Packed rows hold answers throughout, so there it scores nearly every
    position: more memory for the logits on a large vocabulary.
    """
    if not label_smoothing:
        return base
    import torch
    import torch.nn.functional as F

    class SmoothedSFTTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = inputs["labels"][:, 1:]  # the token each position predicts
            labelled = (targets != -100).any(0).nonzero()
            first = int(labelled[0]) if len(labelled) else targets.shape[1] - 1
            keep = targets.shape[1] + 1 - first  # logits from `first` on (the last one predicts nothing)
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False,
                            logits_to_keep=keep)
            logits = outputs.logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, first:].reshape(-1),
                                   ignore_index=-100, label_smoothing=label_smoothing, reduction="sum")
            n = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
            loss = loss / torch.as_tensor(n).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as trl: DDP averages the gradients
            return (loss, outputs) if return_outputs else loss

    return SmoothedSFTTrainer


def progress_callback(report: Callable[[int, int, dict | None], None]):
    """A transformers TrainerCallback forwarding steps and losses to a reporter (Prefect artifact, logs)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            report(state.global_step, state.max_steps, None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                report(state.global_step, state.max_steps, logs)

    return Progress()


CHECKPOINT_DONE = "slmforge_checkpoint.json"  # written after the trainer finished a checkpoint


def checkpoint_callback(output_dir: Path, micro_batch: int, grad_accum: int,
                        on_checkpoint: Callable[[Path, int], None] | None):
    """A TrainerCallback that marks a checkpoint complete once the trainer has written all of it
    (trainer_state.json last), then hands it to `on_checkpoint` (the store upload)."""
    from transformers import TrainerCallback

    class CheckpointDone(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if _distributed():  # every rank has written its part (its RNG state) before rank 0 marks it done
                import torch.distributed as dist

                dist.barrier()
            if not state.is_world_process_zero:
                return
            ckpt = Path(output_dir) / f"checkpoint-{state.global_step}"
            if not (ckpt / "trainer_state.json").is_file():
                return
            (ckpt / CHECKPOINT_DONE).write_text(json.dumps(
                {"step": state.global_step, "max_steps": state.max_steps, "micro_batch": micro_batch,
                 "grad_accum": grad_accum}))
            if on_checkpoint is not None:
                on_checkpoint(ckpt, state.global_step)

    return CheckpointDone()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def checkpoint_step(path: Path | str) -> int | None:
    name = Path(path).name
    tail = name[len("checkpoint-"):] if name.startswith("checkpoint-") else ""
    return int(tail) if tail.isdigit() else None


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint the trainer finished writing (one cut short by a kill is skipped)."""
    ckpts = [p for p in Path(output_dir).glob("checkpoint-*")
             if checkpoint_step(p) is not None and (p / CHECKPOINT_DONE).is_file()
             and (p / "trainer_state.json").is_file()]
    return max(ckpts, key=checkpoint_step) if ckpts else None


def train(
    model,
    tokenizer,
    train_records: list[dict],
    eval_records: list[dict] | None,
    lora: LoraSettings,
    cfg: TrainConfig,
    output_dir: Path,
    progress: Callable[[int, int, dict | None], None] | None = None,
    micro_batch: int | None = None,
    grad_accum: int | None = None,
    save_steps: int | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    max_length: int | None = None,
    rt: Runtime | None = None,
) -> tuple[object, TrainResult]:
    """Train a LoRA adapter on pre-tokenised records (`input_ids`, `labels`); returns (peft model, result).

    Every `save_steps` (default `cfg.save_steps`) optimizer steps the trainer writes a checkpoint
    (adapter, optimizer, scheduler, RNG states, step and log history) into output_dir and
    `on_checkpoint(path, step)` is called with it. Resumes from the newest complete checkpoint in
    output_dir, so a retried stage picks up where the last attempt stopped instead of starting
    over; the trainer skips the batches already seen, so the data order and the loss curve
    continue as if uninterrupted.

    With `cfg.packing`, examples are packed padding-free into rows of `max_length` tokens (default:
    the longest record); position ids restart per example, so attention stays within each one.
    With `cfg.joins_rows` (padding-free, the default), each micro-batch is joined into one such row,
    and LoRA dropout draws the padded batch's masks (`padded_dropout`), so the run is the padded one.
    Device, mixed precision, optimizer and checkpointing come from `rt` (the runtime decision).
    """
    from transformers import set_seed
    from trl import SFTTrainer

    set_seed(cfg.seed)
    rt = rt or decide(gradient_checkpointing=cfg.gradient_checkpointing)
    micro_batch = micro_batch or cfg.batch_size
    grad_accum = grad_accum or cfg.grad_accum

    # data
    train_ds, eval_ds = to_datasets(train_records, eval_records if cfg.evaluate_each_epoch else None)
    pack_length, per_step = batch_plan(train_records, cfg.packing, micro_batch, grad_accum, max_length)
    # model
    if keep_4bit_unpacked(model):  # the trainer's own evaluations must not repack it either
        warnings.warn("the 4-bit base had been packed for bitsandbytes' CPU inference kernel (no gradients "
                      "there); unpacked it for training", stacklevel=2)
    model = attach_adapter(model, lora, rt.gradient_checkpointing)
    if cfg.joins_rows:  # a seed draws the padded run's dropout masks, so joining rows only saves time
        draw_padded_masks(model)
    # arguments and trainer
    args = sft_config(cfg, rt, output_dir, micro_batch, grad_accum, pack_length, evaluate=eval_ds is not None,
                      save_steps=save_steps or getattr(cfg, "save_steps", None)
                      or max(math.ceil(len(train_ds) / per_step), 10))
    trainer = trainer_class(SFTTrainer, cfg.label_smoothing)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[checkpoint_callback(output_dir, micro_batch, grad_accum, on_checkpoint)]
        + ([progress_callback(progress)] if progress else []),
    )
    adapter_dtype = keep_adapter_fp32(trainer.model)
    # train, resuming from the newest complete checkpoint
    resume = latest_checkpoint(output_dir)
    t0 = time.perf_counter()
    with score_labelled_positions_only():
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    # what happened
    n_tokens = sum(len(r["input_ids"]) for r in train_records)
    curve = [
        {k: h[k] for k in ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "num_tokens") if k in h}
        for h in trainer.state.log_history if "loss" in h or "eval_loss" in h
    ]
    seen = [h["num_tokens"] for h in curve if "num_tokens" in h]  # trl counts the real (non-pad) tokens
    tokens = seen[-1] if seen else (n_tokens * cfg.epochs if cfg.max_steps <= 0 else
                                    n_tokens / len(train_records) * trainer.state.global_step * per_step)
    resumed_step = checkpoint_step(resume) if resume else None
    train_loss = out.training_loss
    logged = [h["loss"] for h in curve if "loss" in h]
    if resumed_step and logged:
        # the trainer averages only the steps of this session; the restored log history has them all
        train_loss = sum(logged) / len(logged)
    result = TrainResult(
        steps=trainer.state.global_step,
        epochs=round(trainer.state.epoch or 0.0, 3),
        train_loss=round(train_loss, 5),
        loss_curve=curve,
        tokens=int(tokens),
        seconds=round(seconds, 2),
        trainable_params=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        adapter_dtype=adapter_dtype,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        resumed_from_step=resumed_step,
        runtime=rt.to_dict(),
        world_size=trainer.args.world_size,
    )
    return trainer.model, result


def to_datasets(train_records: list[dict], eval_records: list[dict] | None):
    """The trainer's datasets: only the pre-tokenised ids and labels of each record."""
    from datasets import Dataset

    cols = ["input_ids", "labels"]
    train_ds = Dataset.from_list([{c: r[c] for c in cols} for r in train_records])
    eval_ds = Dataset.from_list([{c: r[c] for c in cols} for r in eval_records]) if eval_records else None
    return train_ds, eval_ds


def batch_plan(train_records: list[dict], packing: bool, micro_batch: int, grad_accum: int,
               max_length: int | None) -> tuple[int | None, float]:
    """(packed row length or None, records per optimizer step): packed rows hold several records each."""
    n_tokens = sum(len(r["input_ids"]) for r in train_records)
    pack_length = (max_length or max(len(r["input_ids"]) for r in train_records)) if packing else None
    per_step = micro_batch * grad_accum * (pack_length * len(train_records) / n_tokens if pack_length else 1)
    return pack_length, per_step


def sft_config(cfg: TrainConfig, rt: Runtime, output_dir: Path, micro_batch: int, grad_accum: int,
               pack_length: int | None, evaluate: bool, save_steps: int):
    """trl's SFTConfig from the train settings and the runtime decision (device, precision, optimizer)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=micro_batch,
        gradient_accumulation_steps=grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=rt.optim,
        bf16=rt.mixed_precision == "bf16",
        fp16=rt.mixed_precision == "fp16",  # with the Trainer's loss scaling
        use_cpu=not rt.on_gpu,
        gradient_checkpointing=False,  # attach_adapter switched it on already where rt says so
        use_liger_kernel=rt.liger,  # Liger's layer kernels (trl keeps its chunked LM head for the loss)
        max_length=pack_length,  # None unpacked: the prepare stage already applied data.max_length
        packing=cfg.packing,
        padding_free=cfg.joins_rows,  # packing implies it in trl
        logging_steps=cfg.logging_steps,
        eval_strategy="epoch" if evaluate else "no",
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
        # DDP (torchrun): only the adapter trains, every step uses every LoRA parameter
        ddp_find_unused_parameters=False,
    )


def save_adapter(peft_model, tokenizer, out_dir: Path, result: TrainResult) -> None:
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "train_metrics.json").write_text(json.dumps(result.to_dict(), indent=2))
