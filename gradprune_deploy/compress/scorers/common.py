"""What several scorers share: batch checks, per-layer gradients, the completion loss.

Gradients are taken with `torch.autograd.grad`, never accumulated into `.grad`, inside
`hooks.preserved_train_state`, so the model is left as it was found.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ...errors import DataError
from ..hooks import Batch, bypassed_layers, forward_kwargs, preserved_train_state
from ..surgery import find_layer_stack


def check_batches(batches: Sequence[Batch], *, need_labels: bool) -> None:
    """A DataError when there is no batch, or (`need_labels`) no completion token to take a loss on."""
    if not batches:
        raise DataError("the scorer got no batches: give --data with at least one row")
    if need_labels and not any(bool((b["labels"] != -100).any()) for b in batches):
        raise DataError("no completion tokens in the scoring batches (every label is -100): check the data's completions")


def layer_gradients(model: nn.Module, batches: Sequence[Batch], *, skip: Sequence[int] = ()) -> list[list[torch.Tensor]]:
    """Per layer, dL/dw for each of its parameters (float32, same order as layer.parameters()),
    where L = sum over batches of the batch's mean completion-token loss. Layers in `skip` are
    bypassed (identity) and get zero gradients. One forward + backward per batch."""
    _, layers = find_layer_stack(model)
    params = [list(layer.parameters()) for layer in layers]
    flat = [p for group in params for p in group]
    totals = [torch.zeros_like(p, dtype=torch.float32) for p in flat]
    with preserved_train_state(model), bypassed_layers(layers, skip), torch.enable_grad():
        for p in flat:
            p.requires_grad_(True)
        for batch in batches:
            if not bool((batch["labels"] != -100).any()):
                continue  # no completion token: its mean loss is undefined (nan)
            loss = model(**forward_kwargs(model, batch, labels=True), use_cache=False).loss
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
            for total, g in zip(totals, grads):
                if g is not None:
                    total += g.float()
    out, start = [], 0
    for group in params:
        out.append(totals[start : start + len(group)])
        start += len(group)
    return out


@torch.no_grad()
def completion_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean completion-token loss over `batches`, every token weighted once."""
    total, tokens = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n:
            total += float(model(**forward_kwargs(model, batch, labels=True), use_cache=False).loss) * n
            tokens += n
    return total / max(tokens, 1)
