"""gblm: GBLM-Pruner (Das, Ma, Shen 2023) on a live model. The metric itself is pure
(gblm_metric.py); here hooks and per-row backward passes collect its statistics. `gblm_importance`
also ranks the entries of merged layers under `--merge-criterion gblm` (compress/cut.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ...errors import DataError
from ..hooks import Batch, forward_kwargs, preserved_train_state
from ..surgery import find_layer_stack, linear_weights_by_layer
from .common import check_batches
from .gblm_metric import gblm_metric, layer_total


def _rows(batches: Sequence[Batch]):
    """Each row of each batch without its padding, as a batch of one; rows with no completion token skipped."""
    for batch in batches:
        for r in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][r].sum())
            row = {k: batch[k][r : r + 1, :n] for k in ("input_ids", "attention_mask", "labels")}
            if bool((row["labels"][:, 1:] != -100).any()):
                yield row  # else: the row's mean loss is undefined, and it adds no activations either


def _accumulate(model: nn.Module, batches: Sequence[Batch], linears: dict, input_sq: dict, grad_sq: dict) -> int:
    """Add every row's squared inputs (hooks) and squared per-row gradient; the number of rows used."""
    weights = [mod.weight for mod in linears.values()]

    def make_hook(key):
        def hook(module, args, output):
            x = args[0].detach()
            input_sq[key] += x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)

        return hook

    handles = [mod.register_forward_hook(make_hook(key)) for key, mod in linears.items()]
    samples = 0
    try:
        with preserved_train_state(model), torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            for row in _rows(batches):
                loss = model(**forward_kwargs(model, row, labels=True), use_cache=False).loss
                for key, g in zip(linears, torch.autograd.grad(loss, weights, allow_unused=True)):
                    if g is not None:
                        grad_sq[key] += g.float().pow(2)
                samples += 1
    finally:
        for handle in handles:
            handle.remove()
    return samples


def gblm_importance(
    model: nn.Module, batches: Sequence[Batch], *, layers: Sequence[int] | None = None
) -> dict[int, dict[str, torch.Tensor]]:
    """GBLM-Pruner's metric (gblm_metric.gblm_metric) for every linear of decoder layers `layers` (all
    when None): {layer: {linear name within the layer: [out, in] float32 on the CPU}}.

    Each row of each batch is one calibration sample, as in the official code's batch of one: the
    row without its padding goes forward (hooks add the squares of every linear's input) and
    backward on its own mean completion-token loss (the squared per-sample gradient is added).
    Rows with no completion token are skipped. One forward + backward per row.
    """
    check_batches(batches, need_labels=True)
    _, stack = find_layer_stack(model)
    wanted = range(len(stack)) if layers is None else sorted(set(layers))
    linears = {(i, name): mod for i, by_name in linear_weights_by_layer(stack).items() if i in wanted for name, mod in by_name.items()}
    input_sq = {key: torch.zeros(mod.in_features, dtype=torch.float32, device=mod.weight.device) for key, mod in linears.items()}
    grad_sq = {key: torch.zeros_like(mod.weight, dtype=torch.float32) for key, mod in linears.items()}
    samples = _accumulate(model, batches, linears, input_sq, grad_sq)
    if not samples:
        raise DataError("no row of the scoring batches has a completion token to take a gradient of: check the data's completions")
    out: dict[int, dict[str, torch.Tensor]] = {i: {} for i in wanted}
    for (i, name), mod in linears.items():
        out[i][name] = gblm_metric(mod.weight, input_sq[i, name], grad_sq[i, name], samples).cpu()
    return out


def gblm(model: nn.Module, batches: Sequence[Batch], *, seed: int = 0) -> torch.Tensor:
    """GBLM-Pruner (Das, Ma, Shen 2023) as a layer score: the sum over the layer's linears of the
    GBLM metric |W|*||X_j|| + |W|*100*||G_ij||_2 (gblm_metric.py, the official code's `prune_gblm`),
    from per-row gradients and input norms over `batches`. Deterministic (`seed` unused).
    """
    importance = gblm_importance(model, batches)
    return torch.tensor([layer_total(importance[i]) for i in sorted(importance)], dtype=torch.float64)
