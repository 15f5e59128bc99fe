"""Derived artefacts of a checkpoint (ONNX float / int4 / int8, GGUF): their quality, measured on the
checkpoint's own held-out ledger rows, and their record in the artefact's own gradprune.json.

An exporter that writes a derived artefact (`export onnx --quantize int4`, `export gguf --type q8_0`)
re-derives the held-out validation rows the checkpoint's ledger was measured on (`heldout_rows`: the
same data, split, seed and fraction as the compress run, recorded in gradprune.json), scores the
artefact on them with the functions `gradprune eval` and the ledger use (`measure_artefact`, through
`LogitsAdapter` when the artefact is not a torch model), and writes a copy of the source manifest into
the artefact's folder with that point added as a ledger stage (`stage="onnx-int4"`, ...) and an
`ArtefactRecord` describing the file (`with_artefact`). The input checkpoint is never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .compress.ledger import heldout_rows, measure
from .data import Example
from .errors import DataError
from .manifest import ArtefactRecord, Manifest, QualityPoint

__all__ = ["LogitsAdapter", "artefact_stage", "heldout_rows", "measure_artefact", "with_artefact"]


def artefact_stage(fmt: str, quantization: str) -> str:
    """The ledger stage name of an artefact, e.g. onnx-int4, gguf-q8_0."""
    return f"{fmt}-{quantization}"


class LogitsAdapter(torch.nn.Module):
    """A torch-module face for a runtime that returns logits (onnxruntime, llama.cpp, ...), so the ledger's
    and `gradprune eval`'s scoring functions (which call `model(input_ids=..., attention_mask=...)`) run on
    it unchanged. `logits_fn(input_ids, attention_mask)` takes and returns numpy arrays (batch × seq[× vocab]);
    rows are left-padded, as the scoring functions pass them. `config` (the source model's config) gives
    the scorers the context length they cut long rows to (`evaluate_model` reads `model.config`)."""

    def __init__(self, logits_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], *, config=None):
        super().__init__()
        self.logits_fn = logits_fn
        self.config = config
        self._anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the scorers a device

    def forward(self, input_ids, attention_mask=None, logits_to_keep: int = 0, **_ignored):
        ids = input_ids.cpu().numpy().astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy().astype(np.int64)
        logits = torch.from_numpy(np.asarray(self.logits_fn(ids, mask), dtype=np.float32))
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return _Output(logits)


class _Output:
    def __init__(self, logits: torch.Tensor):
        self.logits = logits


def measure_artefact(model, tokenizer, rows: Sequence[Example], *, stage: str, batch_size: int = 8) -> QualityPoint:
    """The artefact's quality on the held-out rows (loss, and accuracy when rows have choices): the
    ledger's own `measure`, so the numbers are comparable with the checkpoint's ledger points."""
    if not rows:
        raise DataError("no held-out rows to measure the artefact on: the checkpoint was compressed with --no-ledger")
    return measure(model, tokenizer, rows, stage=stage, batch_size=batch_size)


def with_artefact(source: Manifest, record: ArtefactRecord) -> Manifest:
    """A copy of the source checkpoint's manifest with the artefact's record and its ledger point added
    (an existing point of the same stage is replaced). The source manifest is not changed."""
    manifest = copy.deepcopy(source)
    manifest.artefacts = [a for a in manifest.artefacts if a.stage != record.stage] + [record]
    if manifest.quality is not None and record.quality is not None:
        manifest.quality.points = [p for p in manifest.quality.points if p.stage != record.stage] + [record.quality]
    return manifest
