"""Tables and charts a person looks at: before/after, per part, per category, loss curve; and the
comparison's rows, CSV and quality-vs-memory chart."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

MB = 1e6  # report megabytes as 10^6 bytes, like get_memory_footprint()/1e6 in the tutorial

SHOWN = [("key_accuracy", "key accuracy", True), ("answer_loss", "answer loss", False),
         ("perplexity", "perplexity", False), ("exact_match", "exact match", True),
         ("char_f1", "char F1", True), ("chrf", "chrF", True),
         ("stopped_with_eos", "stops with EOS", True), ("answer_chars", "answer length (chars)", None)]


def _fmt(v, pct: bool | None) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{v:.1%}"
    return f"{v:.3f}" if isinstance(v, float) and abs(v) < 1000 else f"{v:.0f}"


def comparison_rows(summaries: dict[str, dict], group: str = "overall") -> list[dict]:
    """Rows {metric, <model>...} for one group of the aggregates (overall or a part/category)."""
    rows = []
    for key, label, pct in SHOWN:
        row = {"metric": label}
        for name, summary in summaries.items():
            row[name] = _fmt(summary.get(key), pct)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", " ") for c in cols) + " |")
    return "\n".join(lines)


def group_table(results: dict[str, dict], dimension: str, metric: str = "key_accuracy") -> list[dict]:
    """One metric per part or category, one column per model, with counts."""
    names = list(results)
    groups = sorted({g for r in results.values() for g in r["summary"][dimension]})
    rows = []
    for g in groups:
        first = results[names[0]]["summary"][dimension].get(g, {})
        row = {dimension.replace("by_", ""): g, "n": first.get("n", 0)}
        for name in names:
            row[name] = _fmt(results[name]["summary"][dimension].get(g, {}).get(metric), True)
        rows.append(row)
    return rows


def samples_table(results: dict[str, dict], n: int) -> list[dict]:
    names = list(results)
    base_items = results[names[0]]["items"]
    rows = []
    # prefer one sample per part/category so the table shows the range
    seen, order = set(), []
    for i, it in enumerate(base_items):
        tag = (it.get("part"), it.get("category"))
        if tag not in seen:
            seen.add(tag)
            order.append(i)
    order += [i for i in range(len(base_items)) if i not in order]
    for i in order[:n]:
        it = base_items[i]
        row = {"question": it["question"], "reference": it["reference"], "key": " / ".join(it.get("key") or [])}
        for name in names:
            other = results[name]["items"][i]
            mark = "✓" if other.get("key_accuracy") else "✗"
            row[name] = f"{mark} {other['answer'][:160]}"
        rows.append(row)
    return rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_chart(curve: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    train = [(c["step"], c["loss"]) for c in curve if "loss" in c]
    evals = [(c["step"], c["eval_loss"]) for c in curve if "eval_loss" in c]
    if train:
        ax.plot(*zip(*train), label="train loss (answer tokens)", color="#1f77b4")
    if evals:
        ax.plot(*zip(*evals), "o--", label="validation loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("QLoRA training loss")
    ax.grid(alpha=0.3)
    if train or evals:  # a run shorter than logging_steps logs no loss
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bars_chart(results: dict[str, dict], path: Path, dimension: str = "by_part",
               metric: str = "key_accuracy") -> Path:
    """Grouped bars: one group per test part (or category), one bar per model."""
    plt = _plt()
    names = list(results)
    groups = ["overall"] + sorted({g for r in results.values() for g in r["summary"][dimension]})
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(groups) * len(names)), 3.8), dpi=110)
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        s = results[name]["summary"]
        vals = [(s["overall"] if g == "overall" else s[dimension].get(g, {})).get(metric) or 0.0 for g in groups]
        xs = [i + j * width for i in range(len(groups))]
        bars = ax.bar(xs, vals, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in vals], fontsize=7)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(groups))], groups, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"{metric.replace('_', ' ')} {dimension.replace('by_', 'by ')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- the comparison (compare flow): rows, CSV, chart, answers side by side ----------------------

def fmt_ms(s: float | None) -> str:
    return "–" if s is None else f"{s * 1000:.0f}"


def fmt_num(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def fmt_pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def fmt_mb(b: float | None) -> str:
    return "–" if b is None else f"{b / MB:.0f}"


def _with_spread(s: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not s or s.get("median") is None:
        return "–"
    return f"{s['median'] * scale:.{digits}f} ±{s['spread'] * scale:.{digits}f}"


CSV_FIELDS = ["model", "mode", "adapter", "status", "error", "source", "n_params", "dtype", "device", "attn_implementation",
              "load_s", "footprint_mb", "estimated_mb", "peak_load_mb", "peak_gen_mb", "peak_mb", "ttft_ms", "ttft_ms_spread",
              "decode_tps_b1", "decode_tps_b1_spread", "decode_tps_bN", "decode_tps_bN_spread", "batch_N",
              "key_accuracy", "exact_match", "char_f1", "chrf", "answer_loss", "stopped_with_eos", "eval_n"]


def mode_label(row: dict) -> str:
    """The precision, and "+ adapter" for a fine-tuned model run as its adapter on the 4-bit base."""
    return f"{row.get('mode', '?')} + adapter" if row.get("adapter") else str(row.get("mode", "?"))


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
        "model": row.get("model"), "mode": row.get("mode"), "adapter": row.get("adapter"), "status": row.get("status"),
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
            "model": row.get("model", "?"), "mode": mode_label(row),
            "load s": fmt_num(row.get("load_s")),
            "footprint MB": fmt_mb(row.get("footprint_bytes")),
            "est. MB": fmt_mb(row.get("estimated_bytes")),
            "peak MB": fmt_mb(row.get("peak_gen_bytes")),
            "TTFT ms": _with_spread(b1.get("ttft_s"), 1000, 0),
            "tok/s b1": _with_spread(b1.get("decode_tokens_per_s")),
            n_label: _with_spread(bn.get("decode_tokens_per_s")),
            "key acc": fmt_pct(q.get("key_accuracy")),
            "char F1": fmt_num(q.get("char_f1"), 3),
            "chrF": fmt_num(q.get("chrf"), 3),
            "ans. loss": fmt_num(q.get("answer_loss"), 3),
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
    plt = _plt()
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
        points.append((m / MB, q, tps, str(row.get("model")), mode_label(row)))
    label = metric.replace("_", " ")
    ax.set_xlabel("memory footprint (MB)" if memory == "footprint_bytes" else "measured peak (MB)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if not points:
        ax.text(0.5, 0.5, f"no model produced both {label} and a memory figure", ha="center",
                transform=ax.transAxes)
        return set()
    ys = [p[1] for p in points]
    if metric != "answer_loss":
        ax.set_ylim(-0.05, 1.05)
    else:
        ypad = max(0.05, (max(ys) - min(ys)) * 0.1)
        ax.set_ylim(min(ys) - ypad, max(ys) + ypad * 2)
    top = max(p[2] for p in points) or 1.0
    xs = [p[0] for p in points]
    pad = max(1.0, (max(xs) - min(xs)) * 0.15)
    lo, hi = max(0.0, min(xs) - pad), max(xs) + pad * 2
    ax.set_xlim(lo, hi)
    ylo, yhi = ax.get_ylim()
    height_pt = ax.figure.get_figheight() * 72 * ax.get_position().height
    placed: list[tuple[float, float]] = []  # (x, the label's height in points)
    for x, y, tps, name, mode in sorted(points, key=lambda p: (p[1], p[0])):
        # hollow markers, so a point on top of another (same size and score) still shows both rings
        ax.scatter([x], [y], s=40 + 460 * (tps / top), facecolors="none", edgecolors=colors[name], linewidths=1.6)
        # a label goes on the lowest line (10 pt apart) where no nearby label already is; the
        # model is the colour (legend)
        at = (y - ylo) / (yhi - ylo) * height_pt + 4
        k = 0
        while any(abs(px - x) < 0.22 * (hi - lo) and abs(at + 10 * k - py) < 9 for px, py in placed):
            k += 1
        placed.append((x, at + 10 * k))
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
                table.append({"model": row.get("model"), "mode": mode_label(row),
                              "answer": answers[i]["answer"][:300] or "(empty)"})
        out.append((prompt, table))
    return out
