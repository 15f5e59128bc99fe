"""A safetensors checkpoint's layout, read from the file headers only (no tensor data, no torch).

The one reader of the format's header (8-byte little-endian length + JSON), shared by the
weight-coverage check in `loading`, the exporters' `inspect_checkpoint`, the bench's cost model and the
size check of `verify` (`promised_file_size`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import ModelLoadError

_MAX_HEADER_BYTES = 100_000_000
_SHOW_MISSING = 3

# Bytes per element of each safetensors dtype, and the tensor-name pattern of a decoder layer.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
LAYER_KEY = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def _read_header(path: Path, describe):
    """describe(header length, header JSON) from a .safetensors file; raise ModelLoadError if unreadable."""
    try:
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if not 0 < length <= _MAX_HEADER_BYTES:
                raise ValueError("bad header length")
            header = json.loads(fh.read(length))
        return describe(length, {name: meta for name, meta in header.items() if name != "__metadata__"})
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({exc}): the checkpoint is corrupt") from None


def read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype, shape)} from a .safetensors file's JSON header; raise ModelLoadError if unreadable."""
    return _read_header(path, lambda _, tensors: {name: (meta["dtype"], list(meta["shape"])) for name, meta in tensors.items()})


def promised_file_size(path: Path) -> int:
    """The bytes a .safetensors file must hold, by its own header: the 8-byte length, the header, and the
    data up to the end of the last tensor (a file cut short, or with bytes appended, differs)."""
    return _read_header(path, lambda length, tensors: 8 + length + max((int(m["data_offsets"][1]) for m in tensors.values()), default=0))


def safetensors_files(path: Path) -> list[str]:
    """The checkpoint's weight files: the shards its index lists (all present), else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(p.name for p in path.glob("*.safetensors"))
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{index} is unreadable ({exc}): the checkpoint is corrupt") from None
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(f"{path} is incomplete: shard(s) {', '.join(missing[:_SHOW_MISSING])} listed in {index.name} are missing")
    return files
