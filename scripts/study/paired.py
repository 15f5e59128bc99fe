"""Paired statistics for the quality study: arms of a task are scored on the same test rows, so compare them row by row.

Pure functions over the records quality_study.py writes (tested in tests/study/test_paired.py):
- `per_row_record`: an arm's per-row outcome, compact — correctness as a 0/1 string in test-row order, the predicted
  choice indices, and the row ids' count and SHA-256, so two arms scored on different rows are refused;
- `counts`, `binomial_se`: the accuracy's k of n and its SE from those counts (never from a rounded percentage);
- `discordant`, `mcnemar_p`: the exact McNemar test (two-sided binomial on the discordant pairs);
- `paired_diff_se`, `paired_bootstrap_ci`: the SE and a seeded bootstrap CI of the accuracy difference;
- `verdict`: THE RULE for "a difference is real" across seeds (below).

The rule. Over the seeds of a comparison (each seed: both arms run with that seed, scored on the same rows):
a difference is real when (1) at least MIN_SEEDS seeds ran, (2) every seed's paired difference has the same sign
(none zero), (3) the mean difference exceeds the across-seed SD of the per-seed differences, and (4) the exact
McNemar test pooled over the seeds (discordant pairs summed) gives p < ALPHA. (1)-(3) ask that it holds on another
run — with 3 seeds, mean > SD is t > 1.73 over seeds — and (4) that it is more than the test rows' noise. Seeds
of the same arm share the test rows, so the pooled test counts each row once per seed: it is a check of the
direction, not an exact p-value of the seeds' mean.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest

MIN_SEEDS = 3
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 10_000


def row_ids_sha256(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def per_row_record(ids: Sequence[str], correct: Sequence[bool], predicted: Sequence[int]) -> dict:
    """What the study keeps of one arm's evaluation, row by row, in test-row order."""
    if not len(ids) == len(correct) == len(predicted):
        raise ValueError(f"{len(ids)} ids, {len(correct)} outcomes and {len(predicted)} predictions: one each per row")
    return {
        "n": len(ids),
        "ids_sha256": row_ids_sha256(ids),
        "correct": "".join("1" if c else "0" for c in correct),
        "predicted": [int(p) for p in predicted],
    }


def counts(record: dict) -> tuple[int, int]:
    """(k correct, n rows): from the per-row outcomes when kept, else from the accuracy and the row count (an
    accuracy k/n is exact in floating point to far better than 1/(2n), so rounding recovers k)."""
    rows = record.get("per_row")
    if rows:
        return rows["correct"].count("1"), rows["n"]
    n = record["test_rows"]
    return round(record["accuracy"] * n), n


def binomial_se(k: int, n: int) -> float:
    """SE of an accuracy k/n: sqrt(p(1-p)/n)."""
    return math.sqrt(k * (n - k) / n) / n


def _bits(record: dict) -> np.ndarray:
    return np.frombuffer(record["per_row"]["correct"].encode(), dtype=np.uint8) - ord("0")


def check_same_rows(a: dict, b: dict) -> None:
    """Both records carry per-row outcomes on the same rows, or ValueError."""
    ra, rb = a.get("per_row"), b.get("per_row")
    if not ra or not rb:
        raise ValueError("a paired comparison needs both arms' per-row outcomes")
    if ra["n"] != rb["n"] or ra["ids_sha256"] != rb["ids_sha256"]:
        raise ValueError(f"different test rows ({ra['n']} vs {rb['n']} rows, ids {ra['ids_sha256'][:12]} vs {rb['ids_sha256'][:12]})")


def paired(a: dict, b: dict) -> bool:
    """Whether `a` and `b` can be compared row by row."""
    try:
        check_same_rows(a, b)
    except ValueError:
        return False
    return True


def discordant(a: dict, b: dict) -> tuple[int, int]:
    """(rows only `a` gets right, rows only `b` gets right)."""
    check_same_rows(a, b)
    x, y = _bits(a), _bits(b)
    return int(np.sum((x == 1) & (y == 0))), int(np.sum((x == 0) & (y == 1)))


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: the discordant pairs as a binomial with p = 1/2 (1.0 with none)."""
    total = only_a + only_b
    return 1.0 if total == 0 else float(binomtest(only_a, total, 0.5).pvalue)


def paired_diff_se(a: dict, b: dict) -> float:
    """SE of accuracy(a) - accuracy(b) over shared rows: the SD of the per-row differences (-1, 0, +1) / sqrt(n)."""
    only_a, only_b = discordant(a, b)
    n = a["per_row"]["n"]
    mean = (only_a - only_b) / n
    return math.sqrt(max(0.0, (only_a + only_b) / n - mean**2) / n)


def paired_bootstrap_ci(
    a: dict, b: dict, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of accuracy(a) - accuracy(b), resampling rows (both arms' outcome of a row together)."""
    check_same_rows(a, b)
    diff = _bits(a).astype(np.int8) - _bits(b).astype(np.int8)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def pooled_mcnemar_p(pairs: Sequence[tuple[dict, dict]]) -> float:
    """Exact McNemar over several seeds' pairs, their discordant counts summed."""
    only_a = only_b = 0
    for a, b in pairs:
        x, y = discordant(a, b)
        only_a, only_b = only_a + x, only_b + y
    return mcnemar_p(only_a, only_b)


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample SD (None below two values)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def verdict(deltas: Sequence[float], pooled_p: float | None, *, min_seeds: int = MIN_SEEDS, alpha: float = ALPHA) -> str:
    """THE RULE (module docstring) on per-seed paired differences (a - b, any unit) and the pooled McNemar p."""
    if len(deltas) < min_seeds:
        return f"not established: {len(deltas)} seed(s), the rule needs {min_seeds}"
    if not (all(d > 0 for d in deltas) or all(d < 0 for d in deltas)):
        return "not established: the seeds disagree in sign"
    mean, sd = mean_sd(deltas)
    if abs(mean) <= sd:
        return f"not established: |mean| {abs(mean):.1f} ≤ SD {sd:.1f} over seeds"
    if pooled_p is None or pooled_p >= alpha:
        return "not established: pooled McNemar p ≥ 0.05" if pooled_p is not None else "not established: no per-row outcomes"
    return f"real: {mean:+.1f}"


def gap_target(deltas: Sequence[float], *, within: float, stretch: float, min_seeds: int = MIN_SEEDS) -> str:
    """Issue 23's first target on per-seed paired differences arm - dense (points): the mean gap to dense within
    `within` points (stretch: `stretch`), over at least `min_seeds` seeds. An arm ahead of dense has no gap."""
    if len(deltas) < min_seeds:
        return f"not yet: {len(deltas)} seed(s), the target needs {min_seeds}"
    gap = max(0.0, -statistics.mean(deltas))
    if gap <= stretch:
        return f"met, stretch too: gap {gap:.1f} ≤ {stretch:g}"
    if gap <= within:
        return f"met: gap {gap:.1f} ≤ {within:g} (stretch {stretch:g} missed)"
    return f"missed: gap {gap:.1f} > {within:g}"


def ahead_target(deltas: Sequence[float], *, min_seeds: int = MIN_SEEDS) -> str:
    """Issue 23's second target on per-seed paired differences a - b: a ahead of b by more than the across-seed SD."""
    if len(deltas) < min_seeds:
        return f"not yet: {len(deltas)} seed(s), the target needs {min_seeds}"
    mean, sd = mean_sd(deltas)
    return f"met: {mean:+.1f} > SD {sd:.1f}" if mean > sd else f"missed: {mean:+.1f} ≤ SD {sd:.1f}"
