"""The powered comparison behind the defaults (issue 23): which merge K and recovery rank should `compress` default to?

At 20% of layers (6 of 30) on sst2 and fin_headlines, cpu preset, seeds 0, 1, 2, every arm beside the dense fine-tune
of its seed: K in {0, 1} x LoRA rank in {8, 16}, and PrunedLoRA 16 -> 8 with K = 1 and K = 0. `quality_study.py
--powered` runs exactly this grid (resumable, one thread per arm by default, each arm's weights deleted once it is
scored: 48 checkpoints would take ~25 GB) and writes its raw records to
docs/study-records/powered.jsonl (committed: the numbers stay traceable) and its report to docs/study-powered.md.
"""

from __future__ import annotations

POWERED_TASKS = ["sst2", "fin_headlines"]
POWERED_SEEDS = [0, 1, 2]
POWERED_RESULTS = "docs/study-records/powered.jsonl"
POWERED_REPORT = "docs/study-powered.md"


def powered_paths(preset: str) -> tuple[str, str]:
    """(records, report) of the grid at a preset: the cpu preset's above, the gpu preset's beside them."""
    if preset == "cpu":
        return POWERED_RESULTS, POWERED_REPORT
    return POWERED_RESULTS.replace(".jsonl", f"-{preset}.jsonl"), POWERED_REPORT.replace(".md", f"-{preset}.md")


# The defaults question: (label, arm) in the order the report's pairwise table uses.
DEFAULTS_QUESTION = [
    ("K=0, r8", "igia-K0@20%"),
    ("K=1, r8 (today's default)", "igia@20%"),
    ("K=0, r16", "igia-K0-lora16@20%"),
    ("K=1, r16", "igia-lora16@20%"),
    ("K=1, PrunedLoRA 16→8", "igia-prunedlora16@20%"),
    ("K=0, PrunedLoRA 16→8", "igia-K0-prunedlora16@20%"),
]
# The targets at 20% of layers, over >= 3 seeds: every configuration's mean gap to dense within TARGET_GAP
# points (stretch: STRETCH_GAP, the paper's claim); GradPruner's cut ahead of block-influence's by more than the
# across-seed SD, both recovered alike (no merge, rank 8) so that only the cut differs.
TARGET_GAP = 2.0
STRETCH_GAP = 1.0
CUT_QUESTION = ("igia-K0@20%", "block-influence@20%")
POWERED_ARMS = ["dense"] + [arm for _, arm in DEFAULTS_QUESTION] + ["block-influence@20%"]

# Compress seconds per arm, measured: docs/study.md's sst2 table (cpu preset, seed 0, 2 threads; igia@20% ran beside
# other jobs). The two K = 0 arms new in this grid are taken as their K = 1 counterparts' (the merge is ~1 s).
MEASURED_SECONDS = {
    "dense": 359,
    "igia-K0@20%": 307,
    "igia@20%": 530,
    "igia-lora16@20%": 287,
    "igia-K0-lora16@20%": 287,
    "igia-prunedlora16@20%": 304,
    "igia-K0-prunedlora16@20%": 304,
    "block-influence@20%": 335,
}


def estimate_seconds(runs: list[tuple[str, str, int]]) -> int:
    """Compress seconds of the (task, arm, seed) runs still to do, from MEASURED_SECONDS (sst2's, for every task:
    the fin_headlines arms that ran alone took 0.7-1.2x their sst2 counterparts). Evaluation time is not in it."""
    return sum(MEASURED_SECONDS[arm] for _, arm, _ in runs)


def estimate_line(runs: list[tuple[str, str, int]]) -> str:
    seconds = estimate_seconds(runs)
    return (
        f"{len(runs)} runs to do: ~{seconds / 3600:.1f} h of compress at the measured 2-thread seconds (docs/study.md), "
        f"up to {2 * seconds / 3600:.1f} h on one thread, plus two evaluations of 200 test rows per run"
    )
