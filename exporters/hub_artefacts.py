"""`export hub --with onnx-int4 gguf-q8_0 ...`: the derived artefacts published beside the checkpoint.

Each artefact is built by its own exporter (`export_onnx`, `export_gguf`: validated against the checkpoint
and scored on its held-out ledger rows, or refused) into a temporary folder before the first request to
the Hub, and uploaded in the same commit under a folder named for its stage (`onnx-int4/`, `gguf-q8_0/`).
The card lists each with its size, its agreement with the checkpoint, its measured quality and how to run it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from gradprune_deploy.artefacts import with_artefact
from gradprune_deploy.errors import ConfigError
from gradprune_deploy.manifest import ArtefactRecord, Manifest

from .gguf import GgufExportConfig, export_gguf
from .onnx import OnnxExportConfig, export_onnx

logger = logging.getLogger(__name__)


def _onnx(quantize: str) -> Callable[[Path, Path], None]:
    return lambda checkpoint, out: export_onnx(OnnxExportConfig(str(checkpoint), out=str(out), quantize=quantize))


def _gguf(kind: str) -> Callable[[Path, Path], None]:
    return lambda checkpoint, out: export_gguf(GgufExportConfig(str(checkpoint), out=str(out), type=kind))


# artefact name (= its ledger stage and its folder in the repo) → how to build it
BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "onnx-float32": _onnx("none"),
    "onnx-int4": _onnx("int4"),
    "onnx-int8": _onnx("int8"),
    "gguf-f16": _gguf("f16"),
    "gguf-q8_0": _gguf("q8_0"),
    "gguf-q4_0": _gguf("q4_0"),
}


def parse_artefacts(values: list[str] | None) -> list[str]:
    """The requested artefact names (space- or comma-separated, each once), or one ConfigError listing the choices."""
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise ConfigError(f"--with {unknown[0]!r}: choose from {', '.join(BUILDERS)} (e.g. --with onnx-int4,gguf-q8_0)")
    return list(dict.fromkeys(names))


def build_artefacts(checkpoint: Path, names: list[str], workdir: Path) -> dict[str, ArtefactRecord]:
    """Build each artefact into workdir/<name>; return name → its record (read back from its gradprune.json;
    a checkpoint without a manifest gets an empty record per artefact)."""
    records = {}
    for name in names:
        logger.info("building %s for the upload", name)
        BUILDERS[name](checkpoint, workdir / name)
        manifest = Manifest.read_optional(workdir / name)
        record = next((a for a in manifest.artefacts if a.stage == name), None) if manifest else None
        records[name] = record or ArtefactRecord(stage=name, format=name.split("-")[0], quantization=name.split("-", 1)[1])
    return records


def card_manifest(manifest: Manifest | None, records: dict[str, ArtefactRecord]) -> Manifest | None:
    """The checkpoint's manifest with every published artefact added (what the card describes)."""
    if manifest is None:
        return None
    for record in records.values():
        manifest = with_artefact(manifest, record)
    return manifest
