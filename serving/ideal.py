"""The ideal pruned/dense ratios, computed from the two checkpoints alone (no model is run).

The cost model, stated so the numbers can be checked by hand:

- **Weight bytes read per decoded token** (decode is memory-bound at batch 1): every tensor of
  every decoder layer, every other non-embedding tensor (the final norm), and the whole lm_head
  matrix are read once per token. The input embedding is a row gather: one row
  (`hidden_size` values) is read, not the matrix. With tied embeddings the lm_head *is* the
  embedding matrix and is counted once, as the lm_head read.
- **FLOPs per token** ≈ 2 × (parameters of every 2-D weight in the layers + lm_head), plus the
  attention term 4 × heads × head_dim × context per layer (QKᵀ and AV, a multiply-add each), with
  the context capped at the sliding window on sliding-attention layers. Norms, RoPE and
  activations are ignored (under 0.1% here).
- **Prefill FLOPs** (what time-to-first-token should follow): the FLOPs of every prompt position,
  each attending to the positions before it.
- **Weight bytes** (what memory should follow): all stored tensors, embeddings included.
- **Layers only**: kept layers / original layers, for reference.

ONNX arms (`gradprune bench --backend onnx --onnx-quantize int4`) are compared from their graphs, since a
quantised graph's bytes are not the checkpoint's: `onnx_graph_costs` reads each exported graph's
initializers (shapes and element types, not the data) — every weight read once per token except an
embedding table, of which a Gather reads one row — and `onnx_arm_ideals` sets each arm beside the dense
float32 graph. Weight-only quantisation leaves the FLOPs as they were (the weights are dequantised into
float32 matmuls), so a quantised arm's prefill ideal is its float model's.

Dense models only: a mixture-of-experts layer reads only its routed experts, which this model
over-counts. `checkpoint_tensors` is the only function here that touches the disk (it reads the
safetensors headers, not the weights); the rest is pure arithmetic on shapes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from gradprune_deploy.layout import ONNX_GRAPH
from gradprune_deploy.safetensors_header import DTYPE_BYTES, read_safetensors_header
from gradprune_deploy.safetensors_header import LAYER_KEY as _LAYER
from gradprune_deploy.utils import optional_import

# onnx.TensorProto element types → bytes per element (int4/uint4 pack two per byte)
_ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 21: 0.5, 22: 0.5}
# ops whose input 0 (and, quantised, its scales and zero points) is a table read one row per token
_ROW_GATHERS = {"Gather": (0,), "GatherBlockQuantized": (0, 2, 3)}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    itemsize: int  # bytes per element

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def checkpoint_tensors(checkpoint_dir: str | Path) -> dict[str, TensorInfo]:
    """Name → shape and element size of every tensor in a safetensors checkpoint (headers only)."""
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir} has no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, (dtype, shape) in read_safetensors_header(path).items():
            tensors[name] = TensorInfo(tuple(shape), DTYPE_BYTES.get(dtype, 4))
    return tensors


def classify(name: str) -> str:
    """'layer', 'embedding', 'lm_head' or 'other' (final norm and anything outside the stack)."""
    if _LAYER.search(name):
        return "layer"
    if "lm_head" in name or name.endswith("output.weight"):
        return "lm_head"
    if "embed_tokens" in name or "wte" in name or "word_embeddings" in name:
        return "embedding"
    return "other"


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config.get("text_config") or config


def _attention_context(config: Mapping[str, Any], context_len: float) -> list[float]:
    """Per layer, how many positions one query attends to at this context length."""
    cfg = _text_config(config)
    n = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types") or ["full_attention"] * n
    return [min(context_len, window) if window and kind == "sliding_attention" else context_len for kind in types]


def model_costs(tensors: Mapping[str, TensorInfo], config: Mapping[str, Any], *, input_len: int, output_len: int) -> dict[str, Any]:
    """Parameter counts and per-token costs of one checkpoint under the module's cost model.

    Decode FLOPs use the mean context of the decoded tokens: input_len + (output_len - 1) / 2.
    """
    cfg = _text_config(config)
    groups: dict[str, list[TensorInfo]] = {"layer": [], "embedding": [], "lm_head": [], "other": []}
    for name, info in tensors.items():
        groups[classify(name)].append(info)
    hidden = cfg["hidden_size"]
    embedding = groups["embedding"]
    lm_head = groups["lm_head"] or embedding  # tied: the lm_head reads the embedding matrix
    itemsize = (embedding or lm_head or groups["layer"])[0].itemsize

    layer_params = sum(t.numel for t in groups["layer"])
    layer_matmul = sum(t.numel for t in groups["layer"] if len(t.shape) == 2)
    lm_head_params = sum(t.numel for t in lm_head)
    decode_bytes = (
        sum(t.nbytes for t in groups["layer"])
        + sum(t.nbytes for t in groups["other"])
        + sum(t.nbytes for t in lm_head)
        + (hidden * itemsize if embedding else 0)
    )

    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    matmul_flops = 2 * (layer_matmul + lm_head_params)

    def attention_flops(context: float) -> float:
        return sum(4 * heads * head_dim * c for c in _attention_context(config, context))

    decode_context = input_len + (output_len - 1) / 2
    # Prefill: position p (1-based) attends to p positions; lm_head only for the last position.
    prefill_flops = 2 * layer_matmul * input_len + 2 * lm_head_params + sum(attention_flops(p) for p in range(1, input_len + 1))
    kv_bytes = sum(2 * kv_heads * head_dim * c * itemsize for c in _attention_context(config, decode_context))
    return {
        "num_layers": cfg["num_hidden_layers"],
        "params_total": sum(t.numel for t in tensors.values()),
        "params_layers": layer_params,
        "layer_bytes": sum(t.nbytes for t in groups["layer"]),
        "params_embedding": sum(t.numel for t in embedding),
        "params_lm_head": lm_head_params if groups["lm_head"] else 0,
        "tied_embeddings": not groups["lm_head"],
        "weight_bytes": sum(t.nbytes for t in tensors.values()),
        "decode_bytes_per_token": decode_bytes,
        "kv_cache_bytes_per_token": kv_bytes,
        "decode_flops_per_token": matmul_flops + attention_flops(decode_context),
        "prefill_flops": prefill_flops,
        "decode_context": decode_context,
    }


def ideal_ratios(dense: Mapping[str, Any], pruned: Mapping[str, Any]) -> dict[str, float]:
    """pruned/dense for each cost: what a perfectly proportional runtime would measure."""

    def ratio(key: str) -> float:
        return pruned[key] / dense[key]

    return {
        "decode_bytes": ratio("decode_bytes_per_token"),
        "decode_bytes_with_kv": (pruned["decode_bytes_per_token"] + pruned["kv_cache_bytes_per_token"])
        / (dense["decode_bytes_per_token"] + dense["kv_cache_bytes_per_token"]),
        "decode_flops": ratio("decode_flops_per_token"),
        "prefill_flops": ratio("prefill_flops"),
        "weight_bytes": ratio("weight_bytes"),
        "layers_only": ratio("num_layers"),
    }


# Which ideal each measured metric should follow, and whether the metric falls (time, memory)
# or rises (throughput) when the model shrinks.
METRIC_IDEAL = {
    "ttft_s": ("prefill_flops", "time"),
    "tpot_s": ("decode_bytes", "time"),
    "e2e_s": ("decode_bytes", "time"),
    "output_tok_s": ("decode_bytes", "rate"),
    "output_tok_s_concurrent": ("decode_flops", "rate"),
    "tpot_s_concurrent": ("decode_flops", "time"),
    "peak_rss_bytes": ("weight_bytes", "memory"),
    "model_rss_bytes": ("weight_bytes", "memory"),
    "steady_rss_bytes": ("weight_bytes", "memory"),
    "cuda_peak_bytes": ("weight_bytes", "memory"),
    "model_weights_bytes": ("weight_bytes", "memory"),
    "gpu_memory_bytes": ("weight_bytes", "memory"),
    "file_size_bytes": ("weight_bytes", "memory"),
}


def ideal_for_metric(metric: str, ratios: Mapping[str, float]) -> tuple[str, float] | None:
    """(ideal name, ideal pruned/dense value) for a metric; rates are the inverse of the cost."""
    if metric not in METRIC_IDEAL:
        return None
    key, kind = METRIC_IDEAL[metric]
    return key, (1.0 / ratios[key] if kind == "rate" else ratios[key])


def ideal_from_checkpoints(dense_dir: str | Path, pruned_dir: str | Path, *, input_len: int, output_len: int) -> dict[str, Any]:
    """Both models' costs and the ideal ratios, from the checkpoint directories."""
    costs = {}
    for label, directory in (("dense", dense_dir), ("pruned", pruned_dir)):
        config = json.loads((Path(directory) / "config.json").read_text())
        costs[label] = model_costs(checkpoint_tensors(directory), config, input_len=input_len, output_len=output_len)
    return {"dense": costs["dense"], "pruned": costs["pruned"], "ratios": ideal_ratios(costs["dense"], costs["pruned"])}


def onnx_graph_costs(onnx_dir: str | Path) -> dict[str, float]:
    """Stored weight bytes and weight bytes read per decoded token of an exported graph (headers only)."""
    onnx = optional_import("onnx", "onnx")
    graph = onnx.load(str(Path(onnx_dir) / ONNX_GRAPH), load_external_data=False).graph
    tables = {node.input[i] for node in graph.node for i in _ROW_GATHERS.get(node.op_type, ()) if i < len(node.input)}
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    weight = decode = 0.0
    for init in graph.initializer:
        nbytes = prod(init.dims) * _ONNX_ITEMSIZE.get(init.data_type, 4)
        weight += nbytes
        row_only = init.name in tables and readers.get(init.name, set()) <= set(_ROW_GATHERS)
        decode += nbytes / max(init.dims[0], 1) if row_only and init.dims else nbytes
    return {"weight_bytes": weight, "decode_bytes_per_token": decode}


def onnx_arm_ideals(costs: Mapping[str, Mapping[str, float]], *, prefill_flops_ratio: float) -> dict[str, dict[str, tuple[str, float]]]:
    """Per arm other than "dense": metric → (ideal name, arm/dense ideal), from the graphs' costs."""
    dense = costs["dense"]
    out = {}
    for label, c in costs.items():
        if label == "dense":
            continue
        weight = c["weight_bytes"] / dense["weight_bytes"]
        out[label] = {
            "ttft_s": ("prefill_flops", prefill_flops_ratio),
            "tpot_s": ("onnx_decode_bytes", c["decode_bytes_per_token"] / dense["decode_bytes_per_token"]),
            "peak_rss_bytes": ("onnx_weight_bytes", weight),
            "model_rss_bytes": ("onnx_weight_bytes", weight),
            "file_size_bytes": ("onnx_weight_bytes", weight),
        }
    return out
