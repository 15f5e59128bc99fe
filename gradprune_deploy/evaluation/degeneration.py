"""Pure: how degenerate a set of generated answers is (token ids in, numbers out).

A pruned model that lost its language modelling often still scores well on a task's loss or choices
while its free generations loop ("is the largest city in the world is the largest city in the world
is ..."). Two standard measures catch that:

- repeated n-gram rate (Welleck et al. 2020, "seq-rep-n"): within each answer, the fraction of its
  n-grams that already occurred earlier in the same answer; 0 for an answer with no repeats, → 1 for
  a loop. Reported pooled over answers (repeated n-grams / n-grams).
- distinct-n (Li et al. 2016): unique n-grams over all answers / n-grams over all answers.
"""

from __future__ import annotations

from collections.abc import Sequence


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngrams(tokens: Sequence[int], n: int) -> tuple[int, int]:
    """(n-grams that repeat an earlier n-gram of the same answer, n-grams of the answer)."""
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    grams = ngrams(tokens, n)
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats, len(grams)


def repeated_ngram_rate(answers: Sequence[Sequence[int]], n: int = 4) -> float | None:
    """Pooled seq-rep-n over `answers`; None when no answer has n tokens."""
    counts = [repeated_ngrams(a, n) for a in answers]
    total = sum(c for _, c in counts)
    return sum(r for r, _ in counts) / total if total else None


def distinct_n(answers: Sequence[Sequence[int]], n: int = 2) -> float | None:
    """Corpus distinct-n over `answers`; None when no answer has n tokens."""
    grams = [g for a in answers for g in ngrams(a, n)]
    return len(set(grams)) / len(grams) if grams else None
