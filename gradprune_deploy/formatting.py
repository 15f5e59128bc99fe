"""How configs and records describe and print themselves: `help_field` (a dataclass field with its
help text, the one helper every config dataclass and manifest record uses) and `fmt` (a number, or
'–' when there is none). Torch-free."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def help_field(default: Any = None, help_text: str = "", *, init: bool = True, **metadata: Any):
    """A dataclass field with `metadata["help"]` (the CLI help, the YAML and manifest docs).

    A list or dict default becomes a fresh copy per instance; other `metadata` keys (positional,
    flag, cli) pass through to the config-schema engine."""
    meta = {"help": help_text, **metadata}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, init=init)
    return field(default=default, metadata=meta, init=init)


def fmt(value: float | None, spec: str = ".3f") -> str:
    """`value` formatted with `spec`, or '–' for None."""
    return "–" if value is None else format(value, spec)
