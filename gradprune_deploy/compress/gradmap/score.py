"""`--scorer gradmap`: GradMAP stage 1 on a live model, one backward pass per pruning decision
(the metric and the ranking are pure, ranking.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..hooks import Batch
from ..scorers.common import check_batches, layer_gradients
from ..surgery import find_layer_stack
from .ranking import gradient_magnitude_terms, ranks_from_removal_order

logger = logging.getLogger(__name__)


def gradmap(
    model: nn.Module, batches: Sequence[Batch], *, seed: int = 0, iterative: bool = True, max_decisions: int | None = None
) -> torch.Tensor:
    """GradMAP stage 1 (arXiv 2602.14649): layer importance from gradient magnitudes, one
    backward pass (over `batches`) per pruning decision.

    Metric: the mean |dL/dw| over all parameters of the layer, with L the completion-token loss
    summed over batches (gradient accumulated over batches, magnitude taken after).
    `iterative=True` (default, the paper's procedure as its abstract states it): repeat
    {one backward pass; remove the layer with the smallest metric} on the progressively pruned
    model, removed layers bypassed as identity. Scores are the removal ranks (first removed =
    0), so selection dropping the k lowest reproduces exactly k greedy decisions. That costs one
    backward pass per decision: `max_decisions` (e.g. the number of layers to drop) stops early,
    and the layers never removed are ordered by the last pass's metric. `iterative=False`: a
    single pass, scores = the metric itself.

    Deviations, stated plainly: the paper's full text was not available here, only its abstract
    and summaries; the per-layer aggregate (mean absolute gradient) and the loss (task
    completion loss) are our reading of "a metric based on gradient magnitudes" and may differ in
    normalisation from the paper. Its stage 2 (a projection compensation of the hidden-state mean
    shift, folded into a down-projection) is `--compensate` (compensation.py): a weight change, not
    a score. `seed` is unused (deterministic).
    """
    check_batches(batches, need_labels=True)
    num_layers = len(find_layer_stack(model)[1])
    if not iterative:
        return torch.tensor([gradient_magnitude_terms(g) for g in layer_gradients(model, batches)], dtype=torch.float64)
    decisions = num_layers - 1 if max_decisions is None else max(0, min(max_decisions, num_layers - 1))
    removed: list[int] = []
    metric: dict[int, float] = {}
    for _ in range(max(decisions, 1)):
        grads = layer_gradients(model, batches, skip=removed)
        metric = {i: gradient_magnitude_terms(grads[i]) for i in range(num_layers) if i not in removed}
        if len(removed) == decisions:
            break
        victim = min(metric, key=lambda i: (metric[i], i))
        removed.append(victim)
        logger.debug("gradmap decision %d: remove layer %d (mean |grad| %.3e)", len(removed), victim, metric[victim])
    survivors = {i: metric[i] for i in range(num_layers) if i not in removed}
    return ranks_from_removal_order(removed, survivors, num_layers)
