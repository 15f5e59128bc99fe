"""Read and verify a whole checkpoint before anything leaves the machine.

The header checks (`checkpoint.inspect_checkpoint`, `loading.check_weights_cover_model`) say what
the files promise: every shard the index lists, the layers the config announces, every tensor the
model builds with its shape. A file cut to half its size, or a tensor full of NaN, passes them all.
`verify_checkpoint` also reads what the files hold, so `export hub|onnx|vllm|gguf` and `serve` never
publish or serve a broken model:

- each safetensors file has exactly the size its header promises (header + the end of the last
  tensor's data), so a truncated copy or an interrupted save is named before any tensor is read;
- every tensor is readable and finite, read one at a time (`safe_open`), so memory stays one tensor;
- the tokenizer loads (`AutoTokenizer`, no remote code), and a checkpoint without one is refused.

Every refusal is one ModelLoadError line naming the file (and tensor) and the fix.
`first_non_finite` is the one finiteness test: `compress` uses it on the model before saving.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from .checkpoint import CheckpointInfo, inspect_checkpoint
from .errors import ModelLoadError, first_line
from .loading import check_weights_cover_model
from .safetensors_header import promised_file_size

logger = logging.getLogger(__name__)

# Any one of these makes a tokenizer AutoTokenizer can build (fast tokenizers.json, sentencepiece,
# BPE vocab + merges, WordPiece vocab, tiktoken); tokenizer_config.json alone is not one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
_EXACT_DTYPES = (torch.float64,)  # a float64 sum of finite float64 values can itself overflow


@dataclass(frozen=True)
class Verified:
    """A verified checkpoint: what `inspect_checkpoint` read (config, weight files, headers), the
    tensors and bytes read, and how long it took."""

    info: CheckpointInfo
    tensors: int
    bytes: int
    seconds: float

    @property
    def path(self) -> Path:
        return self.info.path


def count_non_finite(tensor: torch.Tensor) -> int:
    """NaN and ±inf entries in `tensor`; 0 for integer and bool tensors.

    Fast path: one float64 sum. It is finite exactly when every entry is (a NaN or inf propagates,
    and a float64 sum of float32/16 values cannot overflow), so a healthy tensor costs one
    reduction and no temporary mask; only a broken one is counted entry by entry."""
    if not tensor.is_floating_point():
        return 0
    if tensor.element_size() == 1:  # float8: no sum or isfinite kernels; its values fit float32 exactly
        tensor = tensor.float()
    if tensor.dtype not in _EXACT_DTYPES and torch.isfinite(tensor.sum(dtype=torch.float64)):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def first_non_finite(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int] | None:
    """(name, count) of the first tensor holding NaN or inf, or None when every one is finite."""
    for name, tensor in named_tensors:
        bad = count_non_finite(tensor.detach())
        if bad:
            return name, bad
    return None


def _check_file_sizes(path: Path, files: list[str], *, where: str) -> int:
    """Every file exactly as long as its header promises; the total bytes."""
    total = 0
    for name in files:
        promised, actual = promised_file_size(path / name), (path / name).stat().st_size
        if actual != promised:
            cut = "truncated" if actual < promised else "longer than its header says"
            raise ModelLoadError(
                f"{where}: {name} is {cut} ({actual:,} bytes on disk, its header promises {promised:,}): "
                "an interrupted copy or save; copy it again from the source, or re-run `gradprune compress`"
            )
        total += actual
    return total


def _check_tensors(file: Path, *, where: str) -> int:
    """Read every tensor of one file, one at a time; refuse an unreadable or non-finite one. Tensors read."""
    count = 0
    try:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                count += 1
                bad = count_non_finite(_read_tensor(handle, key, file, where=where))
                if bad:
                    raise ModelLoadError(
                        f"{where}: tensor {key} in {file.name} holds {bad:,} non-finite values (NaN/inf): the weights are "
                        "broken (a diverged fine-tune?); re-run `gradprune compress` (with a lower --learning-rate), "
                        "or use the checkpoint it was made from"
                    )
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors' own errors: a header it cannot map is a corrupt file
        raise ModelLoadError(
            f"{where}: {file.name} is not a readable safetensors file ({first_line(exc)}): copy it again from the source"
        ) from None
    return count


def _read_tensor(handle, key: str, file: Path, *, where: str) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 - any failure to read one tensor names it
        raise ModelLoadError(
            f"{where}: tensor {key} in {file.name} cannot be read ({first_line(exc)}): copy the file again from the source"
        ) from None


def check_tokenizer(path: str | os.PathLike, *, where: str | None = None) -> None:
    """The checkpoint's tokenizer loads with AutoTokenizer (no remote code); refuse one without tokenizer files."""
    path = Path(path)
    where = where or str(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise ModelLoadError(
            f"{where} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}), so nothing could serve or run it: "
            "copy the tokenizer files from the base model (or save its tokenizer there with `tokenizer.save_pretrained`)"
        )
    try:
        AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - whatever the tokenizer files hold, one line naming them
        raise ModelLoadError(
            f"{where}: the tokenizer does not load ({first_line(exc)}): copy the tokenizer files from the base model"
        ) from None


def verify_checkpoint(path: str | os.PathLike, *, flag: str = "checkpoint") -> Verified:
    """Read the whole checkpoint at `path` and refuse it, in one ModelLoadError line, unless every check
    passes: config and shards present, weights covering the model, each file the size its header
    promises, every tensor readable and finite, the tokenizer loadable. `flag` names the option the user
    gave the path with (`checkpoint`, `--model`), at the start of every message."""
    start = time.perf_counter()
    info = inspect_checkpoint(path)  # config.json, every shard of the index, headers, layer count
    check_weights_cover_model(info.path)  # every tensor the config builds, none extra, right shapes
    where = f"{flag} {info.path}"
    size = _check_file_sizes(info.path, info.weight_files, where=where)
    tensors = sum(_check_tensors(info.path / name, where=where) for name in info.weight_files)
    check_tokenizer(info.path, where=where)
    verified = Verified(info, tensors, size, time.perf_counter() - start)
    logger.info(
        "verified %s: %d tensors in %d file(s), %.1f MB, all finite; tokenizer loads (%.2f s)",
        info.path,
        tensors,
        len(info.weight_files),
        size / 1e6,
        verified.seconds,
    )
    return verified
