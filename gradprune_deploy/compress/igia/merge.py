"""Pure: sparsify a removed layer by IGIA and merge it into a kept layer where signs agree (GradPruner §3.3).

For each linear of a removed layer: keep exactly the top-p fraction of its entries by F (IGIA);
add those entries into the same linear of the target kept layer only where the removed and kept
weights have the same sign (strictly: product > 0). Norms, biases and everything else of the
kept layer are unchanged. Applied to a live model by apply_merge.merge_dropped_layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class MergeStats:
    entries: int  # entries of the removed linear
    top_p_entries: int  # entries kept by the top-p sparsification
    merged_entries: int  # of those, entries whose sign matched and were added
    delta_norm_ratio: float  # ‖added‖ / ‖kept weight before the merge‖

    def as_dict(self) -> dict:
        return {
            "entries": self.entries,
            "top_p_entries": self.top_p_entries,
            "merged_entries": self.merged_entries,
            "merged_fraction": self.merged_entries / self.entries if self.entries else 0.0,
            "delta_norm_ratio": self.delta_norm_ratio,
        }


def layers_to_merge(dropped: Sequence[int], scores: Sequence[float], count: int | None) -> list[int]:
    """The `count` highest-scoring dropped layers (all when None), ascending.

    GradPruner's ablation merges 1-3 layers: the ones removed beyond what can go without merging,
    i.e. the most important of the dropped set. Ties go to the shallower layer.
    """
    if count is None:
        return sorted(dropped)
    ranked = sorted(dropped, key=lambda i: (-float(scores[i]), i))
    return sorted(ranked[: max(0, count)])


def merge_targets(dropped: Sequence[int], num_layers: int) -> dict[int, int]:
    """Removed layer → nearest preceding kept layer (the following one if none precedes)."""
    dropped_set = set(dropped)
    kept = [i for i in range(num_layers) if i not in dropped_set]
    if not kept:
        raise ValueError("no kept layer to merge into")
    targets = {}
    for d in sorted(dropped_set):
        before = [k for k in kept if k < d]
        targets[d] = before[-1] if before else next(k for k in kept if k > d)
    return targets


def top_p_mask(importance: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Boolean mask of exactly round(p·numel) entries with the largest importance (ties: lower flat index).

    The set a stable descending sort would keep, found by selection instead of a sort: the k-th largest
    value (kthvalue, O(n)), every entry above it, then the first tied entries in flat order. On an
    8B model's MLP linear (59M entries) a sort needs ~1 GB of temporaries; this needs one bool and one
    int64 vector, and runs ~6× faster on CPU. Tensor ops only, so it runs where `importance` lives.
    """
    if not 0 <= keep_fraction <= 1:
        raise ValueError(f"keep fraction must be in [0, 1], got {keep_fraction}")
    flat = importance.reshape(-1)
    n, k = flat.numel(), round(keep_fraction * importance.numel())
    if k == 0 or k == n:
        return torch.full(importance.shape, k == n, dtype=torch.bool, device=importance.device)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest
    above, tied = flat > threshold, flat == threshold
    needed = k - above.sum()  # how many tied entries complete the k, taken in flat order
    return (above | (tied & (tied.cumsum(0) <= needed))).reshape(importance.shape)


def same_sign_merge(
    kept_weight: torch.Tensor, removed_weight: torch.Tensor, importance: torch.Tensor, keep_fraction: float
) -> tuple[torch.Tensor, MergeStats]:
    """Return kept_weight + removed_weight on (top-p by importance) ∧ (same sign); the input is not modified."""
    if not (kept_weight.shape == removed_weight.shape == importance.shape):
        raise ValueError(
            f"shape mismatch: kept {tuple(kept_weight.shape)}, removed {tuple(removed_weight.shape)}, F {tuple(importance.shape)}"
        )
    top = top_p_mask(importance.to(kept_weight.device), keep_fraction)  # F may sit on the CPU, the weights on CUDA
    same_sign = (kept_weight * removed_weight) > 0
    add = top & same_sign
    delta = torch.where(add, removed_weight, torch.zeros_like(removed_weight))
    merged = kept_weight + delta
    kept_norm = float(kept_weight.float().norm())
    stats = MergeStats(
        entries=removed_weight.numel(),
        top_p_entries=int(top.sum()),
        merged_entries=int(add.sum()),
        delta_norm_ratio=float(delta.float().norm()) / kept_norm if kept_norm else 0.0,
    )
    return merged, stats
