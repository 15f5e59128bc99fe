"""Tables and plots for the accuracy study (examples/accuracy_study.py) → docs/results.md."""

from __future__ import annotations

import platform
import statistics
from pathlib import Path


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}"


def write_report(records: list[dict], report: Path, out_dir: Path, *, command: str, preset: str, presets: dict, seconds: float) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [r for r in records if r["arm"] != "kendall"]
    taus = [r for r in records if r["arm"] == "kendall"]
    tasks = sorted({r["task"] for r in arms})
    by = {(r["task"], r["arm"]): r for r in arms}
    arm_names = list(dict.fromkeys(r["arm"] for r in arms))
    mean_acc = {a: _mean([by[(t, a)]["accuracy"] for t in tasks if (t, a) in by]) for a in arm_names}

    lines = ["# Accuracy evidence: GradPruner vs other layer scorers on SmolLM2-135M-Instruct", "",
             f"Measured by `{command}` (preset `{preset}`: per task train rows, test rows, max tokens, batch size = "
             f"{presets}); machine: {platform.machine()}, {platform.processor() or 'CPU'}, Python {platform.python_version()}; "
             f"study wall time {seconds / 60:.1f} min for the arms run in that invocation.", "",
             "## Accuracy (choice log-likelihood on the test split, %)", "",
             "| arm | " + " | ".join(tasks) + " | mean | params | fine-tune/compress s (mean) | peak RSS MB (max) |",
             "|---|" + "---|" * (len(tasks) + 4)]
    for a in arm_names:
        rows = [by.get((t, a)) for t in tasks]
        present = [r for r in rows if r]
        lines.append(f"| {a} | " + " | ".join(_pct(r["accuracy"]) if r else "–" for r in rows)
                     + f" | {_pct(mean_acc[a])} | {present[0].get('params', 0):,} | {_mean([r['seconds'] for r in present]):.0f}"
                     + f" | {max(r['peak_rss_mb'] for r in present):.0f} |")

    cuts = sorted({r["cut"] for r in arms if r["cut"]})
    scorers = list(dict.fromkeys(r["scorer"] for r in arms if r["scorer"]))
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    if "dense" in mean_acc and mean_acc["dense"] is not None:
        ax.axhline(100 * mean_acc["dense"], color="black", linestyle="--", label="dense fine-tuned")
    for name, label in [(f"{s}@{{}}", s) for s in scorers] + [("igia-nomerge@{}", "igia, no merge")]:
        ys = [mean_acc.get(name.format(c)) for c in cuts]
        if any(y is not None for y in ys):
            ax.plot([100 * c for c in cuts], [None if y is None else 100 * y for y in ys], marker="o", label=label)
    ax.set_xlabel("layers removed (%)")
    ax.set_ylabel(f"mean accuracy over {len(tasks)} tasks (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plot = report.parent / "results_accuracy_vs_cut.png"
    fig.savefig(plot)
    plt.close(fig)
    lines += ["", f"![accuracy vs cut]({plot.name})", ""]

    lines += ["## Same-sign merge vs none (mean accuracy, %)", "", "| cut | igia + merge | igia, no merge | Δ |", "|---|---|---|---|"]
    for c in cuts:
        m, n = mean_acc.get(f"igia@{c}"), mean_acc.get(f"igia-nomerge@{c}")
        lines.append(f"| {c:.0%} | {_pct(m)} | {_pct(n)} | {'–' if None in (m, n) else f'{100 * (m - n):+.1f}'} |")
    lines += ["", "## keep-top-p sweep at 30% (mean accuracy, %)", "", "| keep top p | accuracy |", "|---|---|"]
    for p, name in ((0.1, "igia-p0.1@0.3"), (0.2, "igia@0.3"), (0.5, "igia-p0.5@0.3")):
        lines.append(f"| {p:.0%} | {_pct(mean_acc.get(name))} |")
    lines += ["", "## Ranking stability: Kendall τ (probe vs whole first epoch)", "", "| task | probe steps | epoch steps | τ | p |", "|---|---|---|---|---|"]
    for r in taus:
        lines.append(f"| {r['task']} | {r['probe_steps']} | {r['epoch_steps']} | {r['tau']:.3f} | {r['p_value']:.2g} |")

    lines += ["", "## Cost", "", "| task | dense fine-tune s | igia@30% compress s | ratio | probe overhead (IGIA callback / probe time) |", "|---|---|---|---|---|"]
    ratios, overheads = [], []
    for t in tasks:
        d, g = by.get((t, "dense")), by.get((t, "igia@0.3"))
        ratio = g["seconds"] / d["seconds"] if d and g else None
        overhead = g.get("probe_overhead") if g else None
        ratios.append(ratio)
        overheads.append(overhead)
        lines.append(f"| {t} | {d['seconds'] if d else '–'} | {g['seconds'] if g else '–'} | {'–' if ratio is None else f'{ratio:.2f}'} | "
                     f"{'–' if overhead is None else f'{100 * overhead:.2f}%'} |")

    summary = {"tasks": tasks, "mean_accuracy": mean_acc, "kendall_tau": {r["task"]: r["tau"] for r in taus},
               "compress_vs_dense_time": _mean(ratios), "probe_overhead": _mean(overheads)}
    lines += ["", "## Targets", ""]
    for c in [c for c in cuts if c >= 0.3]:
        g, d = mean_acc.get(f"igia@{c}"), mean_acc.get("dense")
        bi, ln = mean_acc.get(f"block-influence@{c}"), mean_acc.get(f"last-n@{c}")
        if None not in (g, d):
            lines.append(f"- {c:.0%} cut: GradPruner {_pct(g)} vs dense {_pct(d)} (Δ {100 * (g - d):+.1f} points; target ≥ −1.0): "
                         f"{'met' if g - d >= -0.01 else 'missed'}.")
        if None not in (g, bi, ln):
            lines.append(f"- {c:.0%} cut: GradPruner − block-influence {100 * (g - bi):+.1f}, − last-n {100 * (g - ln):+.1f} points "
                         f"(target ≥ +3): {'met' if min(g - bi, g - ln) >= 0.03 else 'missed'}.")
    if summary["compress_vs_dense_time"] is not None:
        lines.append(f"- compress / dense fine-tune wall time: {summary['compress_vs_dense_time']:.2f} (target ≤ 0.70): "
                     f"{'met' if summary['compress_vs_dense_time'] <= 0.7 else 'missed'}.")
    if summary["probe_overhead"] is not None:
        lines.append(f"- IGIA callback overhead: {100 * summary['probe_overhead']:.2f}% of probe step time (target ≤ 5%): "
                     f"{'met' if summary['probe_overhead'] <= 0.05 else 'missed'}.")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
    return summary
