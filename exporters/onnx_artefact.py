"""An ONNX export as a derived artefact of its checkpoint: the quantised graph held to its thresholds
against the float checkpoint, its quality on the checkpoint's own held-out ledger rows, and its record
(`ArtefactRecord`, ledger stage `onnx-float32` / `onnx-int4` / ...) in a copy of the checkpoint's
gradprune.json written into the export folder, so `gradprune inspect EXPORT` and the model card show it
beside the checkpoint's own ledger points.

A checkpoint without gradprune.json (a plain Hugging Face model) still exports, without gradprune.json
(its numbers are in gradprune_onnx.json); without ledger rows (compressed or exported with --no-ledger)
the record has no quality point.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gradprune_deploy.artefacts import LogitsAdapter, artefact_stage, heldout_rows, measure_artefact, with_artefact
from gradprune_deploy.checkpoint import CheckpointInfo
from gradprune_deploy.data import Example
from gradprune_deploy.errors import ConfigError, ExportError, first_line
from gradprune_deploy.layout import MANIFEST, ONNX_GRAPH
from gradprune_deploy.manifest import ArtefactRecord, QualityPoint
from gradprune_deploy.runtime.onnx_runtime import OnnxCausalLM

from .onnx_quantize import DEFAULT_BLOCK_SIZE, quantize_export
from .onnx_validate import THRESHOLDS as QUANTIZED_THRESHOLDS
from .onnx_validate import check_thresholds, compare_with_torch

logger = logging.getLogger(__name__)


def ledger_rows(info: CheckpointInfo, *, ledger: bool, data: str | None) -> list[Example]:
    """The held-out rows the checkpoint's ledger was measured on ([] without a ledger); read before any
    slow work, so missing data fails the export at once (one line naming --ledger-data / --no-ledger)."""
    if not ledger:
        return []
    manifest = info.manifest
    if manifest is None or manifest.quality is None:
        if data:
            raise ConfigError(
                f"--ledger-data {data}: {info.path.name} has no quality ledger (no gradprune.json, or compressed with --no-ledger); "
                "leave --ledger-data out"
            )
        logger.info("%s has no quality ledger: the export gets no ledger stage", info.path.name)
        return []
    return heldout_rows(manifest, data=data)


def measure_export(export_dir: Path, model, tokenizer, rows: list[Example], *, stage: str) -> QualityPoint | None:
    """The export's loss (and accuracy) on the held-out rows, scored through onnxruntime by the ledger's own `measure`."""
    if not rows:
        return None
    lm = OnnxCausalLM(export_dir)
    return measure_artefact(LogitsAdapter(lm.logits, config=model.config), tokenizer, rows, stage=stage)


def export_files(export_dir: Path) -> tuple[list[str], int]:
    """The graph's files (model.onnx and its external data) and their bytes: what the artefact weighs."""
    files = sorted(p.name for p in export_dir.glob(ONNX_GRAPH + "*") if p.is_file())
    return files, sum((export_dir / f).stat().st_size for f in files)


def artefact_record(
    export_dir: Path, info: CheckpointInfo, *, quantization: str, settings: dict[str, Any], validation: dict[str, Any], quality
) -> ArtefactRecord:
    files, size = export_files(export_dir)
    return ArtefactRecord(
        stage=artefact_stage("onnx", quantization),
        format="onnx",
        quantization=quantization,
        files=files,
        size_bytes=size,
        source=str(info.path),
        settings=settings,
        validation=validation,
        quality=quality,
    )


def write_record(export_dir: Path, info: CheckpointInfo, record: ArtefactRecord) -> bool:
    """gradprune.json in the export: the checkpoint's manifest plus this artefact (False: no manifest to copy)."""
    if info.manifest is None:
        return False
    with_artefact(info.manifest, record).write(export_dir)
    if record.quality is not None:
        final = info.manifest.final_quality
        logger.info(
            "ledger %s: loss %.4f (checkpoint %s: %s)",
            record.stage,
            record.quality.loss,
            final.stage if final else "-",
            f"{final.loss:.4f}" if final and final.loss is not None else "-",
        )
    return True


def quantize_and_validate(out: Path, model, tokenizer, config, *, prompts: tuple[str, ...]) -> dict[str, Any]:
    """Quantise the validated float graph in place (`config`: an OnnxExportConfig), then hold it to the
    thresholds against the float checkpoint on `prompts`."""
    settings = quantize_export(
        out,
        quantization=config.quantize,
        block_size=config.block_size or DEFAULT_BLOCK_SIZE,
        quantizer=config.quantizer,
        lm_head=config.lm_head,
    )
    result: dict[str, Any] = {"quantization": {"type": config.quantize, **settings}, "opset": settings["opset"]}
    if not config.validate:
        return result
    default_diff, default_agreement = QUANTIZED_THRESHOLDS[config.quantize]
    max_diff = default_diff if config.atol is None else config.atol
    min_agreement = default_agreement if config.min_agreement is None else config.min_agreement
    try:
        numbers = compare_with_torch(OnnxCausalLM(out), model, tokenizer, prompts=prompts, new_tokens=config.new_tokens)
    except Exception as exc:  # noqa: BLE001 - onnxruntime could not run the quantised graph: still an export failure
        logger.debug("quantised validation failure", exc_info=True)
        raise ExportError(
            f"the {config.quantize} ONNX graph does not run in onnxruntime: {first_line(exc)} (nothing was written)"
        ) from None
    numbers.update(max_abs_logit_diff_allowed=max_diff, min_agreement=min_agreement)
    check_thresholds(numbers, max_logit_diff=max_diff, min_agreement=min_agreement, what=f"{config.quantize} ONNX")
    return {**result, "validation": numbers}


def record_artefact(out: Path, info: CheckpointInfo, model, tokenizer, rows, config, summary: dict) -> dict[str, Any]:
    """Score the export on the ledger rows and write its record; return what the CLI line shows of it."""
    quantization = config.quantize if config.quantize != "none" else config.dtype
    stage = artefact_stage("onnx", quantization)
    quality = measure_export(out, model, tokenizer, rows, stage=stage)
    settings = summary.get("quantization") or {"dtype": config.dtype}
    settings = {"opset": summary["opset"], **settings}
    record = artefact_record(
        out, info, quantization=quantization, settings=settings, validation=_record_validation(summary), quality=quality
    )
    written = write_record(out, info, record)
    return {
        "stage": stage,
        "size_bytes": record.size_bytes,
        "quality": {"loss": quality.loss, "accuracy": quality.accuracy, "rows": quality.rows} if quality else None,
        "manifest": MANIFEST if written else None,
    }


def _record_validation(summary: dict[str, Any]) -> dict[str, Any]:
    """The artefact record's validation: the quantised numbers as measured, or the float check's in the same terms."""
    v = summary.get("validation")
    if not v or "quantization" in summary:
        return dict(v or {})
    return {
        "prompts": v["prompts"],
        "new_tokens": v["greedy_new_tokens"],
        "max_abs_logit_diff": max(v["max_abs_diff_prefill_logits"], v["max_abs_diff_decode_logits"]),
        "max_abs_logit_diff_allowed": v["atol"],
        "greedy_token_agreement": 1.0,  # the float check refuses any greedy token that differs
        "greedy_tokens_identical": v["greedy_tokens_identical"],
    }
