"""GradPruner's merge applied to a live model: each merged dropped layer's linears are added, top-p by
IGIA and where signs agree (merge.same_sign_merge, pure), into the nearest preceding kept layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...manifest import MergeRecord
from ..surgery import linear_weights_by_layer
from .merge import merge_targets, same_sign_merge


def merged_targets(dropped: Sequence[int], merged: Sequence[int], num_layers: int) -> dict[int, int]:
    """Merged dropped layer → the kept layer it merges into: the only layers a merge changes."""
    return {d: t for d, t in merge_targets(dropped, num_layers).items() if d in set(merged)}


def merge_dropped_layers(
    layers: torch.nn.ModuleList, igia_for_layer, dropped: Sequence[int], merged: Sequence[int], keep_top_p: float
) -> MergeRecord:
    """Same-sign merge of each layer in `merged` (a subset of `dropped`) into its nearest preceding
    kept layer, in place; the record of what was added. `igia_for_layer(i)` returns {linear name: F}
    for dropped layer i."""
    targets = merged_targets(dropped, merged, len(layers))
    linears = linear_weights_by_layer(layers)
    per_layer, total_merged = {}, 0
    for removed, target in targets.items():
        igia = igia_for_layer(removed)
        linear_stats = {}
        for name, removed_linear in linears[removed].items():
            if name not in igia:
                continue  # not LoRA-wrapped, so no IGIA: nothing principled to merge
            kept_linear = linears[target][name]
            with torch.no_grad():
                new_weight, stats = same_sign_merge(kept_linear.weight.data, removed_linear.weight.data, igia[name], keep_top_p)
                kept_linear.weight.data.copy_(new_weight)
            linear_stats[name] = stats.as_dict()
            total_merged += stats.merged_entries
        per_layer[str(removed)] = {
            "into": target,
            "merged_entries": sum(st["merged_entries"] for st in linear_stats.values()),
            "entries": sum(st["entries"] for st in linear_stats.values()),
            "linears": linear_stats,
        }
    return MergeRecord(
        enabled=bool(targets),
        keep_top_p=keep_top_p,
        targets={str(k): v for k, v in targets.items()},
        merged_entries_total=total_merged,
        per_layer=per_layer,
    )
