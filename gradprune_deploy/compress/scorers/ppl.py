"""ppl: Shortened LLaMA (Kim et al. 2024), the loss increase when the layer alone is removed,
measured on the validation rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..hooks import Batch, bypassed_layers, preserved_train_state
from ..surgery import find_layer_stack
from .common import check_batches, completion_loss


@torch.no_grad()
def ppl(model: nn.Module, batches: Sequence[Batch], *, seed: int = 0) -> torch.Tensor:
    """Shortened LLaMA's perplexity criterion: remove each layer alone (identity bypass) and
    measure the completion loss increase over `batches` (the validation rows). One forward pass
    over the batches per layer, plus one for the intact model. Deterministic (`seed` unused).
    Score = loss without the layer − loss with it (log-perplexity increase): higher = more important.
    """
    check_batches(batches, need_labels=True)
    _, layers = find_layer_stack(model)
    with preserved_train_state(model):
        base = completion_loss(model, batches)
        scores = []
        for i in range(len(layers)):
            with bypassed_layers(layers, [i]):
                scores.append(completion_loss(model, batches) - base)
    return torch.tensor(scores, dtype=torch.float64)
