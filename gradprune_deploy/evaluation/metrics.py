"""Pure scoring rules for `gradprune eval`: answer normalisation, exact match, choice accuracy,
token-weighted loss. Plain Python on lists and floats, no model, no I/O.

Exact-match normalisation (documented contract, used by both backends):
- both strings are stripped of surrounding whitespace; `case_fold=True` also case-folds them;
- final-answer mode (GSM8K style, `#### 18`): only the text after the LAST `####` is compared,
  taking its first line, dropping `$` and thousands separators `,`, and a trailing `.`.
  A prediction without `####` has no final answer and never matches.
  `final_answer="auto"` turns the mode on for a row exactly when its reference contains `####`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

FINAL_ANSWER_MARKER = "####"


def extract_final_answer(text: str) -> str | None:
    """The answer after the last `####` (see module docstring), or None when there is none."""
    if FINAL_ANSWER_MARKER not in text:
        return None
    tail = text.rsplit(FINAL_ANSWER_MARKER, 1)[1].strip()
    first_line = tail.splitlines()[0] if tail else ""
    return first_line.replace(",", "").replace("$", "").strip().rstrip(".").strip()


def normalise(text: str, *, case_fold: bool = False) -> str:
    text = text.strip()
    return text.casefold() if case_fold else text


def uses_final_answer(reference: str, mode: str) -> bool:
    """Whether a row is compared by final answer: mode is "auto", "always" or "never"."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    return FINAL_ANSWER_MARKER in reference


def exact_match(prediction: str, reference: str, *, case_fold: bool = False, final_answer: str = "auto") -> bool:
    if uses_final_answer(reference, final_answer):
        pred, ref = extract_final_answer(prediction), extract_final_answer(reference)
        if ref is None:  # "always" on a reference without ####: compare whole strings
            ref, pred = reference, prediction
        if pred is None:
            return False
        return normalise(pred, case_fold=case_fold) == normalise(ref, case_fold=case_fold)
    return normalise(prediction, case_fold=case_fold) == normalise(reference, case_fold=case_fold)


def choice_scores(logprob_sums: Sequence[float], token_counts: Sequence[int], *, length_normalize: bool) -> list[float]:
    """Per-choice score: the summed log-likelihood, or its mean per token when length-normalised."""
    if not length_normalize:
        return [float(s) for s in logprob_sums]
    return [float(s) / n for s, n in zip(logprob_sums, token_counts)]


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one wins a tie (deterministic)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def confusion_counts(golds: Sequence[str], preds: Sequence[str]) -> dict[str, dict[str, int]]:
    """{gold label: {predicted label: count}}, keys sorted for stable JSON."""
    counts = Counter(zip(golds, preds))
    out: dict[str, dict[str, int]] = {}
    for (gold, pred), n in sorted(counts.items()):
        out.setdefault(gold, {})[pred] = n
    return out


def accuracy(hits: Sequence[bool]) -> float:
    return sum(bool(h) for h in hits) / len(hits) if hits else float("nan")


def mean_token_loss(nll_sums: Sequence[float], token_counts: Sequence[int]) -> tuple[float, float]:
    """(mean negative log-likelihood per completion token over the whole set, perplexity).

    Token-weighted: every completion token counts once, so long completions weigh more than
    short ones (the same average as the training loss over one epoch without padding).
    """
    total_tokens = sum(token_counts)
    if total_tokens == 0:
        return float("nan"), float("nan")
    loss = sum(nll_sums) / total_tokens
    return loss, math.exp(loss) if loss < 700 else float("inf")
