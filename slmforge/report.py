"""Tables and charts a person looks at: before/after, per part, per category, loss curve."""

from __future__ import annotations

from pathlib import Path

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
