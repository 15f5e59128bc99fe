"""The study report's paired tables (arithmetic in paired.py; tested in tests/study/test_paired.py):

- every arm against the dense run of its seed, row by row: Δ ± paired SE, the discordant rows, exact McNemar p, a
  seeded paired-bootstrap 95% CI;
- across seeds: accuracy mean ± SD, the per-seed Δ vs dense with its p, mean Δ ± SD, pooled McNemar p, the rule's verdict;
- the defaults question (powered.py): every pair of K in {0, 1} x rank {8, 16} x PrunedLoRA 16 -> 8, the same way;
- the issue's targets over the seeds: each of those configurations' mean gap to dense, and GradPruner's cut against
  block-influence's.

Records from before per-row outcomes were kept have no paired test: their cells fall back to the independent
binomial SE (said in the cell) and no p-value.
"""

from __future__ import annotations

import itertools

from paired import (
    ahead_target,
    binomial_se,
    counts,
    discordant,
    gap_target,
    mcnemar_p,
    mean_sd,
    paired,
    paired_bootstrap_ci,
    paired_diff_se,
    pooled_mcnemar_p,
    verdict,
)
from powered import CUT_QUESTION, DEFAULTS_QUESTION, STRETCH_GAP, TARGET_GAP

RULE = (
    "The rule (scripts/study/paired.py): a difference is real when at least 3 seeds ran, every seed's paired difference "
    "has the same sign, the mean difference exceeds the across-seed SD of the per-seed differences, and the exact "
    "McNemar test pooled over the seeds (discordant rows summed) gives p < 0.05. One seed is one draw."
)


def accuracy_points(record: dict) -> float:
    k, n = counts(record)
    return 100 * k / n


def se_points(record: dict) -> float:
    return 100 * binomial_se(*counts(record))


def compare(a: dict, b: dict) -> dict:
    """a − b in points: paired (SE, McNemar p, bootstrap CI) when both kept per-row outcomes on the same rows,
    else the independent SE of two binomials."""
    delta = accuracy_points(a) - accuracy_points(b)
    if not paired(a, b):
        return {"delta": delta, "se": (se_points(a) ** 2 + se_points(b) ** 2) ** 0.5, "p": None, "paired": False}
    only_a, only_b = discordant(a, b)
    low, high = paired_bootstrap_ci(a, b)
    return {
        "delta": delta,
        "se": 100 * paired_diff_se(a, b),
        "p": mcnemar_p(only_a, only_b),
        "only": (only_a, only_b),
        "ci": (100 * low, 100 * high),
        "paired": True,
    }


def delta_text(c: dict) -> str:
    """'+2.5 ± 3.1 (p 0.41)' paired; '+2.5 ± 4.0 (independent SE)' otherwise."""
    return f"{c['delta']:+.1f} ± {c['se']:.1f} " + (f"(p {c['p']:.2g})" if c["paired"] else "(independent SE)")


def runs_by_arm(results: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    runs: dict[tuple[str, str], dict[int, dict]] = {}
    for r in results:
        if "accuracy" in r:
            runs.setdefault((r["task"], r["arm"]), {})[r.get("seed", 0)] = r
    return runs


def per_seed_table(results: list[dict]) -> list[str]:
    """Every arm against the dense run of its seed (rows with per-row outcomes only)."""
    runs = runs_by_arm(results)
    lines = []
    for (task, arm), seeds in runs.items():
        dense = runs.get((task, "dense"), {})
        for seed in sorted(seeds):
            if arm == "dense" or seed not in dense or not paired(seeds[seed], dense[seed]):
                continue
            c = compare(seeds[seed], dense[seed])
            lines.append(
                f"| {task} | {arm} | {seed} | {accuracy_points(seeds[seed]):.1f} | {c['delta']:+.1f} ± {c['se']:.1f} | "
                f"{c['only'][0]} / {c['only'][1]} | {c['p']:.2g} | [{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}] |"
            )
    if not lines:
        return []
    return [
        "| task | arm | seed | accuracy % | Δ vs dense ± paired SE | rows only the arm / only dense gets right | McNemar p "
        "| 95% paired bootstrap CI |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        *lines,
    ]


def seed_comparison(a_seeds: dict[int, dict], b_seeds: dict[int, dict]) -> dict | None:
    """a − b over the seeds both ran: per-seed comparisons, mean ± SD of Δ, pooled p (all seeds paired) and the verdict."""
    common = sorted(set(a_seeds) & set(b_seeds))
    if not common:
        return None
    per_seed = {s: compare(a_seeds[s], b_seeds[s]) for s in common}
    deltas = [c["delta"] for c in per_seed.values()]
    all_paired = all(c["paired"] for c in per_seed.values())
    pooled = pooled_mcnemar_p([(a_seeds[s], b_seeds[s]) for s in common]) if all_paired else None
    mean, sd = mean_sd(deltas)
    return {"seeds": common, "per_seed": per_seed, "mean": mean, "sd": sd, "pooled_p": pooled, "verdict": verdict(deltas, pooled)}


def _per_seed_cell(comparison: dict) -> str:
    return ", ".join(
        f"{c['delta']:+.1f}" + (f" (p {c['p']:.2g})" if c["paired"] else "") + f" [seed {s}]" for s, c in comparison["per_seed"].items()
    )


def _mean_cell(comparison: dict) -> str:
    sd = "–" if comparison["sd"] is None else f"{comparison['sd']:.1f}"
    return f"{comparison['mean']:+.1f} ± {sd}"


def _pooled_cell(comparison: dict) -> str:
    return "–" if comparison["pooled_p"] is None else f"{comparison['pooled_p']:.2g}"


def across_seed_table(results: list[dict]) -> list[str]:
    """Arms run with more than one seed: accuracy per seed and mean ± SD, and the paired Δ vs dense of the same seed."""
    runs = runs_by_arm(results)
    lines = [
        "| task | arm | accuracy % per seed | mean ± SD over seeds | Δ vs dense of the same seed (McNemar p) | mean Δ ± SD "
        "| pooled McNemar p | verdict (the rule) |",
        "|---|---|---|---:|---|---:|---:|---|",
    ]
    for (task, arm), seeds in runs.items():
        if len(seeds) < 2:
            continue
        accs = [accuracy_points(seeds[s]) for s in sorted(seeds)]
        mean, sd = mean_sd(accs)
        per_seed = ", ".join(f"{a:.1f} (seed {s})" for s, a in zip(sorted(seeds), accs))
        c = seed_comparison(seeds, runs.get((task, "dense"), {})) if arm != "dense" else None
        cells = (_per_seed_cell(c), _mean_cell(c), _pooled_cell(c), c["verdict"]) if c else ("–", "–", "–", "–")
        lines.append(f"| {task} | {arm} | {per_seed} | {mean:.1f} ± {sd:.1f} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def defaults_table(results: list[dict]) -> list[str]:
    """The defaults question: every pair of its arms that share a seed, A − B per seed, across seeds and the verdict."""
    runs = runs_by_arm(results)
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        present = [(label, runs[(task, arm)]) for label, arm in DEFAULTS_QUESTION if (task, arm) in runs]
        for (label_a, a), (label_b, b) in itertools.combinations(present, 2):
            c = seed_comparison(a, b)
            if c:
                lines.append(
                    f"| {task} | {label_a} | {label_b} | {_per_seed_cell(c)} | {_mean_cell(c)} | {_pooled_cell(c)} | {c['verdict']} |"
                )
    if not lines:
        return []
    return [
        "| task | A | B | A − B per seed, points (McNemar p) | mean ± SD over seeds | pooled McNemar p | verdict (the rule) |",
        "|---|---|---|---|---:|---:|---|",
        *lines,
    ]


def targets_table(results: list[dict]) -> list[str]:
    """The issue's targets per task: every configuration of the defaults question against the dense run of each seed
    (mean gap within TARGET_GAP points, stretch STRETCH_GAP), and GradPruner's cut against block-influence's with the
    same recovery (ahead by more than the across-seed SD)."""
    runs = runs_by_arm(results)
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        dense = runs.get((task, "dense"), {})
        for label, arm in DEFAULTS_QUESTION:
            c = seed_comparison(runs.get((task, arm), {}), dense)
            if c:
                target = gap_target([x["delta"] for x in c["per_seed"].values()], within=TARGET_GAP, stretch=STRETCH_GAP)
                lines.append(f"| {task} | {label} − dense | {_per_seed_cell(c)} | {_mean_cell(c)} | {target} |")
        igia, block = (runs.get((task, arm), {}) for arm in CUT_QUESTION)
        c = seed_comparison(igia, block)
        if c:
            target = ahead_target([x["delta"] for x in c["per_seed"].values()])
            lines.append(
                f"| {task} | GradPruner's cut − block-influence's (both K=0, r8) | {_per_seed_cell(c)} | {_mean_cell(c)} | {target} |"
            )
    if not lines:
        return []
    return [
        f"| task | comparison | per seed, points (McNemar p) | mean ± SD over seeds | target (within {TARGET_GAP:g} of dense, "
        f"stretch {STRETCH_GAP:g}; the cut: ahead by more than the SD) |",
        "|---|---|---|---:|---|",
        *lines,
    ]
