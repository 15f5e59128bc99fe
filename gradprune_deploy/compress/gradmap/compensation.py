"""GradMAP stage 2, the math: measure the mean shift pruning causes in the residual stream, fit a
projection compensation on calibration hidden states, and fold it into standard weights.

Source: Liu, Li, Zhang, Tang, "GradMAP: Faster Layer Pruning with Gradient Metric and Projection
Compensation", arXiv 2602.14649 (2026). Its stage 2, as the abstract states it: "we first analyze
the layers with the largest mean shift resulting from pruning, and then incorporate a simple yet
effective projection compensation matrix to correct this drift in one step"; summaries of the paper
add that the matrix acts on the MLP down-projection and is re-parameterised into it. The paper's
full text and code were not reachable from here, so the exact fit below is our reading, stated
plainly:

Positions. Pruned layer j is original layer kept[j]; its output is the residual stream that
original layer kept[j+1] reads, which in the dense model is the output of original layer
kept[j+1] - 1 (the last kept layer: of original layer L - 1). `target_positions` gives that index,
so the shift right before a cut includes the work of the dropped layers.

Mean shift. delta_j = mean over calibration tokens of (h_pruned_j - h_dense_target(j)); the layers
with the largest ||delta_j||_2 are compensated.

Compensation. Layer j's output is h = a + m, with m = down_proj(...) the MLP output and a the
residual stream before it. The compensated output is h' = a + M m + c, with

    (M, c) = argmin  mean_tokens ||y - a - M m - c||^2 + lambda ||M - I||_F^2        (y: dense target)
    M = (C_tm + lambda I)(C_mm + lambda I)^-1,   c = mu_t - M mu_m,   t = y - a,

C_xy the (biased) cross-covariance over calibration tokens, lambda = ridge * tr(C_mm) / d. One
closed-form solve, no training. For every ridge the corrected mean equals the dense mean on the
calibration tokens (mean shift 0 at that layer); ridge -> infinity leaves M = I and c = -delta_j
(the plain mean-shift bias), ridge -> 0 is the unregularised least-squares projection.

Folding. down_proj(x) = W x + b becomes W' = M W, b' = M b + c (`fold_into_linear`): a standard
Linear with a bias, so the config sets `mlp_bias` and every other MLP linear carries a zero bias.

Pure: tensors in, tensors out; no hooks, no models, no I/O (orchestration: compensate.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_RIDGE = 0.05


def target_positions(kept: Sequence[int], num_layers: int) -> list[int]:
    """For each pruned layer j (original index kept[j]), the original layer whose dense output is
    the residual stream the pruned layer's output stands in for: kept[j+1] - 1, or num_layers - 1."""
    kept = list(kept)
    return [kept[j + 1] - 1 if j + 1 < len(kept) else num_layers - 1 for j in range(len(kept))]


def shift_terms(h_pruned: torch.Tensor, h_dense: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum over tokens where mask is 1 of h_pruned - h_dense, float64 [hidden]; number of such tokens).

    h_pruned, h_dense: [batch, seq, hidden]; mask: [batch, seq]."""
    keep = mask.bool()
    diff = (h_pruned.double() - h_dense.double())[keep]
    return diff.sum(0), int(keep.sum())


def mean_shift_norms(sums: Sequence[torch.Tensor], counts: Sequence[int]) -> list[float]:
    """||sum / count||_2 per layer (0 for a layer that saw no token)."""
    return [float((s / n).norm()) if n else 0.0 for s, n in zip(sums, counts)]


def largest_shift_layers(norms: Sequence[float], k: int) -> list[int]:
    """The k layers with the largest mean-shift norm (ties: the shallower first), in depth order."""
    order = sorted(range(len(norms)), key=lambda i: (-norms[i], i))
    return sorted(order[: max(0, min(k, len(norms)))])


@dataclass
class RegressionStats:
    """Sufficient statistics of the per-token regression t ~ M m + c (float64): token count, sums
    of m and t, and the sums of m m^T and t m^T."""

    n: int
    sum_m: torch.Tensor
    sum_t: torch.Tensor
    sum_mm: torch.Tensor
    sum_tm: torch.Tensor

    @classmethod
    def zeros(cls, hidden: int, device=None) -> RegressionStats:
        z = dict(dtype=torch.float64, device=device)
        return cls(
            0, torch.zeros(hidden, **z), torch.zeros(hidden, **z), torch.zeros(hidden, hidden, **z), torch.zeros(hidden, hidden, **z)
        )

    def update(self, m: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> None:
        """Add the tokens where mask is 1; m, t: [batch, seq, hidden], mask: [batch, seq]."""
        keep = mask.bool().to(m.device)
        m, t = m[keep].to(self.sum_m.device, torch.float64), t[keep].to(self.sum_m.device, torch.float64)
        self.n += m.shape[0]
        self.sum_m += m.sum(0)
        self.sum_t += t.sum(0)
        self.sum_mm += m.T @ m
        self.sum_tm += t.T @ m


def fit_projection(stats: RegressionStats, ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """(M [hidden, hidden], c [hidden]), float64: the ridge-to-identity least-squares fit above."""
    if stats.n < 1:
        raise ValueError("no calibration token to fit the compensation on")
    if ridge < 0:
        raise ValueError(f"ridge must be non-negative, got {ridge}")
    mu_m, mu_t = stats.sum_m / stats.n, stats.sum_t / stats.n
    c_mm = stats.sum_mm / stats.n - torch.outer(mu_m, mu_m)
    c_tm = stats.sum_tm / stats.n - torch.outer(mu_t, mu_m)
    d = c_mm.shape[0]
    lam = ridge * float(torch.trace(c_mm)) / d
    eye = torch.eye(d, dtype=torch.float64, device=c_mm.device)
    # M (C_mm + lam I) = C_tm + lam I; C_mm + lam I is symmetric, so solve the transposed system
    lhs = c_mm + lam * eye
    rhs = c_tm + lam * eye
    m_mat = torch.linalg.lstsq(lhs, rhs.T).solution.T if lam == 0 else torch.linalg.solve(lhs, rhs.T).T
    return m_mat, mu_t - m_mat @ mu_m


def fold_into_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, m_mat: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') with W' x + b' = M (W x + b) + c for every x: W' = M W, b' = M b + c (in the weight's dtype)."""
    w = weight.double()
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else bias.double()
    m_mat, c = m_mat.to(w.device, torch.float64), c.to(w.device, torch.float64)
    return (m_mat @ w).to(weight.dtype), (m_mat @ b + c).to(weight.dtype)
