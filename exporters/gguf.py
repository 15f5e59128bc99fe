"""Export a checkpoint to GGUF for llama.cpp and Ollama, validate it, and measure its quality.

`gradprune export gguf CHECKPOINT --out DIR --type f16|q8_0|q4_0` writes, atomically:

    DIR/model-<type>.gguf   the model: llama.cpp's architecture metadata (block count = the pruned layer
                            count), tensor names and layouts, and the byte-level BPE tokenizer with its
                            pre-tokenizer, special tokens and chat template (gguf_layout.py, gguf_vocab.py)
    DIR/Modelfile           `ollama create NAME -f Modelfile`
    DIR/gradprune_gguf.json the artefact record: file, size, settings, validation numbers, quality
    DIR/gradprune.json      the checkpoint's manifest with this artefact's ledger stage (gguf-<type>) added,
                            when the checkpoint has one

The file is written with the `gguf` package (gguf-py, llama.cpp's own writer and numpy quantisers; q4_K and
other k-quants have no quantiser there, so only f16, q8_0 and q4_0 are offered). Before the output appears
it is read back with transformers' GGUF loader and compared with the checkpoint (gguf_validate.py); then
the read-back model is scored on the checkpoint's held-out ledger rows, so the ledger's number is the
GGUF's own, not the checkpoint's. Architectures it cannot write are refused from config.json, before any
weight is read.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import gguf
from transformers import AutoTokenizer

from gradprune_deploy.artefacts import artefact_stage, heldout_rows, measure_artefact, with_artefact
from gradprune_deploy.checkpoint import inspect_checkpoint
from gradprune_deploy.config_schema import validate_fields
from gradprune_deploy.errors import ArchitectureError, ConfigError
from gradprune_deploy.layout import GGUF_METADATA, MODELFILE, gguf_file_name
from gradprune_deploy.loading import load_model_and_tokenizer
from gradprune_deploy.manifest import ArtefactRecord
from gradprune_deploy.utils import atomic_output_dir, check_output_dir
from gradprune_deploy.verify import verify_checkpoint

from .gguf_layout import QUANT_TYPES, GgufTarget, gguf_tensors, target_for, unsupported_reason, write_hyperparameters
from .gguf_validate import ATOL, MIN_AGREEMENT, validate_gguf
from .gguf_vocab import pre_tokenizer_name, write_vocabulary

logger = logging.getLogger(__name__)


@dataclass
class GgufExportConfig:
    """Write a GGUF for llama.cpp / Ollama, validated against the checkpoint and scored on its held-out ledger rows."""

    checkpoint: str = field(metadata={"positional": True, "help": "checkpoint directory to export"})
    out: str | None = field(default=None, metadata={"help": "output directory (written atomically)"})
    type: Literal["f16", "q8_0", "q4_0"] = field(
        default="q8_0", metadata={"help": "storage type of the weights (norms stay float32; q4_0 keeps the embedding at q8_0)"}
    )
    atol: float | None = field(
        default=None,
        metadata={
            "help": "max |Δ logits| allowed against the checkpoint (default f16 0.2, q8_0 8, q4_0 40: measured, see gguf_validate.py)"
        },
    )
    min_agreement: float | None = field(
        default=None,
        metadata={"help": "least share of greedy steps picking the checkpoint's token (default f16 1, q8_0 0.95, q4_0 0.5)"},
    )
    new_tokens: int = field(default=32, metadata={"help": "greedy tokens generated per validation prompt"})
    ledger_data: str | None = field(
        default=None, metadata={"help": "the compress run's --data, when it has moved (to re-derive the held-out ledger rows)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out"})

    def __post_init__(self):
        validate_fields(self)
        if not self.out:
            raise ConfigError("--out is required: the directory to write the GGUF export to")
        if self.atol is not None and not self.atol > 0:
            raise ConfigError(f"--atol must be positive, got {self.atol}")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise ConfigError(f"--min-agreement is a share between 0 and 1, got {self.min_agreement}")
        if self.new_tokens < 1:
            raise ConfigError(f"--new-tokens must be at least 1, got {self.new_tokens}")


def _refuse_architecture(info) -> GgufTarget:
    """The GGUF target of the checkpoint, or one ArchitectureError — from config.json alone, before any weight is read."""
    reason = unsupported_reason(info.config)
    if reason:
        raise ArchitectureError(f"{info.architecture or 'this architecture'} cannot be exported to GGUF: {reason}")
    return target_for(info.config)


def _pre_tokenizer(path: Path) -> str:
    """llama.cpp's pre-tokenizer name for the checkpoint's tokenizer, or one ArchitectureError."""
    pre = pre_tokenizer_name(AutoTokenizer.from_pretrained(path))
    if pre is None:
        raise ArchitectureError(
            f"the tokenizer of {path} is not one whose llama.cpp pre-tokenizer is known here (the SmolLM/SmolLM2 "
            "byte-level BPE): llama.cpp would split text differently from the checkpoint, so no GGUF is written"
        )
    return pre


def write_gguf(path: Path, model, tokenizer, checkpoint: Path, *, target: GgufTarget, pre: str, quant: str) -> dict[str, int]:
    """Write the GGUF file; return how many tensors of each storage type it holds."""
    writer = gguf.GGUFWriter(path, target.arch)
    writer.add_type("model")
    writer.add_name(checkpoint.name)
    write_hyperparameters(writer, model.config, file_type=QUANT_TYPES[quant][1])
    write_vocabulary(writer, tokenizer, checkpoint, vocab_size=model.config.vocab_size, pre=pre)
    named = ((name, p.detach().float().numpy()) for name, p in model.named_parameters())
    types: Counter[str] = Counter()
    for name, data, qtype in gguf_tensors(named, model.config, target, quant=quant):
        writer.add_tensor(name, data, raw_dtype=qtype)
        types[qtype.name] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dict(types)


def modelfile(gguf_name: str, *, has_chat_template: bool) -> str:
    """Ollama's Modelfile. No TEMPLATE line: Ollama reads the chat template from the GGUF's
    tokenizer.chat_template itself, and a hand translation of Jinja to Go templates could differ from it."""
    note = (
        "# The chat template is in the GGUF (tokenizer.chat_template); Ollama reads it from there."
        if has_chat_template
        else "# The checkpoint has no chat template: Ollama will treat prompts as plain text."
    )
    return f"# ollama create NAME -f Modelfile\nFROM ./{gguf_name}\n{note}\n"


def export_gguf(config: GgufExportConfig) -> dict[str, Any]:
    """`gradprune export gguf`: write `config.out` atomically; return the summary (also in gradprune_gguf.json)."""
    info = inspect_checkpoint(config.checkpoint)
    target = _refuse_architecture(info)
    check_output_dir(config.out, overwrite=config.overwrite, inputs={"checkpoint": config.checkpoint})
    verify_checkpoint(info.path)
    pre = _pre_tokenizer(info.path)
    manifest = info.manifest
    rows = heldout_rows(manifest, data=config.ledger_data) if manifest else []  # a moved --data fails here, not after the export
    atol = ATOL[config.type] if config.atol is None else config.atol
    min_agreement = MIN_AGREEMENT[config.type] if config.min_agreement is None else config.min_agreement
    name = gguf_file_name(config.type)
    with atomic_output_dir(config.out, overwrite=config.overwrite) as tmp:
        model, tokenizer = load_model_and_tokenizer(info.path, dtype="float32")
        types = write_gguf(tmp / name, model, tokenizer, info.path, target=target, pre=pre, quant=config.type)
        report, loaded, loaded_tokenizer = validate_gguf(
            tmp / name, model, tokenizer, quant=config.type, atol=atol, min_agreement=min_agreement, new_tokens=config.new_tokens
        )
        del model  # the read-back model is the one scored
        stage = artefact_stage("gguf", config.type)
        record = ArtefactRecord(
            stage=stage,
            format="gguf",
            quantization=config.type,
            files=[name, MODELFILE],
            size_bytes=(tmp / name).stat().st_size,
            source=str(config.checkpoint),
            settings={
                "architecture": target.arch,
                "block_count": loaded.config.num_hidden_layers,
                "pre_tokenizer": pre,
                "tensor_types": types,
                "writer": f"gguf-py {importlib.metadata.version('gguf')}",
            },
            validation=report,
            quality=measure_artefact(loaded, loaded_tokenizer, rows, stage=stage) if rows else None,
        )
        (tmp / MODELFILE).write_text(modelfile(name, has_chat_template=bool(tokenizer.chat_template)))
        (tmp / GGUF_METADATA).write_text(json.dumps(asdict(record), indent=2, default=str) + "\n")
        if manifest is not None:
            with_artefact(manifest, record).write(tmp)
    return _summary(record, out=Path(config.out).expanduser().resolve())


def _summary(record: ArtefactRecord, *, out: Path) -> dict[str, Any]:
    quality = record.quality
    return {
        "out": str(out),
        "file": record.files[0],
        "type": record.quantization,
        "size_bytes": record.size_bytes,
        "block_count": record.settings["block_count"],
        "validation": record.validation,
        "quality": None if quality is None else {"loss": quality.loss, "accuracy": quality.accuracy, "rows": quality.rows},
        "run": f"ollama create NAME -f {out / MODELFILE}   |   llama-cli -m {out / record.files[0]}",
    }
