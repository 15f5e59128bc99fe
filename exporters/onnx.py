"""Export a checkpoint to ONNX for generation with a KV cache, and prove it matches PyTorch.

Path: transformers' own `transformers.exporters.OnnxExporter` (torch.export → torch.onnx with
onnxscript). `optimum-onnx` pins transformers<4.58 and cannot be installed beside transformers 5.

One graph, `model.onnx` (+ `model.onnx.data`), serves both prefill and decode: it takes
`input_ids`, `attention_mask`, `position_ids` and every layer's past keys/values and returns
`logits` and the grown cache. Prefill passes an empty cache (past length 0), decode passes one
token and the previous cache. It is traced once, from a multi-token step over a non-empty cache,
with batch, query length and past length dynamic. Beside it: config, generation config,
tokenizer, and `gradprune_onnx.json` (shapes, versions and the validation numbers).

Validation (after every export, before the output directory appears): onnxruntime vs PyTorch
on fixed prompts, batched with left padding — max |Δ logits| over the prompt (prefill) and over
greedy decode steps — and the greedy tokens of both must be identical.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from gradprune_deploy.checkpoint import CheckpointInfo, inspect_checkpoint
from gradprune_deploy.config_schema import validate_fields
from gradprune_deploy.errors import ArchitectureError, ConfigError, ExportError, first_line
from gradprune_deploy.layout import ONNX_GRAPH, ONNX_METADATA
from gradprune_deploy.loading import load_model_and_tokenizer
from gradprune_deploy.runtime.onnx_runtime import OnnxCausalLM
from gradprune_deploy.utils import atomic_output_dir, check_output_dir, optional_import, require
from gradprune_deploy.verify import verify_checkpoint

from .onnx_artefact import ledger_rows, quantize_and_validate, record_artefact
from .onnx_quantize import DEFAULT_BLOCK_SIZE, DEFAULT_LM_HEAD, check_block_size
from .onnx_validate import compare_with_torch

logger = logging.getLogger(__name__)

# float32: pruned SmolLM2 measured 8.3e-4 at worst (one position of one prompt; typically 5e-5) on logits of
# magnitude 20-50, so 5e-3 leaves a margin without hiding a broken graph (those are off by whole units).
DEFAULT_ATOL = {"float32": 5e-3, "float16": 5e-2}
VALIDATION_PROMPTS = (
    "The capital of France is",
    "Layer pruning removes whole transformer blocks, so",
    "def fibonacci(n):",
    "Q: What is 2 + 3?\nA:",
)


@dataclass
class OnnxExportConfig:
    """Export prefill + decode (one graph with KV-cache inputs/outputs) and validate it against PyTorch.

    Examples:
      gradprune export onnx CKPT --out CKPT-onnx
      gradprune export onnx CKPT --out CKPT-int4 --quantize int4      # HQQ, block 32, lm_head int8
      gradprune inspect CKPT-int4                                     # its ledger stage onnx-int4
    """

    checkpoint: str = field(metadata={"positional": True, "help": "checkpoint directory to export"})
    out: str | None = field(default=None, metadata={"help": "output directory (written atomically)"})
    dtype: Literal["float32", "float16"] = field(default="float32", metadata={"help": "weights and activations dtype of the graph"})
    opset: int | None = field(default=None, metadata={"help": "ONNX opset (default: the newest onnxscript supports)"})
    validate: bool = field(default=True, metadata={"help": "compare logits and greedy tokens with PyTorch after export"})
    atol: float | None = field(
        default=None,
        metadata={"help": "max |Δ logits| allowed (default 5e-3 float32, 5e-2 float16; with --quantize: 8 int4, 2 int8)"},
    )
    new_tokens: int = field(default=8, metadata={"help": "greedy tokens that must match PyTorch, per validation prompt"})
    quantize: Literal["none", "int4", "int8"] = field(
        default="none",
        metadata={"help": "block-wise weight-only quantisation of the float32 graph's weights (onnxruntime MatMulNBits)"},
    )
    block_size: int | None = field(
        default=None, metadata={"help": f"weights per quantisation block, a power of two ≥ 16 (default {DEFAULT_BLOCK_SIZE})"}
    )
    quantizer: Literal["rtn", "hqq"] | None = field(
        default=None,
        metadata={
            "help": "rtn: round to nearest per block; hqq: optimised scales and zero points, slower (default: hqq for int4, rtn for int8)"
        },
    )
    lm_head: Literal["int8", "int4", "float32"] | None = field(
        default=None,
        metadata={
            "help": f"precision of the lm_head in a quantised export (a tied embedding gets its own copy; default {DEFAULT_LM_HEAD})"
        },
    )
    min_agreement: float | None = field(
        default=None,
        metadata={"help": "least greedy-token agreement with the float checkpoint a quantised export needs (default int4 0.85, int8 0.95)"},
    )
    ledger: bool = field(
        default=True, metadata={"help": "score the export on the checkpoint's held-out ledger rows and record it in its gradprune.json"}
    )
    ledger_data: str | None = field(
        default=None, metadata={"help": "the compress run's --data, when it has moved since (for the held-out ledger rows)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out"})

    def __post_init__(self):
        validate_fields(self)
        if not self.out:
            raise ConfigError("--out is required: the directory to write the ONNX export to")
        if self.atol is not None and not self.atol > 0:
            raise ConfigError(f"--atol must be positive, got {self.atol}")
        if self.opset is not None and not 18 <= self.opset <= 30:  # below 18 torch.onnx silently exports opset 18 instead
            raise ConfigError(f"--opset {self.opset}: give an ONNX opset from 18 (the lowest torch.onnx exports) to 30, or leave it out")
        if self.new_tokens < 1:
            raise ConfigError(f"--new-tokens must be at least 1, got {self.new_tokens}")
        self._check_quantize()

    def _check_quantize(self) -> None:
        """Quantisation options that cannot work together, refused before anything loads."""
        if self.quantize == "none":
            options = (
                ("--block-size", self.block_size),
                ("--quantizer", self.quantizer),
                ("--lm-head", self.lm_head),
                ("--min-agreement", self.min_agreement),
            )
            given = [flag for flag, value in options if value is not None]
            if given:
                raise ConfigError(f"{given[0]} only applies to a quantised export: add --quantize int4 or int8, or leave {given[0]} out")
            return
        if self.dtype != "float32":
            raise ConfigError(f"--quantize {self.quantize} quantises the float32 graph's weights: use --dtype float32 (the default)")
        problem = check_block_size(self.block_size) if self.block_size is not None else None
        if problem:
            raise ConfigError(problem)
        if self.quantizer == "hqq" and self.quantize == "int8":
            raise ConfigError(
                "--quantizer hqq makes float zero points, which onnxruntime's 8-bit MatMulNBits rejects: use --quantizer rtn for int8"
            )
        if self.min_agreement is not None and not 0 < self.min_agreement <= 1:
            raise ConfigError(f"--min-agreement must be in (0, 1], got {self.min_agreement}")


def _check_exportable(info: CheckpointInfo) -> None:
    """Text-only decoder LMs; checked from config.json before any weight is loaded."""
    config = info.config
    if (
        config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or config.get("is_encoder_decoder")
        or "vision_config" in config
        or "audio_config" in config
    ):
        raise ArchitectureError(
            f"architecture {info.architecture or '?'} (model_type {config.get('model_type')!r}) is not exportable to "
            "ONNX here: gradprune exports text-only decoder LMs with full attention (Llama, Qwen2/3, Phi3, Mistral)"
        )


def _sample_inputs(model) -> dict:
    """A 2-token step over a 5-token left-padded prefill: every axis that varies has a size > 1."""
    vocab = model.config.vocab_size
    ids = (torch.arange(10).reshape(2, 5) * 7 + 3) % vocab
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        past = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values
    sliding = sorted({type(layer).__name__ for layer in getattr(past, "layers", []) if "Sliding" in type(layer).__name__})
    if sliding:  # their cache is trimmed to the window: not one growing tensor per layer, which the graph assumes
        raise ArchitectureError(
            f"{type(model).__name__} uses sliding-window attention ({', '.join(sliding)}; config sliding_window="
            f"{getattr(model.config, 'sliding_window', None)}), which the ONNX export does not support yet: "
            "serve it with vLLM (`gradprune serve`) instead"
        )
    step = torch.tensor([[11, 13], [12, 14]]) % vocab
    return {
        "input_ids": step,
        "attention_mask": torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], 1),
        "position_ids": positions[:, -1:] + torch.tensor([[1, 2]]),
        "past_key_values": past,
        "use_cache": True,
    }


def _dynamic_shapes(inputs: dict) -> dict:
    """Batch, query length and past length dynamic; heads and head_dim static (faster, smaller graph)."""
    # transformers.exporters imports onnx and onnxscript: the onnx extra
    dynamo = optional_import("transformers.exporters.exporter_dynamo", "onnx")
    dyn = torch.export.Dim.DYNAMIC
    cache_leaves = dynamo.get_auto_dynamic_shapes(inputs["past_key_values"])
    return {
        "input_ids": {0: dyn, 1: dyn},
        "attention_mask": {0: dyn, 1: dyn},
        "position_ids": {0: dyn, 1: dyn},
        "past_key_values": [{0: dyn, 2: dyn} for _ in cache_leaves],
    }


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """The exporter's rewriters log every pattern they try at INFO; keep only their warnings."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(logging.WARNING, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _trace_to_onnx(model, path: Path, *, opset: int | None) -> None:
    exporters = optional_import("transformers.exporters", "onnx")  # it imports onnx and onnxscript
    captured = io.StringIO()
    try:
        inputs = _sample_inputs(model)
        config = exporters.OnnxConfig(
            dynamic=True, dynamic_shapes=_dynamic_shapes(inputs), output_path=str(path), opset_version=opset, external_data=True
        )
        # torch.onnx prints its progress, and the CLI's stdout is the result: keep it for -v instead
        with contextlib.redirect_stdout(captured), _quiet_loggers("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
            exporters.OnnxExporter().export(model, copy.copy(inputs), config=config)
    except ArchitectureError:
        raise
    except Exception as exc:  # noqa: BLE001 - tracing failures are many and deep (TypeError included); report the first line
        logger.debug("exporter output:\n%s", captured.getvalue(), exc_info=True)
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {first_line(exc)} (run with -v for the trace)") from None
    logger.debug("exporter output:\n%s", captured.getvalue())


def _mismatches(report: dict, prompts: tuple[str, ...], difference: dict | None) -> list[str]:
    prefill_diff, decode_diff, atol = report["max_abs_diff_prefill_logits"], report["max_abs_diff_decode_logits"], report["atol"]
    problems = []
    if max(prefill_diff, decode_diff) > atol:
        problems.append(f"max |Δ logits| prefill {prefill_diff:.3g}, decode {decode_diff:.3g} > atol {atol:g}")
    if difference is not None:
        prompt = prompts[difference["prompt"]]
        problems.append(f"greedy tokens differ for prompt {prompt!r}: onnx {difference['onnx']} vs torch {difference['torch']}")
    return problems


def validate_export(
    export_dir: str | os.PathLike, model, tokenizer, *, atol: float, new_tokens: int = 8, prompts: tuple[str, ...] = VALIDATION_PROMPTS
) -> dict:
    """Compare the export in `export_dir` with `model`; return the numbers, raise ExportError on mismatch."""
    lm = OnnxCausalLM(export_dir)
    numbers = compare_with_torch(lm, model, tokenizer, prompts=prompts, new_tokens=new_tokens)
    prefill_diff, decode_diff = numbers["max_abs_diff_prefill_logits"], numbers["max_abs_diff_decode_logits"]
    same = numbers["greedy_tokens_identical"]
    report = {
        "prompts": len(prompts),
        "atol": atol,
        "max_abs_diff_prefill_logits": prefill_diff,
        "max_abs_diff_decode_logits": decode_diff,
        "greedy_new_tokens": numbers["new_tokens"],
        "greedy_tokens_identical": same,
    }
    logger.info(
        "ONNX validation: max |Δ logits| prefill %.3g, decode %.3g (atol %g); greedy tokens identical: %s",
        prefill_diff,
        decode_diff,
        atol,
        same,
    )
    problems = _mismatches(report, prompts, numbers["first_difference"])
    if problems:
        raise ExportError(
            "ONNX export does not match PyTorch: "
            + "; ".join(problems)
            + " (raise --atol only if you accept the difference; nothing was written)"
        )
    return report


def export_onnx(config: OnnxExportConfig) -> dict[str, Any]:
    """`gradprune export onnx`: export `config.checkpoint` to `config.out` (atomically) and validate it;
    return a summary with the numbers (also written to gradprune_onnx.json)."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, "onnx")
    info = inspect_checkpoint(config.checkpoint)
    _check_exportable(info)
    verify_checkpoint(info.path)  # every file whole, every tensor finite, the tokenizer loadable
    check_output_dir(config.out, overwrite=config.overwrite, inputs={"checkpoint": config.checkpoint})  # fail before the slow part
    rows = ledger_rows(info, ledger=config.ledger, data=config.ledger_data)  # the data is read before the slow part too
    quantized = config.quantize != "none"
    atol = DEFAULT_ATOL[config.dtype] if config.atol is None or quantized else config.atol  # --atol: the quantised graph's limit
    # The temporary sibling exists from here on: an interruption or failure anywhere below removes it.
    with atomic_output_dir(config.out, overwrite=config.overwrite) as tmp:
        model, tokenizer = load_model_and_tokenizer(info.path, dtype=config.dtype)
        summary = _export(model, tokenizer, info, tmp, dtype=config.dtype, opset=config.opset)
        if config.validate:  # the float graph first: a quantised graph's error is then the quantisation's alone
            summary["validation"] = _validate_or_explain(tmp, model, tokenizer, atol=atol, new_tokens=config.new_tokens)
        if quantized:
            summary["float_validation"] = summary.pop("validation", None)
            summary.update(quantize_and_validate(tmp, model, tokenizer, config, prompts=VALIDATION_PROMPTS))
        _update_metadata(tmp, **{k: summary[k] for k in ("validation", "float_validation", "quantization", "opset") if k in summary})
        summary["artefact"] = record_artefact(tmp, info, model, tokenizer, rows, config, summary)
    summary["out"] = str(Path(config.out).expanduser().resolve())
    return summary


def present_export_onnx(summary: dict[str, Any]) -> str:
    """The CLI's last line: the summary as one JSON object, without the graph's input/output names
    (dozens of KV-cache names; they are in gradprune_onnx.json)."""
    return json.dumps({k: v for k, v in summary.items() if k not in ("inputs", "outputs")}, default=str)


def _export(model, tokenizer, info: CheckpointInfo, out: Path, *, dtype: str, opset: int | None) -> dict[str, Any]:
    """Trace the graph into `out`, save config, generation config and tokenizer beside it, write the metadata."""
    model.config.use_cache = True
    start = time.perf_counter()
    logger.info("exporting %s (%d layers, %s) to ONNX", info.path.name, model.config.num_hidden_layers, dtype)
    _trace_to_onnx(model, out / ONNX_GRAPH, opset=opset)
    export_s = time.perf_counter() - start
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return _write_metadata(out, info, model, tokenizer, dtype=dtype, opset=opset, export_s=export_s)


def _validate_or_explain(out: Path, model, tokenizer, *, atol: float, new_tokens: int) -> dict[str, Any]:
    try:
        return validate_export(out, model, tokenizer, atol=atol, new_tokens=new_tokens)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime could not run the graph: still an export failure
        logger.debug("validation failure", exc_info=True)
        raise ExportError(
            f"the ONNX graph of {type(model).__name__} does not run in onnxruntime: {first_line(exc)} "
            "(nothing was written; run with -v for the trace)"
        ) from None


def _write_metadata(out: Path, info: CheckpointInfo, model, tokenizer, *, dtype: str, opset: int | None, export_s: float) -> dict:
    onnx = optional_import("onnx", "onnx")
    onnxruntime = optional_import("onnxruntime", "onnx")
    graph = onnx.load(str(out / ONNX_GRAPH), load_external_data=False)
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
    summary = {
        "format": "gradprune-onnx/1",
        "graph": ONNX_GRAPH,
        "source": str(info.path),
        "architecture": info.architecture,
        "num_layers": model.config.num_hidden_layers,
        "dtype": dtype,
        "opset": next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), opset),
        "inputs": [i.name for i in graph.graph.input],
        "outputs": [o.name for o in graph.graph.output],
        "generation": {"eos_token_id": eos[0] if isinstance(eos, list) and len(eos) == 1 else eos, "pad_token_id": pad},
        "export_seconds": round(export_s, 1),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }
    (out / ONNX_METADATA).write_text(json.dumps(summary, indent=2))
    return summary


def _update_metadata(out: Path, **values) -> None:
    path = out / ONNX_METADATA
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data, indent=2))
