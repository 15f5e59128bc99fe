"""Scorers that need no data: last-n (deepest layers first, the final one kept) and random."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..hooks import Batch
from ..surgery import find_layer_stack


def last_n(model: nn.Module, batches: Sequence[Batch] = (), *, seed: int = 0) -> torch.Tensor:
    """Deepest layers least important, the final layer most important; no data needed.

    Layer i < L-1 scores L-1-i, layer L-1 scores L: dropping the k lowest removes L-1-k .. L-2
    (the common "drop the last layers but keep the final one" baseline).
    """
    num_layers = len(find_layer_stack(model)[1])
    scores = torch.tensor([num_layers - 1 - i for i in range(num_layers)], dtype=torch.float64)
    scores[-1] = float(num_layers)
    return scores


def random_scores(model: nn.Module, batches: Sequence[Batch] = (), *, seed: int = 0) -> torch.Tensor:
    """A uniformly random permutation of 0..L-1, reproducible for a given seed."""
    num_layers = len(find_layer_stack(model)[1])
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_layers, generator=generator).to(torch.float64)
