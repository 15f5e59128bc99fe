"""`gradprune compress --compensate`: GradMAP's projection compensation applied to a live pruned model.

Orchestration only (the math, and its source, are in compensation.py): forward hooks read the
decoder layers' outputs of the pruned model and of the dense model on the same calibration rows (the
dense ones once, before the cut: `capture_dense`, so no second model is kept),
the layers with the largest mean shift are picked, each gets a closed-form projection M, c fitted
and folded into its `mlp.down_proj` (W' = M W, b' = M b + c), every other MLP linear gets a zero
bias and the config sets `mlp_bias = True`, so transformers, vLLM and the ONNX exporter load the
checkpoint unchanged. Layers are fitted shallow to deep, each on hidden states that already include
the earlier corrections. Afterwards every compensated layer's mean shift on the calibration rows
must be ~0; if it is not, the architecture does not add its MLP output straight into the residual
stream and the run stops rather than save a wrong model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...errors import ArchitectureError, ConfigError
from ...manifest import CompensationRecord
from ..hooks import captured_outputs, forward_kwargs, preserved_train_state
from ..surgery import find_layer_stack, prune_config_dict
from .compensation import (
    DEFAULT_RIDGE,
    RegressionStats,
    fit_projection,
    fold_into_linear,
    largest_shift_layers,
    mean_shift_norms,
    shift_terms,
    target_positions,
)

logger = logging.getLogger(__name__)

MLP_OUT = "mlp.down_proj"  # the linear whose output is added to the residual stream; the map folds into it
METHOD = "GradMAP projection compensation (arXiv 2602.14649), closed-form ridge fit"


def biased_mlp_linears(model: nn.Module) -> list[str]:
    """Names (within a decoder layer) of the linears that get a bias when the config sets
    `mlp_bias = True`, found by building a one-layer copy of the architecture on the meta device.
    A ConfigError naming --compensate when the architecture cannot carry the compensation."""
    arch = f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})"
    refuse = f"--compensate: {arch} cannot carry the compensation as a standard checkpoint"
    fields = model.config.to_dict()
    if "mlp_bias" not in fields:
        raise ConfigError(f"{refuse}: its config has no mlp_bias field; drop --compensate (Llama-family configs have it)")
    try:
        config = type(model.config).from_dict({**prune_config_dict(fields, [0]), "mlp_bias": True})
        with torch.device("meta"):
            probe = type(model)(config)
        layer = find_layer_stack(probe)[1][0]
        down = layer.get_submodule(MLP_OUT)
    except Exception as exc:  # noqa: BLE001 - any failure means: not this architecture
        raise ConfigError(f"{refuse}: no {MLP_OUT} with a bias under mlp_bias ({type(exc).__name__}); drop --compensate") from None
    if not isinstance(down, nn.Linear) or down.bias is None:
        raise ConfigError(f"{refuse}: mlp_bias does not give {MLP_OUT} a bias; drop --compensate")
    return sorted(name for name, mod in layer.named_modules() if isinstance(mod, nn.Linear) and mod.bias is not None)


def _run(model: nn.Module, batch: dict, modules: dict) -> tuple[dict, float, int]:
    """One forward pass: (captured outputs, summed completion-token loss, completion tokens)."""
    store: dict = {}
    with captured_outputs(modules, store):
        out = model(**forward_kwargs(model, batch, labels=True), use_cache=False)
    n = int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else 0
    return store, float(out.loss) * n if n else 0.0, n


@dataclass
class DenseOutputs:
    """What --compensate compares the pruned model against, captured from the dense model before the cut:
    per calibration batch, the outputs of the dense layers it needs (on the CPU) and the completion loss."""

    outputs: list[dict[int, torch.Tensor]]  # per batch: {dense layer index: its output [batch, seq, hidden]}
    losses: list[tuple[float, int]]  # per batch: (summed completion-token loss, completion tokens)


@torch.no_grad()
def capture_dense(model: nn.Module, batches: Sequence[dict], targets: Sequence[int]) -> DenseOutputs:
    """One pass of the dense `model` over the calibration batches, keeping the outputs of layers `targets`
    and the loss. Called before the cut, it is the whole dense reference: no second model is needed."""
    layers = find_layer_stack(model)[1]
    modules = {t: layers[t] for t in sorted(set(targets))}
    outputs, losses = [], []
    with preserved_train_state(model):
        for batch in batches:
            store, loss, n = _run(model, batch, modules)
            outputs.append({t: value.cpu() for t, value in store.items()})
            losses.append((loss, n))
    return DenseOutputs(outputs, losses)


def _dense(reference: nn.Module | DenseOutputs, batches: Sequence[dict], targets: Sequence[int]) -> DenseOutputs:
    """The captured dense outputs; a dense model (the reference as it was passed before) is run once now."""
    return reference if isinstance(reference, DenseOutputs) else capture_dense(reference, batches, targets)


@torch.no_grad()
def measure_shifts(model: nn.Module, reference: nn.Module | DenseOutputs, batches: Sequence[dict], targets: Sequence[int]) -> dict:
    """Mean-shift norm of every pruned layer's output against the dense output at targets[j], and
    the completion loss of both models, over the calibration batches."""
    dense = _dense(reference, batches, targets)
    layers = find_layer_stack(model)[1]
    sums = [torch.zeros(model.config.hidden_size, dtype=torch.float64) for _ in layers]
    counts = [0] * len(layers)
    loss = {"pruned": [0.0, 0], "dense": [0.0, 0]}
    with preserved_train_state(model):
        for i, batch in enumerate(batches):
            (d_loss, d_n), outputs = dense.losses[i], dense.outputs[i]
            pruned, p_loss, p_n = _run(model, batch, dict(enumerate(layers)))
            mask = batch["attention_mask"]
            for j, target in enumerate(targets):
                s, n = shift_terms(pruned[j], outputs[target].to(pruned[j].device), mask.to(pruned[j].device))
                sums[j] += s.cpu()
                counts[j] += n
            loss["dense"] = [loss["dense"][0] + d_loss, loss["dense"][1] + d_n]
            loss["pruned"] = [loss["pruned"][0] + p_loss, loss["pruned"][1] + p_n]
    return {
        "norms": mean_shift_norms(sums, counts),
        "tokens": counts[0] if counts else 0,
        "loss": {k: (s / n if n else None) for k, (s, n) in loss.items()},
    }


@torch.no_grad()
def fit_layer(model: nn.Module, reference: nn.Module | DenseOutputs, batches: Sequence[dict], layer: int, target: int, *, ridge: float):
    """(M, c) for pruned layer `layer` against the dense output of original layer `target`."""
    dense = _dense(reference, batches, [target])
    block = find_layer_stack(model)[1][layer]
    down = block.get_submodule(MLP_OUT)
    stats = RegressionStats.zeros(model.config.hidden_size, device=down.weight.device)
    with preserved_train_state(model):
        for i, batch in enumerate(batches):
            pruned, _, _ = _run(model, batch, {"h": block, "m": down})
            h, m = pruned["h"], pruned["m"]
            y = dense.outputs[i][target].to(h.device)
            stats.update(m, y - h + m, batch["attention_mask"])  # t = y - a, a = h - m
    return fit_projection(stats, ridge)


def add_zero_biases(model: nn.Module, names: Sequence[str]) -> None:
    """Give linears `names` of every decoder layer a zero bias where they have none (no change in output)."""
    for layer in find_layer_stack(model)[1]:
        for name in names:
            linear = layer.get_submodule(name)
            if linear.bias is None:
                w = linear.weight
                linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)


def fold(model: nn.Module, layer: int, m_mat: torch.Tensor, c: torch.Tensor) -> None:
    """down_proj of pruned layer `layer` := M down_proj + c (its bias must exist)."""
    down = find_layer_stack(model)[1][layer].get_submodule(MLP_OUT)
    weight, bias = fold_into_linear(down.weight.data, down.bias.data, m_mat, c)
    down.weight.data.copy_(weight)
    down.bias.data.copy_(bias)


def compensate_cut(
    model: nn.Module,
    reference: nn.Module,
    batches: Sequence[dict],
    *,
    kept: Sequence[int],
    num_layers: int,
    layers: int = 1,
    ridge: float = DEFAULT_RIDGE,
) -> CompensationRecord:
    """Compensate the `layers` pruned layers with the largest mean shift, in place; the manifest record.

    `model` is the pruned model (layers `kept` of the `num_layers`-layer dense model, renumbered);
    `reference` is that dense model's `capture_dense` (taken before the cut), or the dense model itself."""
    names = biased_mlp_linears(model)
    if not batches:
        raise ConfigError("--compensate needs calibration rows: give --data with at least one row")
    targets = target_positions(kept, num_layers)
    reference = _dense(reference, batches, targets)
    before = measure_shifts(model, reference, batches, targets)
    chosen = largest_shift_layers(before["norms"], layers)
    logger.info("compensating pruned layers %s (mean shift %s)", chosen, [round(before["norms"][j], 4) for j in chosen])
    add_zero_biases(model, names)
    model.config.mlp_bias = True
    for j in chosen:  # shallow to deep: each fit sees the earlier corrections
        m_mat, c = fit_layer(model, reference, batches, j, targets[j], ridge=ridge)
        fold(model, j, m_mat, c)
    after = measure_shifts(model, reference, batches, targets)
    for j in chosen:
        if after["norms"][j] > 0.5 * before["norms"][j] + 1e-6:
            raise ArchitectureError(
                f"--compensate: {type(model).__name__} layer {j}'s mean shift went {before['norms'][j]:.4g} → "
                f"{after['norms'][j]:.4g}: its MLP output does not reach the residual stream as h = a + down_proj(x); drop --compensate"
            )
    return CompensationRecord(
        method=METHOD,
        layers=chosen,
        layers_original=[kept[j] for j in chosen],
        dense_targets=[targets[j] for j in chosen],
        folded_into=MLP_OUT,
        config_field="mlp_bias",
        mlp_bias_linears=names,
        ridge=ridge,
        calibration_batches=len(batches),
        calibration_tokens=before["tokens"],
        mean_shift_before=before["norms"],
        mean_shift_after=after["norms"],
        calibration_loss={"dense": before["loss"]["dense"], "pruned": before["loss"]["pruned"], "compensated": after["loss"]["pruned"]},
    )
