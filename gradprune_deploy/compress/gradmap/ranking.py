"""GradMAP stage 1, the math: a layer's gradient-magnitude metric, and scores from a greedy
removal order. Pure: tensors and numbers in, tensors out (orchestration: score.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gradient_magnitude_terms(grads: Sequence[torch.Tensor]) -> float:
    """Mean |g| over all elements of a layer's parameters (float64)."""
    numel = sum(g.numel() for g in grads)
    return float(sum(g.double().abs().sum() for g in grads) / numel)


def ranks_from_removal_order(removed: Sequence[int], survivor_scores: dict[int, float], num_layers: int) -> torch.Tensor:
    """Scores from a greedy removal sequence: the t-th layer removed scores t, survivors score
    above every removed layer, ordered among themselves by `survivor_scores`. Dropping the k
    lowest therefore drops exactly the first k layers removed."""
    scores = torch.empty(num_layers, dtype=torch.float64)
    for t, layer in enumerate(removed):
        scores[layer] = float(t)
    survivors = sorted(survivor_scores, key=lambda i: (survivor_scores[i], i))
    for rank, layer in enumerate(survivors):
        scores[layer] = float(len(removed) + rank)
    return scores
