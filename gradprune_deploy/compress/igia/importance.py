"""Pure IGIA math (GradPruner, §3): from LoRA gradients to element-level and layer-level importance.

For a LoRA-wrapped linear W (out×in) with adapters B (out×r) and A (r×in), step t gives the
simulated full gradient G_t = ∇B_t · ∇A_t (out×in) and

    F_W = Σ_t G_t ⊙ G_t            (the IGIA matrix, W's shape)
    score(layer) = Σ_{W in layer} Σ_ij F_W[i, j]

Scoring never needs F itself: Σ_ij (∇B ∇A)²_ij = ‖∇B ∇A‖²_F = tr((∇Bᵀ∇B)(∇A∇Aᵀ)), a product of
two r×r matrices. F is materialised only for layers chosen for removal (they need it to pick the
top-p entries to merge), from the per-step factors (t·r·(out+in) numbers per linear).

Two reductions of a step to a layer score (`--igia-reduce`):

    squared   score += ‖∇B_t ∇A_t‖²_F   the paper's formula (Σ of F above)
    norm      score += ‖∇B_t ∇A_t‖_F    the official code (secretflow/ACoLab PaperCode/GradPrune/
                                        layer_important.py: `aa[layer] += torch.norm(torch.mm(b, a))`)

The merge's F is Σ_t (∇B_t ∇A_t)² under both: the official merge (layer_prune/process_important.py)
squares the product whatever the layer score did.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]  # [(∇B_t: out×r, ∇A_t: r×in), ...]
REDUCTIONS = ("squared", "norm")  # squared: the paper's formula; norm: the official code's layer_important.py


def igia_step_total(grad_b: torch.Tensor, grad_a: torch.Tensor) -> float:
    """Σ_ij (∇B ∇A)²_ij computed from r×r products only (no out×in matrix)."""
    gb, ga = grad_b.double(), grad_a.double()
    return float(((gb.T @ gb) * (ga @ ga.T)).sum())


def step_score(grad_b: torch.Tensor, grad_a: torch.Tensor, reduce: str = "squared") -> float:
    """One step's contribution of one linear to its layer's score: ‖∇B ∇A‖²_F (squared) or ‖∇B ∇A‖_F (norm)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    total = igia_step_total(grad_b, grad_a)
    return total if reduce == "squared" else math.sqrt(max(total, 0.0))  # a sum of PSD products: ≥ 0 up to rounding


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
    """Layer score = Σ over the layer's linears of their accumulated step scores (float64, one entry per layer)."""
    scores = torch.zeros(num_layers, dtype=torch.float64)
    for (layer, _name), total in linear_totals.items():
        scores[layer] += total
    return scores
