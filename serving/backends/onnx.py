"""The onnx backend: onnxruntime on `gradprune export onnx` graphs (prefill, then one decode step per
token), each model in its own worker process (serving/bench_worker.py `OnnxRunner`). Exports are
given (--onnx-dense / --onnx-pruned) or made once into the cache and reused.

With `--onnx-quantize int4|int8` a third arm runs beside dense and pruned float32: the pruned checkpoint
exported and weight-quantised (`gradprune export onnx --quantize`, into the cache), measured in the same
interleaved schedule; each arm is reported as a ratio to the dense float32 graph next to the ideal
from the graphs' own weight bytes (serving/ideal.py `onnx_arm_ideals`)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporters.onnx import OnnxExportConfig, export_onnx
from gradprune_deploy.errors import ConfigError, ServingError
from gradprune_deploy.layout import ONNX_GRAPH, ONNX_METADATA
from gradprune_deploy.loading import cache_dir
from gradprune_deploy.utils import optional_import, require

from ..ideal import ideal_from_checkpoints, onnx_arm_ideals, onnx_graph_costs
from .base import BenchBackend
from .worker import run_worker_backend

if TYPE_CHECKING:
    from ..bench_config import BenchConfig

logger = logging.getLogger(__name__)


class OnnxBackend(BenchBackend):
    name = "onnx"
    colour = "#2ca02c"

    def check_inputs(self, config: BenchConfig) -> None:
        if config.onnx_quantize != "none" and self.name not in config.backends:
            raise ConfigError(f"--onnx-quantize {config.onnx_quantize} adds an arm to the onnx backend: add --backend onnx (or all)")
        if config.onnx_quantized and config.onnx_quantize == "none":
            raise ConfigError("--onnx-quantized is the export for the --onnx-quantize arm: add --onnx-quantize int4 or int8")
        given = (("--onnx-dense", config.onnx_dense), ("--onnx-pruned", config.onnx_pruned), ("--onnx-quantized", config.onnx_quantized))
        for flag, path in given:
            if path and not (Path(path).expanduser() / ONNX_GRAPH).is_file():
                raise ConfigError(f"{flag} {path}: no model.onnx there: give a `gradprune export onnx` output, or leave {flag} out")

    def check_environment(self, config: BenchConfig) -> None:
        if config.onnx_quantize != "none" and self.dtype(config) != "float32":
            raise ConfigError(f"--onnx-quantize {config.onnx_quantize} quantises the float32 graph: use --dtype float32 (or auto on CPU)")
        if self.dtype(config) == "bfloat16":
            raise ConfigError("--dtype bfloat16 cannot be exported to ONNX: use --dtype float16 or float32 with --backend onnx")
        extra = "onnx-gpu" if config.device == "cuda" else "onnx"
        for module in ("onnxruntime", "onnx", "onnxscript"):
            require(module, extra)
        if config.device == "cuda" and "CUDAExecutionProvider" not in optional_import("onnxruntime", extra).get_available_providers():
            raise ConfigError(
                "--backend onnx --device cuda: onnxruntime has no CUDAExecutionProvider: "
                "pip install 'gradprune-deploy[onnx-gpu]' (onnxruntime-gpu) in place of onnxruntime"
            )

    def dtype(self, config: BenchConfig) -> str:
        """The ONNX export supports float32 and float16 (no bfloat16)."""
        return ("float16" if config.device == "cuda" else "float32") if config.dtype == "auto" else config.dtype

    def run(self, checkpoints: dict[str, Path], prompts: list[list[int]], tokenizer, config: BenchConfig) -> dict[str, Any]:
        given = {"dense": config.onnx_dense, "pruned": config.onnx_pruned}
        dtype = self.dtype(config)
        exports = {label: ensure_onnx_export(directory, given[label], dtype=dtype) for label, directory in checkpoints.items()}
        arms = dict(checkpoints)
        if config.onnx_quantize != "none":  # the third arm: the pruned checkpoint, quantised
            label = f"pruned-{config.onnx_quantize}"
            arms[label] = checkpoints["pruned"]
            exports[label] = ensure_onnx_export(checkpoints["pruned"], config.onnx_quantized, dtype=dtype, quantize=config.onnx_quantize)
        onnx_dirs = {label: path for label, (path, _) in exports.items()}
        result = run_worker_backend(self, arms, prompts[: config.num_prompts], config, onnx_dirs=onnx_dirs)
        for label, path in onnx_dirs.items():
            result["samples"][label]["file_size_bytes"] = [graph_file_bytes(path)]
        result["onnx_exports"] = {label: {"path": str(path), "origin": origin} for label, (path, origin) in exports.items()}
        if len(arms) > 2:
            costs = {label: onnx_graph_costs(path) for label, path in onnx_dirs.items()}
            prefill = ideal_from_checkpoints(
                checkpoints["dense"], checkpoints["pruned"], input_len=config.input_len, output_len=config.output_len
            )["ratios"]["prefill_flops"]
            result["arm_ideals"] = onnx_arm_ideals(costs, prefill_flops_ratio=prefill)
            result["onnx_graph_costs"] = costs
        return result

    def settings(self, config: BenchConfig) -> dict[str, Any]:
        return {**super().settings(config), "onnx_quantize": config.onnx_quantize}


def graph_file_bytes(export_dir: Path) -> int:
    """model.onnx and its external data: what the arm weighs on disk."""
    return sum(p.stat().st_size for p in Path(export_dir).glob(ONNX_GRAPH + "*") if p.is_file())


def onnx_cache_dir(checkpoint: Path, dtype: str, quantize: str = "none") -> Path:
    """Where an automatic export of this checkpoint lives: keyed by path, weights' size and mtime."""
    stamp = (
        [str(checkpoint.resolve()), dtype]
        + ([] if quantize == "none" else [f"quantize={quantize}"])
        + [
            f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
            for p in sorted(checkpoint.glob("*.safetensors")) + [checkpoint / "config.json"]
        ]
    )
    key = hashlib.sha1("\n".join(stamp).encode()).hexdigest()[:16]
    return cache_dir() / "bench-onnx" / f"{checkpoint.name}{'' if quantize == 'none' else '-' + quantize}-{key}"


def ensure_onnx_export(checkpoint: Path, given: str | None, *, dtype: str = "float32", quantize: str = "none") -> tuple[Path, str]:
    """An ONNX export of `checkpoint`: the one given, the cached one, or a fresh export into the cache
    (validated as every export is; its held-out ledger is left to `gradprune export onnx`)."""
    if given:
        path = Path(given).expanduser().resolve()
        if not path.is_dir():
            raise ServingError(
                f"ONNX export {path} not found: check --onnx-dense / --onnx-pruned / --onnx-quantized, "
                "or leave them out to export automatically"
            )
        return path, "given"
    out = onnx_cache_dir(checkpoint, dtype, quantize)
    if (out / ONNX_METADATA).is_file() and (out / ONNX_GRAPH).is_file():
        return out, "cached"
    logger.info("exporting %s to ONNX (%s%s) in %s", checkpoint, dtype, "" if quantize == "none" else f", {quantize}", out)
    export_onnx(OnnxExportConfig(str(checkpoint), out=str(out), dtype=dtype, quantize=quantize, ledger=False, overwrite=True))
    return out, "exported"
