"""block-influence: ShortGPT (Men et al. 2024), BI_l = E[1 - cos(h_in, h_out)] over the non-padding
tokens of the task data. `block_influence_terms` is the pure math; `block_influence` the hooks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..hooks import Batch, forward_kwargs, preserved_train_state
from ..surgery import find_layer_stack
from .common import check_batches


def block_influence_terms(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(sum of 1 - cos(h_in, h_out) over tokens where mask is 1, number of such tokens).

    h_in, h_out: [batch, seq, hidden]; mask: [batch, seq]. Computed in float64.
    """
    cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1, eps=1e-12)
    keep = mask.bool()
    return float((1.0 - cos)[keep].sum()), int(keep.sum())


@torch.no_grad()
def block_influence(model: nn.Module, batches: Sequence[Batch], *, seed: int = 0) -> torch.Tensor:
    """ShortGPT Block Influence: BI_l = mean over non-padding tokens of 1 - cos(h_in_l, h_out_l).

    A layer that barely turns the hidden state (cos ~ 1) has low BI and is dropped first.
    Forward hooks read each decoder layer's input and output hidden states; one forward pass
    per batch; deterministic (`seed` unused). Deviation from the paper: tokens are the task's
    prompt+completion rows rather than a generic calibration corpus, and padding is excluded.
    """
    check_batches(batches, need_labels=False)
    _, layers = find_layer_stack(model)
    sums, counts = [0.0] * len(layers), [0] * len(layers)
    current_mask: list[torch.Tensor] = []

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            s, n = block_influence_terms(h_in, h_out, current_mask[0])
            sums[index] += s
            counts[index] += n

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with preserved_train_state(model):
            for batch in batches:
                kwargs = forward_kwargs(model, batch, labels=False)
                current_mask[:] = [kwargs["attention_mask"]]
                model(**kwargs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.tensor([s / max(n, 1) for s, n in zip(sums, counts)], dtype=torch.float64)
