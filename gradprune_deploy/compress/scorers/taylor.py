"""taylor: first-order Taylor importance, sum over the layer's parameters of |w * dL/dw|.
`taylor_terms` is the pure math; `taylor` takes the gradients (common.layer_gradients)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..hooks import Batch
from ..surgery import find_layer_stack
from .common import check_batches, layer_gradients


def taylor_terms(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> float:
    """sum over all elements of |w * g| (float64)."""
    return float(sum((w.double() * g.double()).abs().sum() for w, g in zip(weights, grads)))


def taylor(model: nn.Module, batches: Sequence[Batch], *, seed: int = 0) -> torch.Tensor:
    """First-order Taylor importance: sum over the layer's parameters (every weight of the
    decoder layer: attention and MLP linears and the norms) of |w * dL/dw|.

    L is the completion-token loss summed over batches (each batch's mean, as in gradient
    accumulation), so dL/dw is the gradient accumulated over all batches; the absolute value is
    taken after accumulation (the first-order estimate of the loss change when w is zeroed).
    One forward + backward per batch; deterministic (`seed` unused).
    """
    check_batches(batches, need_labels=True)
    _, layers = find_layer_stack(model)
    grads = layer_gradients(model, batches)
    return torch.tensor([taylor_terms([p.detach() for p in layer.parameters()], g) for layer, g in zip(layers, grads)], dtype=torch.float64)
