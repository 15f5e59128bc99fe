"""The quality study's report: tables and the issue's targets, computed from the records quality_study.py writes.

Pure arithmetic on those records (tested in tests/study/); the paired comparisons are paired_tables.py's.
Accuracies and SEs come from the counts (k correct of n rows), never from rounded percentages.
"""

from __future__ import annotations

import math
from pathlib import Path

from mix_table import MIX_NOTE, mix_table
from paired_tables import (
    RULE,
    accuracy_points,
    across_seed_table,
    compare,
    defaults_table,
    delta_text,
    per_seed_table,
    se_points,
    targets_table,
)


def step_seconds(record: dict) -> float:
    return record["finetune_seconds"] / max(1, record["finetune_steps"])


def cost(record: dict, dense: dict) -> dict:
    """compress seconds / dense fine-tune seconds, and the pruned/dense step-time ratio beside it."""
    return {"ratio": record["compress_seconds"] / dense["compress_seconds"], "step_ratio": step_seconds(record) / step_seconds(dense)}


def targets(task_records: dict[str, dict]) -> list[str]:
    """One line per target of the quality issue for one task, saying met or missed, with numbers."""
    dense = task_records.get("dense")
    if not dense:
        return []
    lines = []
    for arm, limit in (("igia@20%", 1.0), ("igia@30%", 3.0)):
        r = task_records.get(arm)
        if r:
            gap = compare(dense, r)
            met = gap["delta"] <= limit
            lines.append(f"- {arm} within {limit:g} point(s) of dense: {'met' if met else 'missed'} (gap {delta_text(gap)})")
    best = task_records.get("igia@30%")
    for base in ("block-influence@30%", "last-n@30%", "ppl@30%"):
        r = task_records.get(base)
        if best and r:
            lead = compare(best, r)
            met = lead["delta"] > lead["se"]
            lines.append(f"- igia@30% ahead of {base} by more than 1 SE: {'met' if met else 'missed'} ({delta_text(lead)})")
    for arm in ("igia@20%", "igia@30%", "igia@40%"):
        r = task_records.get(arm)
        if r:
            c = cost(r, dense)
            ok = c["ratio"] <= c["step_ratio"] + 0.05 and (arm != "igia@40%" or c["ratio"] <= 0.70)
            extra = " and ≤ 0.70" if arm == "igia@40%" else ""
            lines.append(
                f"- {arm} compress/dense wall time {c['ratio']:.2f} ≤ step ratio {c['step_ratio']:.2f} + 0.05{extra}: "
                f"{'met' if ok else 'missed'}"
            )
    return lines


def _ledger_cell(ledger: dict | None) -> str:
    if not ledger:
        return "–"
    points = {p["stage"]: p for p in ledger["points"]}
    return " → ".join(f"{points[s]['loss']:.2f}" for s in ("dense", "pruned", "recovered") if s in points)


def task_table(records: list[dict]) -> list[str]:
    by_arm = {r["arm"]: r for r in records}
    dense = by_arm.get("dense")
    lines = [
        "| arm | layers dropped | merged into | params | accuracy % | Δ vs dense (McNemar p) | test loss "
        "| ledger loss dense → pruned → recovered | compress s | cost ratio (step ratio) | peak RSS MB |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in records:
        delta = delta_text(compare(r, dense)) if dense and r is not dense else "–"
        c = cost(r, dense) if dense and r is not dense else None
        cost_cell = f"{c['ratio']:.2f} ({c['step_ratio']:.2f})" if c else "1.00"
        merged = ", ".join(f"{k}→{v}" for k, v in (r.get("merge_targets") or {}).items()) or "–"
        lines.append(
            f"| {r['arm']} | {r.get('layers_dropped', '–')} | {merged} | {r['params'] / 1e6:.1f}M | "
            f"{accuracy_points(r):.1f} ± {se_points(r):.1f} | {delta} | {r['test_loss']:.3f} | "
            f"{_ledger_cell(r.get('ledger'))} | {r['compress_seconds']:.0f} | "
            f"{cost_cell} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    return lines


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None below 3 pairs or with a constant side."""
    if len(x) != len(y) or len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


RECOVERY_FLAGS = {"--distill", "--finetune", "--compensate"}


def _stage_loss(record: dict, stage: str) -> float | None:
    points = {p["stage"]: p for p in (record.get("ledger") or {}).get("points", [])}
    return points[stage]["loss"] if stage in points else None


def predictors(records: list[dict]) -> list[str]:
    """Does the validation loss right after the cut (what `--drop-layers auto` measures) order the
    arms as their post-recovery test accuracy does? And `--scorer auto`'s healed loss (judge arms)?"""
    # only arms that differ in their cut: a different recovery (distillation, PrunedLoRA, compensation) changes
    # the outcome of the same cut, which no pre-recovery measurement can see
    same_recovery = [r for r in records if not set(r.get("extra", [])) & RECOVERY_FLAGS]
    arms = [r for r in same_recovery if r.get("ledger") and _stage_loss(r, "pruned") is not None]
    lines = []
    if len(arms) >= 3:
        pre = [_stage_loss(r, "pruned") for r in arms]
        acc = [-r["accuracy"] for r in arms]  # lower loss should mean higher accuracy: correlate loss with -accuracy
        rho = spearman(pre, acc)
        rho_rec = spearman([_stage_loss(r, "recovered") for r in arms], acc)
        lines += [
            f"Pre-recovery validation loss vs post-recovery test accuracy over {len(arms)} pruned arms with the same CE recovery: "
            "Spearman ρ(loss, −accuracy) = "
            + (f"{rho:+.2f}" if rho is not None else "n/a")
            + " (+1: the loss right after the cut orders the arms exactly as their final accuracy); the recovered ledger loss: "
            + (f"{rho_rec:+.2f}" if rho_rec is not None else "n/a")
            + ".",
            "",
        ]
    by_arm = {r["arm"]: r for r in records}
    for judge in (r for r in records if "judge" in r):
        pct = judge["arm"].split("@")[1]
        lines += [
            f"`--scorer auto` at {pct} ({judge['drop']} layers): each scorer's cut as auto judges it (validation loss right after the "
            "cut and after its 10-step LoRA heal), beside that scorer's arm after the full recovery:",
            "",
            "| scorer | layers dropped | loss after cut | loss after heal | arm's test accuracy % |",
            "|---|---|---:|---:|---:|",
        ]
        for p in judge["proposals"]:
            arm = by_arm.get(f"{p['scorer']}@{pct}")
            healed = f"{p['healed']['loss']:.2f}" if p.get("healed") else "–"
            accuracy = f"{accuracy_points(arm):.1f} ± {se_points(arm):.1f}" if arm else "not run"
            lines.append(f"| {p['scorer']} | {p['dropped']} | {p['raw']['loss']:.2f} | {healed} | {accuracy} |")
        lines.append("")
    return lines


def machine_note(results: list[dict]) -> str:
    """Where the timings come from: the device every record names (the CPU when a record predates the field)."""
    devices = sorted({r.get("device", "cpu") for r in results})
    if devices == ["cpu"]:
        return (
            "Measured on a shared 2-core CPU: wall times carry noise from other jobs, and "
            "docs/results.md names the arms that ran beside other jobs (their cost lines are not evidence)."
        )
    return f"Measured on {', '.join(devices)}; docs/results.md says what shared the device (wall times move with it)."


def write_report(results: list[dict], path: Path, *, preset: tuple, preset_name: str, command: str) -> Path:
    rows, steps, test_rows, max_length = preset
    seeds = sorted({r.get("seed", 0) for r in results}) or [0]
    out = [
        f"# Quality study: GradPruner on SmolLM2-135M-Instruct ({preset_name} preset)",
        "",
        f"Command: `.venv/bin/python scripts/study/quality_study.py {command}` "
        f"(resumable). Every arm: {rows} rows of the task's train.jsonl (10% seeded validation slice held out → "
        f"the ledger), {steps} optimizer steps of batch 8, max {max_length} tokens, seed(s) {', '.join(map(str, seeds))}; "
        f"accuracy by choice log-likelihood on the first {test_rows} test rows or all where a task has fewer (± binomial SE "
        "from the counts k of n; Δ vs dense ± the paired SE over the shared test rows with the exact McNemar p, or the "
        "independent SE where a record predates per-row outcomes). "
        "Cost ratio = (scoring + surgery + recovery seconds) / dense LoRA fine-tune seconds; step ratio = pruned/dense "
        "seconds per optimizer step. " + machine_note(results),
        "",
    ]
    out += _seed_sections(results)
    first_seed = [r for r in results if r.get("seed", 0) == seeds[0]]  # the tables below: the first seed; all seeds at the end
    for task in dict.fromkeys(r["task"] for r in first_seed):
        out += _task_section(task, [r for r in first_seed if r["task"] == task], seeds[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))
    return path


def _seed_sections(results: list[dict]) -> list[str]:
    """The paired comparisons: the defaults question, every arm across seeds, every arm vs its seed's dense run."""
    out = []
    defaults = defaults_table(results)
    if defaults:
        out += ["## The defaults question (20% of layers)", "", RULE, ""] + defaults + [""]
    targets = targets_table(results)
    if targets:
        out += ["## The issue's targets (20% of layers, mean over at least 3 seeds)", ""] + targets + [""]
    seeds = across_seed_table(results)
    if seeds:
        out += ["## Seeds", "", "Arms run with more than one seed (`--seed N`); each Δ is against the dense run of the same seed.", ""]
        out += ([RULE, ""] if not defaults else []) + seeds + [""]
    mix = mix_table(results)
    if mix:
        out += ["## A recovery that keeps the model general (--mix-data bundled:gsm8k)", "", MIX_NOTE, ""] + mix + [""]
    per_seed = per_seed_table(results)
    if per_seed:
        out += ["## Paired tests vs dense, every seed", ""] + per_seed + [""]
    return out


def _task_section(task: str, results: list[dict], seed: int) -> list[str]:
    records = [r for r in results if "judge" not in r]
    by_arm = {r["arm"]: r for r in records}
    out = [f"## {task}" + (f" (seed {seed})" if seed else ""), ""]
    if "dense" in by_arm:
        d = by_arm["dense"]
        out += [
            f"Zero-shot {100 * d['zero_shot_accuracy']:.1f}%, majority label {100 * d['majority_share']:.1f}% of the "
            f"{d['test_rows']} test rows, dense LoRA fine-tune {accuracy_points(d):.1f} ± {se_points(d):.1f}%.",
            "",
        ]
    out += task_table(records) + [""]
    lines = targets(by_arm)
    if lines:
        out += ["Targets:", ""] + lines + [""]
    lines = predictors(results)
    if lines:
        out += ["Predictors of post-recovery quality:", ""] + lines
    return out
