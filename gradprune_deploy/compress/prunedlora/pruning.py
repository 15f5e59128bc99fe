"""PrunedLoRA's math: score LoRA rank components, prune the weakest with a recovery update, schedule it.

PrunedLoRA (Yu, Xie, Zhao, Fan, Xue, Zhang, "PrunedLoRA: Robust Gradient-Based structured pruning
for Low-rank Adaptation in Fine-tuning", arXiv:2510.00192, 2025) starts the fine-tune from an
over-parameterised LoRA (rank R0) and, during training, removes rank components (column j of B
together with row j of A) until the target rank r is left; a removed component is never reactivated.
The criterion is the one of the authors' code, github.com/LucasXinYu/PrunedLoRA, optimizer_new.py,
`prune_weight_matrix_prunedlora` (commit 3deb983), and logtrainer.py for the schedule:

Each factor is an n × R weight W with gradient G, written so the rank index runs over columns
(B as it is, out × R; A transposed, in × R). Its rows share one R × R curvature over the rank index,
the gradient outer product (an empirical-Fisher approximation), damped:

    H = GᵀG + λI,   W̃ = W − G H⁻¹   (each row moved by its Newton step −H⁻¹g)

The pruning error of component j — the smallest value of the quadratic model of the loss,
⟨G, Δ⟩ + ½ tr(Δ H Δᵀ), over updates Δ that zero column j, up to a term that is the same for every j
(Optimal Brain Surgeon with a gradient term) — is

    E_j = ½ ‖W̃[:, j]‖² / [H⁻¹]_jj,     score_j = E_j(B) + E_j(Aᵀ)

and the components with the smallest score are pruned. The recovery update is Optimal Brain
Surgeon's compensation (Hassibi & Stork 1993), the minimiser of ½ tr(Δ H Δᵀ) subject to
Δ[:, j] = −W[:, j]:  W ← W − (W[:, j] / [H⁻¹]_jj) · H⁻¹[j, :], applied to B and to Aᵀ, one pruned
component at a time with H⁻¹ downdated in between. Where we differ from the reference code, and why:

- the Newton part of the recovery (−G H⁻¹) is left to the optimizer's own step: with a curvature
  built from one batch's gradient it is a step of size ~1/σ(G) (tiny gradients → huge moves); the
  reference code's own update (`−HB_inv @ gB_j`) does not type-check for out ≠ R, so it gives no
  guidance here;
- λ is relative, `damping` × mean(diag GᵀG) (SparseGPT's 1 percent convention), not the absolute
  1e-6 of the reference code, so the score does not depend on the scale of the loss or of the
  gradients (an absolute λ that dominates GᵀG turns the score into a gradient-norm ranking).

Schedule (the reference code's `AdamWWithPruning(prune_every=10, prune_k=2)` in logtrainer.py; a
summary of the paper names "K1 = 10, K2 = 2" its stable setting, which we read as K1 = interval and
K2 = components per event, the only way those two numbers appear in the code; the paper's own text
was not available to us): every PRUNE_INTERVAL = 10 optimizer steps, PRUNE_PER_EVENT = 2 components
are pruned from every LoRA module, starting at step 10 (not at step 0, where B = 0 makes ∇A = 0 and
the A half of the score carries nothing). Pruning ends by PRUNE_WINDOW = 3/4 of the run, so the last
quarter trains the final rank; a run too short to reach the target rank at 2 per event within that
window prunes more per event (the remaining components spread evenly over the window's events, a
single event at 3/4 of the run when it is shorter than one interval), so every module ends at
exactly the target rank without one large cut on the last step.

No I/O: tensors in, tensors out; callback.PrunedLoRACallback applies it during training.
"""

from __future__ import annotations

import math

import torch

PRUNE_INTERVAL = 10  # K1: optimizer steps between two pruning events
PRUNE_PER_EVENT = 2  # K2: rank components removed from every LoRA module per event
PRUNE_WINDOW = 0.75  # pruning ends by this fraction of the run; the rest trains the final rank
DEFAULT_DAMPING = 0.01  # λ as a fraction of the mean diagonal of GᵀG
_DAMPING_FLOOR = 1e-12  # λ when the gradient is exactly zero (e.g. ∇A while B = 0)


def factor_curvature(grad: torch.Tensor, *, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """H⁻¹ for one factor in rank-last layout (n × R gradient): (GᵀG + λI)⁻¹, float64."""
    g = grad.double()
    h = g.T @ g
    lam = max(damping * float(h.diagonal().mean()), _DAMPING_FLOOR)
    h.diagonal().add_(lam)
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def factor_pruning_error(weight: torch.Tensor, grad: torch.Tensor, h_inv: torch.Tensor) -> torch.Tensor:
    """E_j = ½‖W̃[:, j]‖² / [H⁻¹]_jj with W̃ = W − G H⁻¹, for every column j (rank-last layout)."""
    w_tilde = weight.double() - grad.double() @ h_inv
    return 0.5 * w_tilde.pow(2).sum(0) / h_inv.diagonal()


def component_scores(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    active: torch.Tensor,
    *,
    damping: float = DEFAULT_DAMPING,
) -> torch.Tensor:
    """PrunedLoRA's score of every rank component (R,), +inf for those already pruned.

    lora_a: R × in, lora_b: out × R, their gradients alike; active: bool (R,). Only the active
    components enter the curvature (pruned ones are zero and stay so).
    """
    idx = active.nonzero().squeeze(1)
    scores = torch.full((active.numel(),), float("inf"), dtype=torch.float64, device=lora_b.device)
    if idx.numel() == 0:
        return scores
    total = torch.zeros(idx.numel(), dtype=torch.float64, device=lora_b.device)
    for weight, grad in ((lora_b[:, idx], grad_b[:, idx]), (lora_a[idx].T, grad_a[idx].T)):
        total += factor_pruning_error(weight, grad, factor_curvature(grad, damping=damping))
    scores[idx] = total
    return scores


def obs_remove(weight: torch.Tensor, h_inv: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero column j of a rank-last weight, compensating the other columns (Optimal Brain Surgeon).

    weight: n × c (float64), h_inv: c × c. Returns the new weight (column j exactly 0) and H⁻¹
    with component j eliminated (row/column j zero), for removing the next component.
    """
    row = h_inv[j] / h_inv[j, j]
    weight = weight - weight[:, j : j + 1] * row
    weight[:, j] = 0.0
    h_inv = h_inv - torch.outer(h_inv[:, j], row)
    h_inv[j] = 0.0
    h_inv[:, j] = 0.0
    return weight, h_inv


def prune_components(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    active: torch.Tensor,
    k: int,
    *,
    damping: float = DEFAULT_DAMPING,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Remove the k lowest-scoring active components: (new A, new B, new active mask, pruned indices).

    Scores are computed once per event (as in the reference code); the recovery update is applied
    one component at a time. Inputs are not modified; outputs have the inputs' dtype.
    """
    if k < 0 or k > int(active.sum()):
        raise ValueError(f"cannot prune {k} of {int(active.sum())} active components")
    active = active.clone()
    if k == 0:
        return lora_a.clone(), lora_b.clone(), active, []
    scores = component_scores(lora_a, lora_b, grad_a, grad_b, active, damping=damping)
    pruned = torch.argsort(scores, stable=True)[:k].tolist()
    idx = active.nonzero().squeeze(1)
    local = {int(c): i for i, c in enumerate(idx)}
    new = []
    for weight, grad in ((lora_b[:, idx], grad_b[:, idx]), (lora_a[idx].T, grad_a[idx].T)):
        w, h_inv = weight.double(), factor_curvature(grad, damping=damping)
        for j in pruned:
            w, h_inv = obs_remove(w, h_inv, local[j])
        new.append(w)
    new_b, new_a = lora_b.clone(), lora_a.clone()
    new_b[:, idx] = new[0].to(lora_b.dtype)
    new_a[idx] = new[1].T.to(lora_a.dtype)
    active[pruned] = False
    new_b[:, ~active] = 0.0
    new_a[~active] = 0.0
    return new_a, new_b, active, pruned


def rank_schedule(
    *, start_rank: int, target_rank: int, total_steps: int, interval: int = PRUNE_INTERVAL, per_event: int = PRUNE_PER_EVENT
) -> dict[int, int]:
    """{optimizer step (1-based): components to prune from every module just before that step's update}.

    Every `interval` steps, `per_event` components, until the target rank, all within the first
    PRUNE_WINDOW of the run; when that pace cannot reach the target there, each event prunes
    ceil(left / events) instead (one event at the window's end for a run shorter than an interval).
    """
    if not 1 <= target_rank <= start_rank:
        raise ValueError(f"target rank {target_rank} must be in [1, start rank {start_rank}]")
    if total_steps < 1 or interval < 1 or per_event < 1:
        raise ValueError("total_steps, interval and per_event must be at least 1")
    left = start_rank - target_rank
    if left == 0:
        return {}
    window_end = max(1, round(PRUNE_WINDOW * total_steps))
    steps = list(range(interval, window_end + 1, interval)) or [window_end]
    per_event = max(per_event, -(-left // len(steps)))
    schedule = {}
    for step in steps:
        schedule[step] = min(per_event, left)
        left -= schedule[step]
        if left == 0:
            break
    return schedule


def paper_pace_gap(
    *, start_rank: int, target_rank: int, total_steps: int, interval: int = PRUNE_INTERVAL, per_event: int = PRUNE_PER_EVENT
) -> tuple[int, int] | None:
    """None when rank_schedule keeps the paper's pace (at most `per_event` components every `interval`
    steps); else the two ways back to it: (the largest start rank this run can prune to the target at
    that pace, the fewest optimizer steps that prune start_rank → target_rank at that pace)."""
    schedule = rank_schedule(
        start_rank=start_rank, target_rank=target_rank, total_steps=total_steps, interval=interval, per_event=per_event
    )
    if max(schedule.values(), default=0) <= per_event:
        return None
    events_in_window = max(1, max(1, round(PRUNE_WINDOW * total_steps)) // interval)  # rank_schedule's events
    events_needed = -(-(start_rank - target_rank) // per_event)
    steps = math.ceil(events_needed * interval / PRUNE_WINDOW) - 1
    while round(PRUNE_WINDOW * steps) < events_needed * interval:
        steps += 1
    return target_rank + events_in_window * per_event, steps
