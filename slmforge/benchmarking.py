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

import csv
import ctypes
import ctypes.util
import io
import logging
import math
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from slmforge.runtime import Runtime

MB = 1e6  # report megabytes as 10^6 bytes, like get_memory_footprint()/1e6 in the tutorial


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


# -- memory ------------------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS. False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def trim_malloc() -> None:
    """Hand memory freed by Python/torch back to the OS (glibc keeps it otherwise, and the next
    model would reuse it without raising the RSS, hiding its cost)."""
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory over a block, relative to its start; `mark(name)` records the peak so far.

    GPU: CUDA peak allocated. CPU: peak RSS delta (see the module docstring). One instance per
    measured block; they do not nest (both the CUDA peak and VmHWM are process-wide).
    """

    def __init__(self, sample_interval_s: float = 0.005):
        self.cuda = torch.cuda.is_available()
        self.interval = sample_interval_s
        self.marks: dict[str, int] = {}
        self.baseline = 0
        self.method = ""
        self._hwm = False
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        trim_malloc()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            self.method = "CUDA peak allocated (torch.cuda.max_memory_allocated) minus allocated at start"
            return self
        self.baseline = rss_bytes()
        self._hwm = reset_peak_rss()
        if self._hwm:
            self.method = "CPU peak RSS delta: kernel high-water mark VmHWM (reset via /proc/self/clear_refs) minus RSS at start"
        else:
            self.method = f"CPU peak RSS delta: RSS sampled every {self.interval * 1000:.0f} ms minus RSS at start"
            self._sampled = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True, name="peak-rss")
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._sampled = max(self._sampled, rss_bytes())

    def peak_bytes(self) -> int:
        """Absolute peak since the start (CUDA allocated or RSS)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._hwm:
            return max((_status_kb("VmHWM") or 0) * 1024, rss_bytes())
        self._sampled = max(self._sampled, rss_bytes())
        return self._sampled

    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes() - self.baseline)

    def mark(self, name: str) -> int:
        self.marks[name] = self.delta_bytes()
        return self.marks[name]

    def __exit__(self, *exc) -> None:
        self.marks.setdefault("end", self.delta_bytes())
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)


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
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


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
            log(f"batch {b}: TTFT {_ms(s['ttft_s']['median'])} ms, decode "
                f"{_num(s['decode_tokens_per_s']['median'])} tokens/s (median of {runs})")
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
                    log: Callable[[str], None] = print) -> dict:
    """Everything the comparison reports for one model × mode, as a JSON-able dict.

    A load failure raises. A failure in a later phase (speed, quality, answers) is recorded in
    `errors` and the other phases still run, unless `reraise(exc)` says it is worth a retry
    (out of memory): then it propagates.
    """
    from slmforge import data as D
    from slmforge import modeling as M
    from slmforge.evaluation import evaluate_model, generate_answers

    quant = {"bf16": ("bf16", True), "fp32": ("fp32", True), "8bit": ("8bit", True), "4bit": ("4bit", True),
             "4bit-nodq": ("4bit", False)}
    load_mode, double_quant = quant[mode]
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
            model = M.load_model(Path(model_dir), load_mode, rt, double_quant=double_quant, cpu_fast_path=True)
            tokenizer = M.load_tokenizer(Path(model_dir))
            row["load_s"] = time.perf_counter() - t0
            row["peak_load_bytes"] = mem.mark("load")
            row["footprint_bytes"] = int(model.get_memory_footprint())
            row["estimated_bytes"] = estimated_footprint(model.config, load_mode, double_quant)
            row["n_params"] = count_parameters(model)
            row["attn_implementation"] = attention_implementation(model)
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
                report = D.Report("compare")
                records = D.tokenize_split(tokenizer, [D.Example(**e) for e in examples], data_cfg, report, "test")
                if not records:
                    raise ValueError(f"no evaluation item fits data.max_length={data_cfg.max_length}")
                result = evaluate_model(model, tokenizer, records, eval_max_new_tokens, eval_batch_size, seed)
                row["quality"] = result["summary"]["overall"]
                row["quality_by_part"] = {k: v for k, v in result["summary"]["by_part"].items()}
                row["eval_items"] = [{k: it[k] for k in ("id", "answer", "key_accuracy", "char_f1", "answer_loss")}
                                     for it in result["items"]]
                q = row["quality"]
                log(f"{mode}: key accuracy {_pct(q.get('key_accuracy'))}, char F1 {_num(q.get('char_f1'), 3)}, "
                    f"answer loss {_num(q.get('answer_loss'), 3)} on {len(records)} items")

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
        del model
        M.free_memory()
        trim_malloc()
    row["status"] = "ok" if not row["errors"] else "partial"
    return row


# -- tables, files, chart ----------------------------------------------------------------------

def _ms(s: float | None) -> str:
    return "–" if s is None else f"{s * 1000:.0f}"


def _num(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def _mb(b: float | None) -> str:
    return "–" if b is None else f"{b / MB:.0f}"


def _with_spread(s: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not s or s.get("median") is None:
        return "–"
    return f"{s['median'] * scale:.{digits}f} ±{s['spread'] * scale:.{digits}f}"


CSV_FIELDS = ["model", "mode", "status", "error", "source", "n_params", "dtype", "device", "attn_implementation",
              "load_s", "footprint_mb", "estimated_mb", "peak_load_mb", "peak_gen_mb", "peak_mb", "ttft_ms", "ttft_ms_spread",
              "decode_tps_b1", "decode_tps_b1_spread", "decode_tps_bN", "decode_tps_bN_spread", "batch_N",
              "key_accuracy", "exact_match", "char_f1", "chrf", "answer_loss", "stopped_with_eos", "eval_n"]


def _speed_of(row: dict, which: str) -> dict:
    """'b1' = the smallest batch size measured, 'bN' = the largest."""
    speed = row.get("speed") or {}
    if not speed:
        return {}
    sizes = sorted(speed.values(), key=lambda s: s["batch_size"])
    return sizes[0] if which == "b1" else sizes[-1]


def flat_row(row: dict) -> dict:
    """One CSV line per model × mode (numbers in MB, ms, tokens/s; errors joined)."""
    b1, bn = _speed_of(row, "b1"), _speed_of(row, "bN")
    q = row.get("quality") or {}

    def r(v, d=3):
        return None if v is None else round(v, d)

    def med(s, key, scale=1.0):
        v = (s.get(key) or {}).get("median")
        return None if v is None else round(v * scale, 3)

    def spr(s, key, scale=1.0):
        v = (s.get(key) or {}).get("spread")
        return None if v is None else round(v * scale, 3)

    return {
        "model": row.get("model"), "mode": row.get("mode"), "status": row.get("status"),
        "error": "; ".join(row.get("errors") or []) or None, "source": row.get("source_label"),
        "n_params": row.get("n_params"), "dtype": row.get("dtype"), "device": row.get("device"),
        "attn_implementation": row.get("attn_implementation"), "load_s": r(row.get("load_s"), 2),
        "footprint_mb": r((row.get("footprint_bytes") or 0) / MB, 1) if row.get("footprint_bytes") else None,
        "estimated_mb": r(row["estimated_bytes"] / MB, 1) if row.get("estimated_bytes") else None,
        "peak_load_mb": r(row["peak_load_bytes"] / MB, 1) if row.get("peak_load_bytes") is not None else None,
        "peak_gen_mb": r(row["peak_gen_bytes"] / MB, 1) if row.get("peak_gen_bytes") is not None else None,
        "peak_mb": r(row["peak_bytes"] / MB, 1) if row.get("peak_bytes") is not None else None,
        "ttft_ms": med(b1, "ttft_s", 1000), "ttft_ms_spread": spr(b1, "ttft_s", 1000),
        "decode_tps_b1": med(b1, "decode_tokens_per_s"), "decode_tps_b1_spread": spr(b1, "decode_tokens_per_s"),
        "decode_tps_bN": med(bn, "decode_tokens_per_s"), "decode_tps_bN_spread": spr(bn, "decode_tokens_per_s"),
        "batch_N": bn.get("batch_size"),
        "key_accuracy": r(q.get("key_accuracy"), 4), "exact_match": r(q.get("exact_match"), 4),
        "char_f1": r(q.get("char_f1"), 4), "chrf": r(q.get("chrf"), 4), "answer_loss": r(q.get("answer_loss"), 4),
        "stopped_with_eos": r(q.get("stopped_with_eos"), 4), "eval_n": q.get("n"),
    }


def display_rows(rows: list[dict]) -> list[dict]:
    """The human table: one line per model × mode, errors in the last column.

    peak MB is the measured peak through loading and the speed runs (inference at the largest
    batch); the evaluation's loss pass (full-vocabulary logits) is in the CSV's peak_mb.
    """
    sizes = sorted({s["batch_size"] for r in rows for s in (r.get("speed") or {}).values()})
    n_label = f"tok/s b{sizes[-1]}" if sizes else "tok/s bN"
    out = []
    for row in rows:
        b1, bn = _speed_of(row, "b1"), _speed_of(row, "bN")
        q = row.get("quality") or {}
        err = "; ".join(row.get("errors") or [])
        out.append({
            "model": row.get("model", "?"), "mode": row.get("mode", "?"),
            "load s": _num(row.get("load_s")),
            "footprint MB": _mb(row.get("footprint_bytes")),
            "est. MB": _mb(row.get("estimated_bytes")),
            "peak MB": _mb(row.get("peak_gen_bytes")),
            "TTFT ms": _with_spread(b1.get("ttft_s"), 1000, 0),
            "tok/s b1": _with_spread(b1.get("decode_tokens_per_s")),
            n_label: _with_spread(bn.get("decode_tokens_per_s")),
            "key acc": _pct(q.get("key_accuracy")),
            "char F1": _num(q.get("char_f1"), 3),
            "chrF": _num(q.get("chrf"), 3),
            "ans. loss": _num(q.get("answer_loss"), 3),
            "attn": row.get("attn_implementation") or "–",
            "error": (err[:200] + "…") if len(err) > 200 else (err or ""),
        })
    return out


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if v is None else v) for k, v in flat_row(row).items()})
    return buf.getvalue()


def quality_memory_chart(rows: list[dict], path: Path, metric: str = "key_accuracy",
                         memory: str = "footprint_bytes") -> Path:
    """Quality (y) vs memory (x), point size = decode tokens/s at batch 1, one label per point.

    Two panels when `metric` is not char F1: key accuracy on a few items is often the same for
    every model (0% on a CPU's 8 items), and char F1 beside it still shows which model answers better.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [metric] + ([] if metric == "char_f1" else ["char_f1"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.4 * len(metrics), 4.4), dpi=110, squeeze=False)
    models = sorted({str(r.get("model")) for r in rows})
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(models)}
    drawn: set[str] = set()
    for ax, m in zip(axes[0], metrics):
        drawn |= _quality_panel(ax, rows, m, memory, colors)
    if drawn:
        from matplotlib.lines import Line2D

        axes[0][0].legend(handles=[Line2D([], [], marker="o", linestyle="", color=colors[n], label=n)
                                   for n in models if n in drawn], fontsize=7, loc="upper left")
    fig.suptitle("quality vs memory (point size = decode tokens/s, batch 1)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _quality_panel(ax, rows: list[dict], metric: str, memory: str, colors: dict) -> set[str]:
    """One scatter of `metric` against `memory`; returns the models it drew."""
    points = []
    for row in rows:
        q = (row.get("quality") or {}).get(metric)
        m = row.get(memory)
        if q is None or m is None:
            continue
        tps = (_speed_of(row, "b1").get("decode_tokens_per_s") or {}).get("median") or 0.0
        points.append((m / MB, q, tps, str(row.get("model")), str(row.get("mode"))))
    label = metric.replace("_", " ")
    ax.set_xlabel("memory footprint (MB)" if memory == "footprint_bytes" else "measured peak (MB)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if not points:
        ax.text(0.5, 0.5, f"no model produced both {label} and a memory figure", ha="center",
                transform=ax.transAxes)
        return set()
    if metric != "answer_loss":
        ax.set_ylim(-0.05, 1.05)
    top = max(p[2] for p in points) or 1.0
    xs = [p[0] for p in points]
    pad = max(1.0, (max(xs) - min(xs)) * 0.15)
    lo, hi = max(0.0, min(xs) - pad), max(xs) + pad * 2
    ax.set_xlim(lo, hi)
    placed: list[tuple[float, float, int]] = []
    for x, y, tps, name, mode in sorted(points, key=lambda p: (p[1], p[0])):
        # hollow markers, so a point on top of another (same size and score) still shows both rings
        ax.scatter([x], [y], s=40 + 460 * (tps / top), facecolors="none", edgecolors=colors[name], linewidths=1.6)
        # a label goes on the lowest line no nearby label uses; the model is the colour (legend)
        used = {lvl for px, py, lvl in placed if abs(px - x) < 0.22 * (hi - lo) and abs(py - y) < 0.06}
        k = next(i for i in range(len(placed) + 1) if i not in used)
        placed.append((x, y, k))
        ax.annotate(f"{mode} · {tps:.1f} tok/s", (x, y), textcoords="offset points",
                    xytext=(10, 4 + 10 * k), fontsize=7, color=colors[name])
    return {p[3] for p in points}


def prompt_answer_tables(rows: list[dict], prompts: Sequence[str]) -> list[tuple[str, list[dict]]]:
    """For each prompt: a table of (model, mode, answer) — the answers side by side."""
    out = []
    for i, prompt in enumerate(prompts):
        table = []
        for row in rows:
            answers = row.get("answers") or []
            if i < len(answers):
                table.append({"model": row.get("model"), "mode": row.get("mode"),
                              "answer": answers[i]["answer"][:300] or "(empty)"})
        out.append((prompt, table))
    return out


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
