"""The study's paired statistics against brute force, the rule, and the report's paired tables on synthetic records."""

from __future__ import annotations

import dataclasses
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from gradprune_deploy.manifest import GenerationQuality, QualityLedger, QualityPoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "study"))

from mix_table import MIX_ARMS, general_ratio, mix_table  # noqa: E402
from paired import (  # noqa: E402
    ahead_target,
    binomial_se,
    counts,
    discordant,
    gap_target,
    mcnemar_p,
    paired,
    paired_bootstrap_ci,
    paired_diff_se,
    per_row_record,
    pooled_mcnemar_p,
    verdict,
)
from paired_tables import across_seed_table, compare, defaults_table, per_seed_table, targets_table  # noqa: E402
from powered import DEFAULTS_QUESTION, POWERED_ARMS, estimate_seconds  # noqa: E402
from study_report import write_report  # noqa: E402

IDS = [f"row{i}" for i in range(40)]


def record(arm: str, correct: list[int], *, seed: int = 0, task: str = "sst2", ids=IDS) -> dict:
    rows = per_row_record(ids, [bool(c) for c in correct], [0] * len(correct))
    k, n = sum(correct), len(correct)
    return {"task": task, "arm": arm, "seed": seed, "accuracy": k / n, "test_rows": n, "per_row": rows}


def brute_mcnemar(b: int, c: int) -> float:
    """Two-sided exact binomial test at 1/2: the probability of outcomes no more likely than the observed one."""
    n = b + c
    pmf = [math.comb(n, i) / 2**n for i in range(n + 1)]
    return min(1.0, sum(p for p in pmf if p <= pmf[b] * (1 + 1e-7)))


def test_per_row_record_counts_and_se_from_counts():
    r = record("a", [1, 0, 1, 1], ids=IDS[:4])
    assert r["per_row"]["correct"] == "1011" and r["per_row"]["n"] == 4 and len(r["per_row"]["ids_sha256"]) == 64
    assert counts(r) == (3, 4)
    assert counts({"accuracy": 0.82, "test_rows": 200}) == (164, 200)  # a record without per-row outcomes
    assert binomial_se(164, 200) == pytest.approx(math.sqrt(0.82 * 0.18 / 200))
    with pytest.raises(ValueError, match="one each per row"):
        per_row_record(["a"], [True, False], [0, 1])


def test_mcnemar_and_paired_se_match_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        a = [rng.random() < 0.8 for _ in IDS]
        b = [rng.random() < 0.7 for _ in IDS]
        ra, rb = record("a", a), record("b", b)
        only_a = sum(x and not y for x, y in zip(a, b))
        only_b = sum(y and not x for x, y in zip(a, b))
        assert discordant(ra, rb) == (only_a, only_b)
        assert mcnemar_p(only_a, only_b) == pytest.approx(brute_mcnemar(only_a, only_b))
        d = np.array(a, dtype=float) - np.array(b, dtype=float)
        assert paired_diff_se(ra, rb) == pytest.approx(d.std() / math.sqrt(len(d)))
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(10, 0) == pytest.approx(2 / 2**10)


def test_bootstrap_ci_is_seeded_and_covers_the_difference():
    rng = random.Random(1)
    ra = record("a", [int(rng.random() < 0.85) for _ in IDS])
    rb = record("b", [int(rng.random() < 0.6) for _ in IDS])
    low, high = paired_bootstrap_ci(ra, rb, resamples=4000, seed=3)
    assert (low, high) == paired_bootstrap_ci(ra, rb, resamples=4000, seed=3)
    diff = ra["accuracy"] - rb["accuracy"]
    se = paired_diff_se(ra, rb)
    assert low < diff < high
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.25)  # near the normal interval at n = 40


def test_different_rows_are_refused():
    other = record("b", [1] * 40, ids=[f"x{i}" for i in range(40)])
    short = record("c", [1] * 39, ids=IDS[:39])
    for bad in (other, short, {"accuracy": 0.5, "test_rows": 40}):
        assert not paired(record("a", [1] * 40), bad)
    with pytest.raises(ValueError, match="different test rows"):
        discordant(record("a", [1] * 40), other)
    assert compare(record("a", [1] * 40), {"accuracy": 0.5, "test_rows": 40})["paired"] is False


def test_the_rule():
    assert verdict([3.0, 4.0], 0.001).startswith("not established: 2 seed(s)")
    assert verdict([3.0, -4.0, 5.0], 0.001) == "not established: the seeds disagree in sign"
    assert verdict([3.0, 0.0, 5.0], 0.001) == "not established: the seeds disagree in sign"
    assert verdict([1.0, 1.0, 12.0], 0.001).startswith("not established: |mean| 4.7 ≤ SD 6.4")
    assert verdict([4.0, 5.0, 6.0], 0.2) == "not established: pooled McNemar p ≥ 0.05"
    assert verdict([-4.0, -5.0, -6.0], 0.01) == "real: -5.0"


def test_the_targets():
    assert gap_target([-1.0, -2.0], within=2, stretch=1) == "not yet: 2 seed(s), the target needs 3"
    assert gap_target([-0.5, 0.5, -1.5], within=2, stretch=1) == "met, stretch too: gap 0.5 ≤ 1"
    assert gap_target([1.0, 2.0, 3.0], within=2, stretch=1) == "met, stretch too: gap 0.0 ≤ 1"  # ahead of dense
    assert gap_target([-1.0, -2.0, -3.0], within=2, stretch=1) == "met: gap 2.0 ≤ 2 (stretch 1 missed)"
    assert gap_target([-1.0, -2.0, -6.0], within=2, stretch=1) == "missed: gap 3.0 > 2"
    assert ahead_target([4.0, 5.0, 6.0]) == "met: +5.0 > SD 1.0"
    assert ahead_target([1.0, 1.0, 12.0]) == "missed: +4.7 ≤ SD 6.4"
    assert ahead_target([3.0]) == "not yet: 1 seed(s), the target needs 3"


def test_pooled_mcnemar_sums_the_discordant_rows():
    a = [record("a", [1] * 30 + [0] * 10, seed=s) for s in range(3)]
    b = [record("b", [1] * 25 + [0] * 15, seed=s) for s in range(3)]
    assert pooled_mcnemar_p(list(zip(a, b))) == pytest.approx(mcnemar_p(15, 0))


def _grid() -> list[dict]:
    """Three seeds of dense and the defaults question's arms: arm i is right on 40 - 2i - seed rows."""
    results = []
    for seed in range(3):
        for i, arm in enumerate(POWERED_ARMS):
            k = 40 - 3 * i - seed
            timing = {"params": 1e8, "test_loss": 0.2, "compress_seconds": 300.0, "finetune_seconds": 280.0, "finetune_steps": 100}
            extra = {"zero_shot_accuracy": 0.5, "majority_share": 0.5, "peak_rss_mb": 3900.0, **timing}
            results.append({**record(arm, [1] * k + [0] * (40 - k), seed=seed), **extra})
    return results


def test_paired_tables_and_the_defaults_question():
    results = _grid()
    rows = [line for line in per_seed_table(results) if line.startswith("| sst2 |")]
    assert len(rows) == 3 * (len(POWERED_ARMS) - 1)
    # igia-K0@20% (i = 1): 3 rows fewer than dense on every seed, nested, so 0 / 3 discordant, McNemar p = 0.25
    assert "| sst2 | igia-K0@20% | 0 | 92.5 | -7.5 ± 4.2 | 0 / 3 | 0.25 | [-17.5, +0.0] |" in "\n".join(rows)
    across = "\n".join(across_seed_table(results))
    assert "| sst2 | dense | 100.0 (seed 0), 97.5 (seed 1), 95.0 (seed 2) | 97.5 ± 2.5 | – | – | – | – |" in across
    assert "-7.5 (p 0.25) [seed 0], -7.5 (p 0.25) [seed 1], -7.5 (p 0.25) [seed 2] | -7.5 ± 0.0 | 0.0039 | real: -7.5 |" in across
    pairs = [line for line in defaults_table(results) if line.startswith("| sst2 |")]
    assert len(pairs) == len(DEFAULTS_QUESTION) * (len(DEFAULTS_QUESTION) - 1) // 2
    assert pairs[0].startswith("| sst2 | K=0, r8 | K=1, r8 (today's default) | ")
    targets = [line for line in targets_table(results) if line.startswith("| sst2 |")]
    assert len(targets) == len(DEFAULTS_QUESTION) + 1
    # K=0 r8 (i = 1): 3 rows below dense on every seed = -7.5 points; block-influence (the last arm, i = 7) 18 rows below it
    assert targets[0].endswith("| -7.5 ± 0.0 | missed: gap 7.5 > 2 |")
    assert targets[-1].startswith("| sst2 | GradPruner's cut − block-influence's (both K=0, r8) | +45.0 (p 7.6e-06) [seed 0]")
    assert targets[-1].endswith("| +45.0 ± 0.0 | met: +45.0 > SD 0.0 |")


def test_the_report_is_paired_and_falls_back_for_old_records(tmp_path):
    results = _grid()
    old = {k: v for k, v in results[1].items() if k != "per_row"}  # a record from before per-row outcomes
    path = write_report([results[0], old], tmp_path / "r.md", preset=(900, 100, 40, 128), preset_name="cpu", command="--out x --powered")
    text = path.read_text()
    assert "(independent SE)" in text and "scripts/study/quality_study.py --out x --powered" in text
    text = write_report(results, tmp_path / "p.md", preset=(900, 100, 40, 128), preset_name="cpu", command="--powered").read_text()
    headings = ("## The defaults question (20% of layers)", "## The issue's targets", "## Seeds", "## Paired tests vs dense, every seed")
    for heading in (*headings, "The rule"):
        assert heading in text
    assert "(p 0.25)" in text


def test_the_powered_estimate_is_the_measured_seconds():
    assert estimate_seconds([("sst2", "dense", 0), ("fin_headlines", "igia@20%", 2)]) == 359 + 530


def _ledger(task_losses, general_losses, task_rates, general_rates) -> dict:
    """A ledger as compress writes it (the manifest's own dataclasses), stages dense, pruned, recovered."""
    stages = ("dense", "pruned", "recovered")

    def points(losses, rates):
        return [
            QualityPoint(stage=s, loss=x, generation=GenerationQuality(rows=16, repeated_4gram_rate=r))
            for s, x, r in zip(stages, losses, rates)
        ]

    general = points(general_losses, general_rates) if general_losses else []
    return dataclasses.asdict(QualityLedger(points=points(task_losses, task_rates), general_points=general))


def test_mix_table_puts_each_mix_arm_beside_the_no_mix_control_of_its_seed():
    control = {
        **record("igia-general@20%", [1] * 36 + [0] * 4),
        "ledger": _ledger([1.0, 2.0, 1.1], [1.3, 2.6, 1.8], [0.0, 0.2, 0.5], [0.1, 0.3, 0.6]),
    }
    mix = {
        **record("igia-mix@20%", [1] * 35 + [0] * 5),
        "ledger": _ledger([1.0, 2.0, 1.1], [1.3, 2.6, 1.4], [0.0, 0.2, 0.1], [0.1, 0.3, 0.1]),
    }
    far = {
        **record("igia-mixself@20%", [1] * 30 + [0] * 10),
        "ledger": _ledger([1.0, 2.0, 1.2], [1.3, 2.6, 1.45], [0.0, 0.2, 0.1], [0.1, 0.3, 0.1]),
    }
    assert general_ratio(control) == pytest.approx(1.8 / 1.3) and general_ratio(mix) == pytest.approx(1.4 / 1.3)
    lines = mix_table([record("dense", [1] * 40), control, mix, far])
    rows = {line.split(" | ")[2]: line for line in lines[2:]}
    assert list(rows) == MIX_ARMS
    assert (
        "| 90.0 | – | 1.300 → 2.600 → 1.800 | 1.38× | 0.00 → 0.50 | 0.10 → 0.60 | the no-mix control (no on general) |" in rows[MIX_ARMS[0]]
    )
    # 1 row fewer than the control, nested: Δ -2.5, within the 1-point tolerance? no: -2.5 < -1
    assert "-2.5 ±" in rows[MIX_ARMS[1]] and "1.08×" in rows[MIX_ARMS[1]] and rows[MIX_ARMS[1]].endswith("| general yes, task no |")
    assert "1.12×" in rows[MIX_ARMS[2]] and "-15.0 ±" in rows[MIX_ARMS[2]]
    same = {**mix, "per_row": control["per_row"], "accuracy": control["accuracy"]}
    assert mix_table([control, same])[-1].endswith("| yes |")
    assert mix_table([record("dense", [1] * 40)]) == []
