"""Pure IGIA math (GradPruner, §3): from LoRA gradients to element-level and layer-level importance.

For a LoRA-wrapped linear W (out×in) with adapters B (out×r) and A (r×in), step t gives the
simulated full gradient G_t = ∇B_t · ∇A_t (out×in) and

    F_W = Σ_t G_t ⊙ G_t            (the IGIA matrix, W's shape)
    score(layer) = Σ_{W in layer} Σ_ij F_W[i, j]

Scoring never needs F itself: Σ_ij (∇B ∇A)²_ij = ‖∇B ∇A‖²_F = tr((∇Bᵀ∇B)(∇A∇Aᵀ)), a product of
two r×r matrices. F is materialised only for layers chosen for removal (they need it to pick the
top-p entries to merge), from the per-step factors (t·r·(out+in) numbers per linear).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]  # [(∇B_t: out×r, ∇A_t: r×in), ...]


def igia_step_total(grad_b: torch.Tensor, grad_a: torch.Tensor) -> float:
    """Σ_ij (∇B ∇A)²_ij computed from r×r products only (no out×in matrix)."""
    gb, ga = grad_b.double(), grad_a.double()
    return float(((gb.T @ gb) * (ga @ ga.T)).sum())


def igia_matrix(factors: Factors) -> torch.Tensor:
    """F = Σ_t (∇B_t ∇A_t)², the element-level IGIA matrix (float32, W's shape)."""
    if not factors:
        raise ValueError("no probe steps recorded")
    out = None
    for grad_b, grad_a in factors:
        g = (grad_b.double() @ grad_a.double()).square_()  # in place: one out×in float64 temporary per step
        out = g if out is None else out.add_(g)
    return out.float()


def layer_scores(linear_totals: Mapping[tuple[int, str], float], num_layers: int) -> torch.Tensor:
    """Layer score = Σ over the layer's linears of Σ F (float64, one entry per layer)."""
    scores = torch.zeros(num_layers, dtype=torch.float64)
    for (layer, _name), total in linear_totals.items():
        scores[layer] += total
    return scores
