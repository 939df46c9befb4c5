"""Measuring one model in one precision: load time, memory, speed, answer quality, sample answers.

Plain functions, no Prefect (the compare flow's tasks wrap them), so a bare GPU machine with only
the ML stack can run them too.

How each number is taken:
- **load time**: wall time of `load_model` + `load_tokenizer` (weights from the local
  materialised checkpoint; disk cache warm or not, as it comes).
- **footprint**: `model.get_memory_footprint()` — parameters and buffers as held, the
  tutorial's number.
- **measured peak** (`PeakMemory`): on GPU, `torch.cuda.max_memory_allocated()` after
  `reset_peak_memory_stats()` (what PyTorch's allocator handed out, not what it reserved). On CPU,
  the peak resident set size of the process minus its RSS just before loading, after `gc` and
  `malloc_trim(0)` so memory freed by the previous model goes back to the OS first. The peak is
  read exactly from the kernel's high-water mark (`VmHWM`, reset by writing `5` to
  `/proc/self/clear_refs`, Linux ≥ 4.0); where that reset is not allowed, a thread samples RSS
  every 5 ms instead (then a peak shorter than that can be missed). RSS counts everything the
  process touched meanwhile: weights, activations and KV cache, tokenizer, Python objects.
- **time to first token** (TTFT): from calling `generate` to the streamer receiving the first new
  token (prefill + one step), batch 1.
- **decode tokens/s**: new tokens after the first, over the time between the first and the last
  new token, times the batch size (all sequences in the batch count). Generation is forced to
  exactly `new_tokens` tokens (`min_new_tokens`), greedy; `warmup` untimed runs, then `runs`
  timed ones; the median and the spread (half the range, max-min over 2) are reported.
- **quality**: `evaluate_model` (greedy answers + answer loss) on the evaluation records,
  tokenised with this model's own chat template.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from slmforge.records import generation_prompt_ids
from slmforge.evaluation import left_pad
from slmforge.peak_memory import PeakMemory, trim_malloc
from slmforge.report import MB, fmt_ms, fmt_num, fmt_pct
from slmforge.runtime import Runtime



# -- statistics --------------------------------------------------------------------------------

def summarise(values: Iterable[float | None]) -> dict:
    """Median, min, max and spread (half the range) of repeated measurements; None values ignored."""
    vals = sorted(float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))
    if not vals:
        return {"median": None, "min": None, "max": None, "spread": None, "n": 0}
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1],
            "spread": (vals[-1] - vals[0]) / 2, "n": len(vals)}


def generation_timing(t_start: float, token_times: Sequence[float], batch_size: int) -> dict:
    """Timings of one `generate` call from the times the streamer saw each new token.

    ttft_s: first new token - start. decode_tokens_per_s: the tokens after the first, over the time
    they took, times the batch size (None with fewer than two new tokens).
    """
    if not token_times:
        raise ValueError("no new tokens were generated")
    ttft = token_times[0] - t_start
    steps = len(token_times) - 1
    decode_s = token_times[-1] - token_times[0]
    tps = batch_size * steps / decode_s if steps > 0 and decode_s > 0 else None
    total_s = token_times[-1] - t_start
    return {"ttft_s": ttft, "decode_tokens_per_s": tps, "new_tokens": len(token_times),
            "total_s": total_s, "e2e_tokens_per_s": batch_size * len(token_times) / total_s if total_s > 0 else None}


# -- speed -------------------------------------------------------------------------------------

class TimingStreamer:
    """A `generate` streamer that only notes when each piece arrives (first put = the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:  # called with the prompt, then with each new token (on the host)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def chat_prompt_ids(tokenizer, text: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return generation_prompt_ids(tokenizer, messages)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def time_generate(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, pad_id: int,
                  eos_id: int | None) -> dict:
    """One greedy `generate` of exactly `new_tokens` tokens per sequence, timed per token."""
    device = next(model.parameters()).device
    streamer = TimingStreamer()
    ids, mask = ids.to(device), mask.to(device)
    _sync()
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id, streamer=streamer)
    _sync()
    return generation_timing(t0, streamer.times[1:], ids.shape[0])


def measure_speed(model, tokenizer, prompts: Sequence[str], batch_sizes: Sequence[int], new_tokens: int,
                  runs: int, warmup: int, system: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """TTFT and decode tokens/s per batch size: `warmup` untimed runs, then `runs` timed runs.

    A batch of b takes the first b prompts (repeated when there are fewer), left-padded.
    """
    encoded = [chat_prompt_ids(tokenizer, p, system) for p in prompts]
    out = {}
    for b in batch_sizes:
        batch = [encoded[i % len(encoded)] for i in range(b)]
        ids, mask = left_pad(batch, tokenizer.pad_token_id)
        for _ in range(warmup):
            time_generate(model, ids, mask, new_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id)
        timings = [time_generate(model, ids, mask, new_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id)
                   for _ in range(runs)]
        out[str(b)] = {
            "batch_size": b,
            "prompt_tokens": int(mask.sum(1).max()),
            "new_tokens": timings[0]["new_tokens"],
            "ttft_s": summarise(t["ttft_s"] for t in timings),
            "decode_tokens_per_s": summarise(t["decode_tokens_per_s"] for t in timings),
            "e2e_tokens_per_s": summarise(t["e2e_tokens_per_s"] for t in timings),
        }
        if log:
            s = out[str(b)]
            log(f"batch {b}: TTFT {fmt_ms(s['ttft_s']['median'])} ms, decode "
                f"{fmt_num(s['decode_tokens_per_s']['median'])} tokens/s (median of {runs})")
    return out


def count_parameters(model) -> int:
    """Parameters of the unquantized model: a bitsandbytes 4-bit tensor stores two per byte, so its
    own numel() is half the real count; its quant_state keeps the original shape."""
    total = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        total += math.prod(qs.shape) if qs is not None and getattr(qs, "shape", None) is not None else p.numel()
    return total


def attention_implementation(model) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "unknown")


class _OncePerMessage(logging.Filter):
    """bitsandbytes logs 'MatMul8bitLt: inputs will be cast ...' on every 8-bit matmul (thousands of
    lines, and time) when the activations are not fp16, as on CPU: let each message through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


_BNB_FILTER = _OncePerMessage()


def quiet_bitsandbytes() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if _BNB_FILTER not in log.filters:
        log.addFilter(_BNB_FILTER)


def preload_code(model_dir: str | Path, quantized: bool) -> None:
    """Import the model's Python modules (and bitsandbytes) before measuring, so the first model
    measured is not charged for code every later one finds already imported."""
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(str(model_dir)))]
        if quantized:
            import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - loading will report the real problem
        pass


def estimated_footprint(config, load_mode: str, double_quant: bool) -> int | None:
    """What `slmforge.memory` predicts `get_memory_footprint()` to be, from the architecture alone.

    Shown beside the measured footprint, so every comparison checks the estimator the selection
    guide relies on. Unquantized modules (embeddings, norms, lm_head) of an 8/4-bit model stay in
    the load dtype of `modeling.load_model`: bf16 on GPU, float32 on CPU.
    """
    from slmforge.memory import ModelShape, weight_bytes
    from slmforge.modeling import on_gpu

    precision = {"bf16": "bf16", "fp32": "fp32", "8bit": "int8", "4bit": "nf4"}.get(load_mode)
    if precision is None:
        return None
    try:
        shape = ModelShape.from_config(config)
    except (TypeError, ValueError):  # a config without the sizes the estimator reads: no estimate
        return None
    return int(weight_bytes(shape, precision, double_quant=double_quant,
                            other_dtype="bf16" if on_gpu() else "fp32", include_quant_state=False))


# -- one model in one mode ---------------------------------------------------------------------

def benchmark_model(model_dir: str | Path, mode: str, *, examples: list[dict], data_cfg, prompts: Sequence[str],
                    eval_max_new_tokens: int, eval_batch_size: int, speed_new_tokens: int,
                    batch_sizes: Sequence[int], runs: int, warmup: int, answer_max_new_tokens: int,
                    rt: Runtime, seed: int = 0,
                    reraise: Callable[[BaseException], bool] = lambda e: False,
                    log: Callable[[str], None] = print, adapter_dir: str | Path | None = None) -> dict:
    """Everything the comparison reports for one model × mode, as a JSON-able dict.

    `adapter_dir`: a LoRA adapter to run, unmerged, on `model_dir`, a checkpoint saved in 4-bit
    (mode "4bit"): a QLoRA model as trained. Its footprint and estimate include the adapter.

    A load failure raises. A failure in a later phase (speed, quality, answers) is recorded in
    `errors` and the other phases still run, unless `reraise(exc)` says it is worth a retry
    (out of memory): then it propagates.
    """
    from slmforge import data as D
    from slmforge import readers as RD
    from slmforge import records as RC
    from slmforge import modeling as M
    from slmforge.evaluation import evaluate_model, generate_answers

    quant = {"bf16": ("bf16", True), "fp32": ("fp32", True), "8bit": ("8bit", True), "4bit": ("4bit", True),
             "4bit-nodq": ("4bit", False)}
    load_mode, double_quant = quant[mode]
    if adapter_dir is not None and mode != "4bit":
        raise ValueError(f"an adapter is measured on its saved 4-bit base (mode 4bit), not in {mode}")
    row: dict = {"mode": mode, "errors": []}
    model = None
    preload_code(model_dir, load_mode in ("8bit", "4bit"))
    quiet_bitsandbytes()
    try:
        with PeakMemory() as mem:
            row["memory_method"] = mem.method
            t0 = time.perf_counter()
            # inference only: bitsandbytes' AVX512-bf16 kernel where the CPU has it (about 2x the
            # unpacked path's generation speed on such a CPU), as a user of 4-bit inference gets it
            if adapter_dir is None:
                model = M.load_model(Path(model_dir), load_mode, rt, double_quant=double_quant, cpu_fast_path=True)
                tokenizer = M.load_tokenizer(Path(model_dir))
            else:
                from peft import PeftModel

                base = M.load_model(Path(model_dir), "saved", rt, cpu_fast_path=True)
                double_quant = bool(getattr(base.config.quantization_config, "bnb_4bit_use_double_quant", True))
                model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
                tokenizer = M.load_tokenizer(Path(adapter_dir))
            row["load_s"] = time.perf_counter() - t0
            row["peak_load_bytes"] = mem.mark("load")
            row["footprint_bytes"] = int(model.get_memory_footprint())
            row["estimated_bytes"] = estimated_footprint(model.config, load_mode, double_quant)
            # what the adapter adds (exact, from its weights); the parameter count is the base's
            extra = [p for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n]
            if extra and row["estimated_bytes"] is not None:
                row["estimated_bytes"] += sum(p.numel() * p.element_size() for p in extra)
            row["n_params"] = count_parameters(model) - sum(p.numel() for p in extra)
            row["attn_implementation"] = attention_implementation(model)
            row["attn_reason"] = rt.for_load(M.load_dtype(load_mode, rt)).reasons.get("attn")
            row["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
            row["device"] = str(next(model.parameters()).device)
            row["torch_threads"] = torch.get_num_threads()
            log(f"{mode}: loaded in {row['load_s']:.1f} s, footprint {row['footprint_bytes'] / MB:.0f} MB, "
                f"attention {row['attn_implementation']}")

            def phase(name: str, fn: Callable[[], None]) -> None:
                t = time.perf_counter()
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - recorded in the row; the other phases go on
                    if reraise(e):
                        raise
                    row["errors"].append(f"{name}: {type(e).__name__}: {e}")
                    log(f"{mode}: {name} failed: {type(e).__name__}: {e}")
                row[f"{name}_s"] = time.perf_counter() - t

            def speed() -> None:
                row["speed"] = measure_speed(model, tokenizer, prompts, batch_sizes, speed_new_tokens, runs, warmup,
                                             data_cfg.system_prompt, log=lambda m: log(f"{mode}: {m}"))

            def quality() -> None:
                report = RD.Report("compare")
                records = RC.tokenize_split(tokenizer, [D.Example(**e) for e in examples], data_cfg, report, "test")
                if not records:
                    raise ValueError(f"no evaluation item fits data.max_length={data_cfg.max_length}")
                result = evaluate_model(model, tokenizer, records, eval_max_new_tokens, eval_batch_size, seed)
                row["quality"] = result["summary"]["overall"]
                row["quality_by_part"] = {k: v for k, v in result["summary"]["by_part"].items()}
                row["eval_items"] = [{k: it[k] for k in ("id", "answer", "key_accuracy", "char_f1", "answer_loss")}
                                     for it in result["items"]]
                q = row["quality"]
                log(f"{mode}: key accuracy {fmt_pct(q.get('key_accuracy'))}, char F1 {fmt_num(q.get('char_f1'), 3)}, "
                    f"answer loss {fmt_num(q.get('answer_loss'), 3)} on {len(records)} items")

            def answers() -> None:
                recs = [{"prompt_ids": chat_prompt_ids(tokenizer, p, data_cfg.system_prompt)} for p in prompts]
                got = generate_answers(model, tokenizer, recs, answer_max_new_tokens, len(recs), seed)
                row["answers"] = [{"prompt": p, "answer": a["answer"], "new_tokens": a["new_tokens"]}
                                  for p, a in zip(prompts, got)]

            phase("speed", speed)
            row["peak_gen_bytes"] = mem.mark("generation")
            phase("quality", quality)
            phase("answers", answers)
            row["peak_bytes"] = mem.mark("end")
    finally:
        model = None  # the last reference, so free_memory can release it
        M.free_memory()
        trim_malloc()
    row["status"] = "ok" if not row["errors"] else "partial"
    return row


@contextmanager
def torch_threads(n: int | None):
    """Run a block with `n` torch CPU threads (None: leave as is), restoring the number after."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_average() -> float | None:
    """The machine's 1-minute load average (other work running slows CPU measurements)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def environment() -> dict:
    import platform

    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # noqa: BLE001
        info["bitsandbytes"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, " \
                         f"{torch.get_num_threads()} torch threads"
    return info
