"""The study's figures, from the records quality_study.py and ranking_stability.py write.

- accuracy vs share of layers removed, one line per method (arms named `<method>@<pct>%`), the
  dense fine-tune as a horizontal band (± SE) and the majority label as a dotted line;
- the merge-K ablation at 20% (igia-K0, igia = K1, igia-K2, igia-K3, igia-Kall), other seeds as points;
- the keep-top-p (sparsity) ablation of the merged layer at 20% (igia-p10, igia = p20, igia-p50);
- Kendall τ and dropped-set overlap of the early IGIA ranking against the end-of-run one.

    .venv/bin/python scripts/study/study_plots.py --results docs/study-records/results-cpu.jsonl \\
        --ranking runs/ranking-stability-sst2.json --out docs/figures
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

ARM = re.compile(r"^(?P<method>[A-Za-z0-9-]+)@(?P<pct>\d+)%$")
# layer-selection methods, one line each (and IGIA's cut without the merge, the paper's no-merge limit); the other
# igia-<variant> arms are ablations with their own figures
METHODS = ("igia", "igia-K0", "block-influence", "last-n", "ppl", "gradmap", "taylor", "gblm", "random")
LABELS = {"igia": "igia (GradPruner, K=1 merge)", "igia-K0": "igia, no merge (K=0)"}


def accuracy_vs_cut(records: list[dict], task: str, path: Path) -> Path | None:
    """One line per method; only methods measured at some cut. None when nothing to plot."""
    by_method: dict[str, list[tuple[int, float, float]]] = {}
    dense = next((r for r in records if r["task"] == task and r["arm"] == "dense"), None)
    for r in records:
        m = ARM.match(r["arm"])
        if r["task"] != task or not m or m["method"] not in METHODS or "accuracy" not in r:
            continue
        by_method.setdefault(m["method"], []).append((int(m["pct"]), 100 * r["accuracy"], 100 * r["accuracy_se"]))
    if not by_method:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for method, points in sorted(by_method.items()):
        points.sort()
        ax.errorbar(
            [p[0] for p in points],
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            marker="o",
            capsize=3,
            label=LABELS.get(method, method),
        )
    if dense:
        acc, se = 100 * dense["accuracy"], 100 * dense["accuracy_se"]
        ax.axhspan(acc - se, acc + se, color="grey", alpha=0.25, label=f"dense LoRA {acc:.1f} ± {se:.1f}")
        ax.axhline(100 * dense["majority_share"], color="black", linestyle=":", linewidth=1, label="majority label")
    ax.set_xlabel("layers removed (% of 30)")
    ax.set_ylabel(f"{task} test accuracy % (± SE)")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{task}: accuracy after an equal recovery budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def ablation_bars(records: list[dict], task: str, names: dict[str, str], title: str, path: Path) -> Path | None:
    """Accuracy ± SE per arm of one ablation (arm name -> bar label), seed 0 as bars and any other seed of the
    same arm as a point on its bar; None when fewer than two arms ran with seed 0."""
    runs = [r for r in records if r["task"] == task and "accuracy" in r]
    found = [(label, r) for arm, label in names.items() for r in runs if r["arm"] == arm and r.get("seed", 0) == 0]
    if len(found) < 2:
        return None
    fig, ax = plt.subplots(figsize=(max(4.8, 1.1 * len(found) + 0.8) + 1.6, 3.4), dpi=120)
    labels = [f[0] for f in found]
    ax.bar(labels, [100 * r["accuracy"] for _, r in found], yerr=[100 * r["accuracy_se"] for _, r in found], capsize=4, label="seed 0")
    others = [(names[r["arm"]], r) for r in runs if r["arm"] in names and r.get("seed", 0) != 0 and names[r["arm"]] in labels]
    if others:
        xs, ys = [label for label, _ in others], [100 * r["accuracy"] for _, r in others]
        ax.scatter(xs, ys, color="black", marker="D", zorder=3, label="other seeds")
    dense = next((r for r in runs if r["arm"] == "dense" and r.get("seed", 0) == 0), None)
    if dense:
        ax.axhline(100 * dense["accuracy"], color="grey", linestyle="--", linewidth=1, label="dense LoRA (seed 0)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_ylabel(f"{task} test accuracy %")
    ax.set_ylim(bottom=40)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def merge_k(records: list[dict], task: str, path: Path, pct: int = 20) -> Path | None:
    names = {
        f"igia-K0@{pct}%": "K=0",
        f"igia@{pct}%": "K=1 (default)",
        f"igia-K2@{pct}%": "K=2",
        f"igia-K3@{pct}%": "K=3",
        f"igia-Kall@{pct}%": "K=all",
    }
    return ablation_bars(records, task, names, f"merged layers, igia at {pct}% removed", path)


def keep_top_p(records: list[dict], task: str, path: Path, pct: int = 20) -> Path | None:
    names = {f"igia-p10@{pct}%": "keep 10%", f"igia@{pct}%": "keep 20% (default)", f"igia-p50@{pct}%": "keep 50%"}
    return ablation_bars(records, task, names, f"merged entries kept (top-p by IGIA), igia at {pct}%", path)


def recovery(records: list[dict], task: str, path: Path, pct: int = 20) -> Path | None:
    names = {
        f"igia@{pct}%": "LoRA r8\n(default)",
        f"igia-K0@{pct}%": "r8, no\nmerge",
        f"igia-lora16@{pct}%": "LoRA r16",
        f"igia-K0-lora16@{pct}%": "r16, no\nmerge",
        f"igia-prunedlora16@{pct}%": "PrunedLoRA\n16→8",
        f"igia-K0-prunedlora16@{pct}%": "PrunedLoRA\n16→8, no merge",
        f"igia-prunedlora@{pct}%": "PrunedLoRA\n64→8",
    }
    return ablation_bars(records, task, names, f"recovery of igia's {pct}% cut (K=1 unless said)", path)


def ranking(result: dict, path: Path) -> Path:
    rows = result["stability"]
    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=120)
    steps = [r["informative_steps"] for r in rows]
    ax.plot(steps, [r["kendall_tau"] for r in rows], marker="o", label="Kendall τ-b vs end of run")
    if rows[0].get("kendall_tau_second_half") is not None:
        late = [(s, r["kendall_tau_second_half"]) for s, r in zip(steps, rows) if 2 * s <= result["steps"]]
        ax.plot([s for s, _ in late], [t for _, t in late], marker="s", label="Kendall τ-b vs the second half's IGIA alone")
    for n in rows[0]["dropped_overlap"]:
        ax.plot(steps, [r["dropped_overlap"][n] for r in rows], marker=".", linestyle="--", label=f"overlap of the {n} dropped layers")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"IGIA accumulated over the first N of {result['steps']} steps")
    ax.set_ylim(-0.1, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{result['task']}: early vs end-of-run IGIA ranking (SmolLM2, {result['num_layers']} layers)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="docs/study-records/results-cpu.jsonl")
    parser.add_argument("--ranking", nargs="*", default=[])
    parser.add_argument("--out", default="docs/figures")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    seed0 = [r for r in records if r.get("seed", 0) == 0]  # other seeds: points on the ablation bars, and the report's seed table
    written = []
    for task in dict.fromkeys(r["task"] for r in records):
        written.append(accuracy_vs_cut(seed0, task, out / f"accuracy_vs_cut_{task}.png"))
        written.append(merge_k(records, task, out / f"merge_k_{task}.png"))
        written.append(keep_top_p(records, task, out / f"keep_top_p_{task}.png"))
        written.append(recovery(records, task, out / f"recovery_{task}.png"))
    for path in args.ranking:
        result = json.loads(Path(path).read_text())
        written.append(ranking(result, out / f"ranking_stability_{result['task']}.png"))
    print(json.dumps({"figures": [str(p) for p in written if p]}))


if __name__ == "__main__":
    main()
