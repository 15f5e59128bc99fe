"""Remove decoder layers from a causal LM and rewrite its config so the result is a standard
checkpoint: modules renumbered 0..K-1, every `layer_idx` (the KV-cache slot) renumbered,
`num_hidden_layers` and every per-layer config field rewritten.

`prune_config_dict` is pure (dict in, dict out); `drop_layers` applies it to a live model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from ..errors import ArchitectureError, ConfigError

logger = logging.getLogger(__name__)

# Config fields that hold one entry per layer (subset them), layer indices (remap them), or a
# count of leading layers (recount them). Any other list field whose name mentions "layer" and
# whose length equals the layer count is also treated as per-layer.
PER_LAYER_LIST_FIELDS = ("layer_types", "no_rope_layers", "layers_block_type", "attn_layer_types")
LAYER_INDEX_FIELDS = ("mlp_only_layers", "full_attn_idxs", "attn_layer_indices")
LEADING_LAYER_COUNT_FIELDS = ("max_window_layers", "first_k_dense_replace")


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer ModuleList (`model.layers` for Llama-style models) and its path."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(n_layers, int):
        raise ArchitectureError(
            f"{type(model).__name__}: config has no num_hidden_layers; GradPruner needs a decoder-only model with a layer stack"
        )
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name.split(".")[-1] in ("layers", "h", "blocks", "layer")
    ]
    if not candidates:
        raise ArchitectureError(
            f"{type(model).__name__} has no list of {n_layers} decoder layers (model.layers): "
            "GradPruner supports decoder-only models such as Llama, Mistral, Qwen2/3, Gemma3 and Phi3"
        )
    return min(candidates, key=lambda item: item[0].count("."))  # the outermost stack


def layer_prefix(model: nn.Module) -> str:
    """State-dict prefix of the layer stack, e.g. 'model.layers'."""
    return find_layer_stack(model)[0]


def prune_config_dict(config: dict[str, Any], kept: Sequence[int]) -> dict[str, Any]:
    """The config of the model that keeps only layers `kept` (old indices, ascending).

    Pure: returns a new dict; the input is untouched.
    """
    old_n = config["num_hidden_layers"]
    kept = list(kept)
    if not kept:
        raise ConfigError("pruning would leave no layer: drop fewer layers")
    if sorted(set(kept)) != kept or kept[0] < 0 or kept[-1] >= old_n:
        raise ConfigError(f"kept layers must be distinct ascending indices in 0..{old_n - 1}, got {kept}")
    new_index = {old: new for new, old in enumerate(kept)}
    out = dict(config)
    out["num_hidden_layers"] = len(kept)
    for key, value in config.items():
        if key in LEADING_LAYER_COUNT_FIELDS and isinstance(value, int):
            out[key] = sum(1 for old in kept if old < value)
        elif key in LAYER_INDEX_FIELDS and isinstance(value, (list, tuple)):
            out[key] = [new_index[i] for i in value if i in new_index]
        elif isinstance(value, (list, tuple)) and len(value) == old_n and (key in PER_LAYER_LIST_FIELDS or "layer" in key):
            out[key] = [value[i] for i in kept]
    return out


def drop_layers(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    """Remove layers `drop` in place and return the model, renumbered and with its config rewritten."""
    path, layers = find_layer_stack(model)
    n = len(layers)
    drop = sorted(set(drop))
    if any(i < 0 or i >= n for i in drop):
        raise ConfigError(f"layer indices to drop must be in 0..{n - 1}, got {drop}")
    kept = [i for i in range(n) if i not in drop]
    new_config = prune_config_dict(model.config.to_dict(), kept)

    new_stack = nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(new_stack):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    replace_layer_stack(model, path, new_stack)

    for key, value in new_config.items():
        if model.config.to_dict().get(key) != value:
            setattr(model.config, key, value)
    logger.info("dropped layers %s: %d → %d layers", drop, n, len(kept))
    return model


def replace_layer_stack(model: nn.Module, path: str, stack: nn.ModuleList) -> None:
    """Put `stack` where the layer stack at `path` (find_layer_stack's) is; the config is the caller's."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, stack)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def linear_weights_by_layer(layers: nn.ModuleList) -> dict[int, dict[str, nn.Linear]]:
    """{layer index: {name within the layer: nn.Linear}} for every linear inside the layer stack."""
    return {i: {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)} for i, layer in enumerate(layers)}
