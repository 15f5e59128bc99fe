"""What every exporter needs to know about a checkpoint directory, read without loading weights.

`inspect_checkpoint` reads config.json, the safetensors headers (tensor names and shapes, no
tensor data), any `eval_*.json` / `bench/` reports and, on first use, the optional
`gradprune.json` manifest (through `Manifest`, its one reader). It refuses a directory that
cannot be exported: no config, no weights, shards missing, or weights whose decoder layers
disagree with `num_hidden_layers` (a pruned model whose config was not rewritten would load with
random or missing layers).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import layout
from .errors import ModelLoadError
from .loading import check_json_files
from .manifest import Manifest
from .safetensors_header import LAYER_KEY as _LAYER
from .safetensors_header import read_safetensors_header, safetensors_files
from .utils import read_json_object

logger = logging.getLogger(__name__)


@dataclass
class CheckpointInfo:
    """A checkpoint directory as the exporters see it (all fields read from files, nothing loaded)."""

    path: Path
    config: dict[str, Any]
    weight_files: list[str]
    tensors: dict[str, tuple[str, list[int]]]  # name → (safetensors dtype, shape)
    evals: list[dict[str, Any]] = field(default_factory=list)

    @functools.cached_property
    def manifest(self) -> Manifest | None:
        """gradprune.json through `Manifest`, its one reader; None when there is none (not made by `compress`).

        Read on first use, so exports that never look at it (ONNX, vLLM, serve) are not refused over
        it; a corrupt, off-schema or newer-schema manifest raises `Manifest.read`'s one-line error
        (a model card built on a guessed manifest would mislead).
        """
        return Manifest.read_optional(self.path)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""

    @property
    def num_layers(self) -> int | None:
        return self.config.get("num_hidden_layers")

    @property
    def num_parameters(self) -> int:
        """Parameters stored in the weights (tied embeddings are stored, and counted, once)."""
        return sum(math.prod(shape) for _, shape in self.tensors.values())

    @property
    def weights_dtype(self) -> str:
        """The most common tensor dtype in the weights, e.g. 'F32' or 'BF16'."""
        counts: dict[str, int] = {}
        for dtype, shape in self.tensors.values():
            counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
        return max(counts, key=counts.get) if counts else "unknown"

    @property
    def config_dtype(self) -> str | None:
        return self.config.get("dtype") or self.config.get("torch_dtype")

    def layer_indices(self) -> list[int]:
        return sorted({int(m.group(1)) for name in self.tensors if (m := _LAYER.search(name))})


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("ignoring %s: %s", path, exc)
        return None


def inspect_checkpoint(checkpoint_dir: str | os.PathLike) -> CheckpointInfo:
    """Read and check a checkpoint directory; raise ModelLoadError naming what is missing."""
    path = Path(checkpoint_dir).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"checkpoint directory {path} not found: pass the output directory of `gradprune compress`")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    check_json_files(path)  # config.json, the tokenizer's and the generation config's: UTF-8 JSON objects
    config = read_json_object(config_path, ModelLoadError)
    files = safetensors_files(path)
    if not files:
        pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = f" (found pickled {pickled[0]}: convert it to safetensors)" if pickled else ""
        raise ModelLoadError(f"{path} has a config but no weights (*.safetensors){hint}: the checkpoint is incomplete")
    tensors: dict[str, tuple[str, list[int]]] = {}
    for name in files:
        tensors.update(read_safetensors_header(path / name))
    evals = [e for p in layout.eval_reports(path) if isinstance(e := _read_json(p), dict)]
    info = CheckpointInfo(path.resolve(), config, files, tensors, evals)
    check_layers_complete(info)
    return info


def check_layers_complete(info: CheckpointInfo) -> None:
    """The weights hold exactly layers 0..num_hidden_layers-1, each with the same tensor names."""
    n = info.num_layers
    found = info.layer_indices()
    if not isinstance(n, int) or not found:
        return  # not a layer-stacked decoder we can check; the backend will judge
    if found != list(range(n)):
        missing = sorted(set(range(n)) - set(found))
        extra = sorted(set(found) - set(range(n)))
        detail = (
            (f"missing layer(s) {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected layer(s) {extra}" if extra else "")
        )
        raise ModelLoadError(
            f"{info.path}: config.json says num_hidden_layers={n} but the weights disagree ({detail}): "
            "the checkpoint is incomplete or its config was not rewritten after pruning"
        )
    per_layer: dict[int, set[str]] = {}
    for name in info.tensors:
        if m := _LAYER.search(name):
            per_layer.setdefault(int(m.group(1)), set()).add(name[m.end() :])
    reference = per_layer[0]
    for idx, names in per_layer.items():
        if names != reference:  # legitimate in mixed dense/MoE stacks, a truncated save otherwise
            logger.warning("layer %d holds different tensors than layer 0 (e.g. %s)", idx, sorted(names ^ reference)[0])


def find_reports(path: Path) -> dict[str, list[Path]]:
    """Plots and benchmark reports that belong on a model card: layer importance, bench/*."""
    bench = layout.bench_dir(path)
    return {
        "layer_plot": [p for p in [path / layout.LAYER_PLOT] if p.is_file()],
        "bench_plots": sorted(bench.glob("*.png")) if bench.is_dir() else [],
        "bench_md": [p for p in [bench / layout.BENCH_REPORT_MD] if p.is_file()],
        "bench_json": [p for p in [bench / layout.BENCH_REPORT_JSON] if p.is_file()],
    }
