"""Block-wise weight-only quantisation of an exported float32 ONNX graph (int4 / int8 MatMulNBits).

The quantiser is onnxruntime's own `onnxruntime.quantization.matmul_nbits_quantizer`: every MatMul whose
weight is a constant becomes a `com.microsoft.MatMulNBits` node holding the weight in blocks of
`block_size` input values, each block with its own scale and zero point (asymmetric), so the graph's
inputs, outputs and KV-cache dtypes do not change and `OnnxCausalLM` runs it as it runs the float graph.

- `rtn` (round to nearest per block; onnxruntime's "DEFAULT" C++ quantiser, 4 or 8 bits) needs no data.
- `hqq` (half-quadratic optimisation of each block's scale and zero point, also data-free) lowers the
  rounding error of int4 weights at the cost of a slower export.

The lm_head. Models with tied embeddings (SmolLM2, Llama-3.2, Qwen2.5 small) export one matrix that a
Gather (the input embedding) and a Transpose → MatMul (the lm_head) share. The quantiser only sees a
MatMul whose weight is an initializer, so as exported the lm_head would stay float32 — and at 135M
parameters that matrix is a third of the weights and most of what a decode step reads once the layers
are int4. `untie_lm_head` gives the lm_head MatMul its own transposed copy, quantised at `--lm-head`
(int8 by default: int4 there costs the most agreement, see `DEFAULT_LM_HEAD`); the Gather's table is
quantised to int4 (GatherBlockQuantized) in an int4 export and stays float32 in an int8 one (onnxruntime
has no 8-bit GatherBlockQuantized) — a row gather reads one row per token, so the table costs disk and
memory, not decode time.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from gradprune_deploy.errors import ExportError, first_line
from gradprune_deploy.layout import ONNX_GRAPH
from gradprune_deploy.utils import optional_import

logger = logging.getLogger(__name__)

QUANT_BITS = {"int4": 4, "int8": 8}
QUANTIZERS = ("rtn", "hqq")
LM_HEAD_CHOICES = ("int8", "int4", "float32")
# Defaults chosen by measurement on the bundled SmolLM2-135M-Instruct (dense, 4 prompts × 16 tokens; the
# numbers are in exporters/onnx_validate.py's docstring):
# - HQQ for int4: at block 32 it cut max |Δ logits| from 17.3 (RTN) to 4.9 and raised greedy-token agreement
#   from 61% to 89% (lm_head int4). 8-bit needs RTN: HQQ's float zero points are refused by onnxruntime's
#   8-bit MatMulNBits on CPU, and RTN int8 already agrees 100%.
# - block 32: HQQ int4 at block 64 / 128 fell to 73% / 72% agreement (max |Δ| 13.8 / 18.2); the smaller
#   blocks' extra scales cost ~0.5 bit per weight (117 vs 99 / 97 MiB).
# - the lm_head at int8, whatever the layers get: int4 on the lm_head alone cost 89% → 98% agreement, and
#   keeping it float32 leaves the 113 MiB tied table to be read every token (twice the int4 layers' bytes).
DEFAULT_QUANTIZER = {"int4": "hqq", "int8": "rtn"}
DEFAULT_BLOCK_SIZE = 32
DEFAULT_LM_HEAD = "int8"
_TRANSPOSED_SUFFIX = ".transposed"
_LOGITS = "logits"


def check_block_size(block_size: int) -> str | None:
    """Why MatMulNBits cannot take this block size (a power of two ≥ 16), or None when it can."""
    if block_size < 16 or block_size & (block_size - 1):
        return f"--block-size {block_size}: MatMulNBits needs a power of two ≥ 16 (16, 32, 64, 128, 256)"
    return None


def untie_lm_head(model) -> str | None:
    """The lm_head MatMul (the one that makes `logits`) with a weight of its own; returns its name.

    With tied embeddings its weight is Transpose(embedding table): it gets its own transposed copy so the
    quantiser, which only takes initializer weights, sees it. None when the graph has no such MatMul.
    """
    numpy_helper = optional_import("onnx.numpy_helper", "onnx")
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    node = next((n for n in graph.node if n.op_type == "MatMul" and n.output[0] == _LOGITS), None)
    if node is None or node.input[1] in inits:
        return node.name if node is not None else None
    source = next((n for n in graph.node if n.op_type == "Transpose" and n.output[0] == node.input[1]), None)
    perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), None) if source else None
    if source is None or source.input[0] not in inits or perm not in (None, [1, 0]):
        return None
    weight = numpy_helper.to_array(inits[source.input[0]])
    name = source.input[0] + _TRANSPOSED_SUFFIX
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
    node.input[1] = name
    if not any(source.output[0] in n.input for n in graph.node):
        graph.node.remove(source)
    return node.name


def _passes(quantization: str, quantizer: str, block_size: int, *, lm_head: str, lm_head_node: str | None, matmuls: list[str]):
    """(quantiser config, nodes it must leave alone) to run in turn: the lm_head at its own precision when
    that differs, then the other MatMuls with `quantizer`, then the embedding table (int4 only, RTN:
    GatherBlockQuantized takes no float zero points, which HQQ makes)."""
    nbits = optional_import("onnxruntime.quantization.matmul_nbits_quantizer", "onnx")
    bits = QUANT_BITS[quantization]
    axes = (("MatMul", 0), ("Gather", 1))

    def rtn(b: int, ops: tuple[str, ...]):
        return nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, bits=b, op_types_to_quantize=ops, quant_axes=axes)

    passes = []
    head_apart = lm_head_node is not None and lm_head != quantization
    if head_apart and lm_head != "float32":
        passes.append((rtn(QUANT_BITS[lm_head], ("MatMul",)), [m for m in matmuls if m != lm_head_node]))
    body = (
        nbits.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=("MatMul",), quant_axes=axes)
        if quantizer == "hqq"
        else rtn(bits, ("MatMul",))
    )
    passes.append((body, [lm_head_node] if head_apart else []))
    if quantization == "int4":
        passes.append((rtn(4, ("Gather",)), []))
    return passes


def _run_passes(model, passes: list):
    """The model after every pass (each pass leaves the nodes it does not target as they are)."""
    nbits = optional_import("onnxruntime.quantization.matmul_nbits_quantizer", "onnx")
    chatty = logging.getLogger(nbits.__name__)  # it logs every node it visits at INFO: keep its warnings only
    level = chatty.level
    chatty.setLevel(max(logging.WARNING, chatty.getEffectiveLevel()))
    try:
        for config, exclude in passes:
            quant = nbits.MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=exclude)
            with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero block: its scale 0 is handled by np.where
                quant.process()
            model = quant.model.model
    finally:
        chatty.setLevel(level)
    return quant.model


def quantize_export(
    export_dir: str | os.PathLike, *, quantization: str, block_size: int, quantizer: str | None = None, lm_head: str | None = None
) -> dict[str, Any]:
    """Quantise `export_dir`'s float32 graph in place (model.onnx + model.onnx.data replaced); return the settings."""
    onnx = optional_import("onnx", "onnx")
    ort = optional_import("onnxruntime", "onnx")
    quantizer = quantizer or DEFAULT_QUANTIZER[quantization]
    lm_head = lm_head or DEFAULT_LM_HEAD
    graph_path = Path(export_dir) / ONNX_GRAPH
    model = onnx.load(str(graph_path))  # with its external data, in memory
    head = untie_lm_head(model) if lm_head != "float32" else None
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    passes = _passes(quantization, quantizer, block_size, lm_head=lm_head, lm_head_node=head, matmuls=matmuls)
    try:
        quantized = _run_passes(model, passes)
    except Exception as exc:  # noqa: BLE001 - the quantiser asserts and raises many kinds; report its first line
        logger.debug("quantiser failure", exc_info=True)
        raise ExportError(
            f"{quantizer} {quantization} quantisation of the ONNX graph failed: {first_line(exc)} (nothing was written)"
        ) from None
    nodes = quantized.model.graph.node
    ops = Counter(n.op_type for n in nodes)
    _replace_graph(quantized, graph_path)
    head_node = next((n for n in nodes if n.output[0] == _LOGITS), None)
    head_bits = (
        next((a.i for a in head_node.attribute if a.name == "bits"), None) if head_node and head_node.op_type == "MatMulNBits" else None
    )
    settings = {
        "quantizer": quantizer,
        "bits": QUANT_BITS[quantization],
        "block_size": block_size,
        "symmetric": False,
        "lm_head": f"int{head_bits}" if head_bits else "float32",
        "embedding_quantized": ops["GatherBlockQuantized"] > 0,
        "matmuls_quantized": ops["MatMulNBits"],
        "matmuls_left_float": ops["MatMul"],
        "matmuls_in_float_graph": len(matmuls),
        # the embedding pass moves the graph to opset 21 (int4 tensors need it)
        "opset": next((o.version for o in quantized.model.opset_import if o.domain in ("", "ai.onnx")), None),
        "onnxruntime": ort.__version__,
    }
    logger.info(
        "quantised %d of %d MatMuls to %s (%s, block %d), lm_head %s%s",
        ops["MatMulNBits"],
        len(matmuls),
        quantization,
        quantizer,
        block_size,
        settings["lm_head"],
        ", embedding table int4" if settings["embedding_quantized"] else "",
    )
    return settings


def _replace_graph(onnx_model, graph_path: Path) -> None:
    """Write the quantised graph beside the float one, then swap it in (onnx appends to an existing data file)."""
    staging = graph_path.parent / f".quantized-{os.getpid()}"
    staging.mkdir()
    try:
        onnx_model.save_model_to_file(str(staging / graph_path.name), use_external_data_format=True)
        data = graph_path.with_name(graph_path.name + ".data")
        data.unlink(missing_ok=True)
        for produced in staging.iterdir():
            os.replace(produced, graph_path.parent / produced.name)
    finally:
        for leftover in staging.glob("*"):
            leftover.unlink()
        staging.rmdir()
