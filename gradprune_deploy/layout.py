"""Every file name in a checkpoint folder (and an ONNX export's folder), in one place.

A compressed checkpoint is a standard Hugging Face directory plus the records gradprune writes
beside it. Writers and readers (compress, eval, bench, the exporters, the model card) take the
names from here, so a rename is one edit:

    <checkpoint>/
      config.json, model*.safetensors, tokenizer files      the standard checkpoint
      gradprune.json                                         MANIFEST: how it was made, the quality ledger
      layer_importance.png                                   LAYER_PLOT: every layer's score, dropped marked
      eval_<data>_<split>_<metric>.json                      eval_report_name(...): `gradprune eval` results
      bench/                                                 BENCH_DIR: `gradprune bench` reports and plots
        report.json, report.md, report.png                   BENCH_REPORT_JSON, _MD, _PNG
    <onnx export>/
      model.onnx (+ decode graph), gradprune_onnx.json       ONNX_GRAPH, ONNX_METADATA
    <gguf export>/
      model-<type>.gguf, Modelfile, gradprune_gguf.json      gguf_file_name(type), MODELFILE, GGUF_METADATA
"""

from __future__ import annotations

import re
from pathlib import Path

MANIFEST = "gradprune.json"
LAYER_PLOT = "layer_importance.png"
BENCH_DIR = "bench"
BENCH_REPORT_JSON = "report.json"
BENCH_REPORT_MD = "report.md"
BENCH_REPORT_PNG = "report.png"
EVAL_GLOB = "eval_*.json"
ONNX_GRAPH = "model.onnx"
ONNX_METADATA = "gradprune_onnx.json"
GGUF_METADATA = "gradprune_gguf.json"
MODELFILE = "Modelfile"  # Ollama's

_UNSAFE = re.compile(r"[^\w.-]+")


def safe_name(text: str) -> str:
    """A file-name-safe form of `text` (runs of other characters become one '-')."""
    return _UNSAFE.sub("-", text).strip("-")


def eval_report_name(data_name: str, split: str, metric: str) -> str:
    return f"eval_{safe_name(data_name) or 'data'}_{safe_name(split)}_{metric}.json"


def eval_reports(checkpoint: str | Path) -> list[Path]:
    return sorted(Path(checkpoint).glob(EVAL_GLOB))


def bench_dir(checkpoint: str | Path) -> Path:
    return Path(checkpoint) / BENCH_DIR


def gguf_file_name(quant: str) -> str:
    return f"model-{quant}.gguf"
