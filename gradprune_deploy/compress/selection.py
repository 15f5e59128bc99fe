"""Pure: layer scores + a budget → the layers to drop (the lowest-scoring ones).

Budgets: a ratio of layers, a count, or a target parameter count. The first/last k layers can be
protected. Ties are broken deterministically toward the deeper layer (deeper blocks are the more
redundant ones in the layer-pruning literature; any fixed rule would do).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError


def drop_count_from_ratio(ratio: float, num_layers: int) -> int:
    if num_layers < 1:
        raise ConfigError("the model has no decoder layers (num_hidden_layers=0): there is nothing to prune; check --model")
    if not 0 < ratio < 1:
        raise ConfigError(f"--drop-ratio must be between 0 and 1 (exclusive), got {ratio}")
    n = round(ratio * num_layers)
    if n < 1:
        raise ConfigError(f"--drop-ratio {ratio} drops no layer of {num_layers}: raise it to at least {1 / num_layers:.3f}")
    if n >= num_layers:
        raise ConfigError(f"--drop-ratio {ratio} would leave no layer of {num_layers}: lower it")
    return n


def rank_for_removal(scores: torch.Tensor, candidates: Sequence[int]) -> list[int]:
    """Candidates from least to most important; equal scores: deeper layer first."""
    return sorted(candidates, key=lambda i: (float(scores[i]), -i))


def select_layers_to_drop(
    scores: torch.Tensor,
    *,
    drop_count: int | None = None,
    drop_ratio: float | None = None,
    target_params: int | None = None,
    layer_params: Sequence[int] | None = None,
    total_params: int | None = None,
    protect_first: int = 0,
    protect_last: int = 0,
) -> list[int]:
    """Indices (ascending) of the layers to remove. Exactly one budget must be given.

    `target_params` drops least-important layers until the model has at most that many
    parameters; it needs `layer_params` (parameters per layer) and `total_params`.
    """
    num_layers = len(scores)
    if num_layers < 1:
        raise ConfigError("the model has no decoder layers (num_hidden_layers=0): there is nothing to prune; check --model")
    given = [b is not None for b in (drop_count, drop_ratio, target_params)]
    if sum(given) != 1:
        raise ConfigError("give exactly one of --drop-ratio, --drop-layers or --target-params")
    if protect_first < 0 or protect_last < 0:
        raise ConfigError("--protect-first/--protect-last must be ≥ 0")
    candidates = [i for i in range(protect_first, num_layers - protect_last)]
    order = rank_for_removal(scores, candidates)

    if target_params is not None:
        if layer_params is None or total_params is None:
            raise ValueError("target_params needs layer_params and total_params")
        return _drop_to_target_params(order, target_params, layer_params, total_params, num_layers)
    if drop_ratio is not None:
        drop_count = drop_count_from_ratio(drop_ratio, num_layers)
    _check_drop_count(drop_count, num_layers, len(candidates))
    return sorted(order[:drop_count])


def _drop_to_target_params(order: Sequence[int], target_params: int, layer_params: Sequence[int], total_params: int, num_layers: int):
    """The least important layers of `order` until at most `target_params` parameters remain (one layer always kept)."""
    if target_params >= total_params:
        raise ConfigError(f"--target-params {target_params:,} is not below the model's {total_params:,} parameters: lower it")
    dropped, remaining = [], total_params
    for i in order:
        if remaining <= target_params or len(dropped) == num_layers - 1:
            break
        dropped.append(i)
        remaining -= layer_params[i]
    if remaining > target_params:
        raise ConfigError(
            f"--target-params {target_params:,} is out of reach: dropping every allowed layer leaves {remaining:,}; "
            "raise it or protect fewer layers"
        )
    return sorted(dropped)


def _check_drop_count(drop_count: int, num_layers: int, candidates: int) -> None:
    if drop_count < 1:
        raise ConfigError(f"--drop-layers must be at least 1, got {drop_count}")
    if drop_count >= num_layers:
        raise ConfigError(f"--drop-layers {drop_count} would leave no layer of {num_layers}: lower it")
    if drop_count > candidates:
        raise ConfigError(
            f"cannot drop {drop_count} layers: only {candidates} of {num_layers} are not protected; "
            "lower --protect-first/--protect-last or drop fewer"
        )
