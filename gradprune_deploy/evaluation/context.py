"""The rule for inputs longer than the model's context (`eval`, the compress quality ledger).

A model attends over at most `max_position_embeddings` positions. A row longer than that is not
run as it is: past the context the positions mean nothing, and the attention of one very long
prompt can ask for terabytes or run for hours between two interruptible steps. So:

- scoring (`--metric choice` and `loss`): prompt + completion is cut FROM THE LEFT to the context,
  keeping every completion token (the tokens that are scored) and the prompt's last tokens (the
  ones nearest the answer). A completion that alone fills the context (no prompt token left) is
  refused, naming the row.
- generation (`--metric exact`): the prompt is cut from the left to `context - max_new_tokens`;
  `--max-new-tokens` that leaves no room for a prompt token is refused.

The number of rows cut is logged and recorded in the result (`truncated_rows`). Pure functions,
no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError, DataError


def model_context(config) -> int | None:
    """The positions a model attends over (its config's max_position_embeddings, or the text
    config's), or None when the config does not say."""
    text = getattr(config, "text_config", None) or config
    limit = getattr(text, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def checkpoint_context(checkpoint_dir: str | Path) -> int | None:
    """model_context read from a checkpoint's config.json (no model loaded); None when unknown."""
    try:
        raw = json.loads((Path(checkpoint_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    limit = text.get("max_position_embeddings")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def fit_example(ids: Sequence[int], n_prompt: int, context: int | None, *, row: str) -> tuple[list[int], int]:
    """(ids, prompt length) of a scored row cut from the left to `context` positions, completion kept."""
    if context is None or len(ids) <= context:
        return list(ids), n_prompt
    completion = len(ids) - n_prompt
    if completion >= context:
        raise DataError(
            f"row {row!r}: its completion alone is {completion} tokens, the model's context is {context} "
            "(max_position_embeddings): shorten the completion or leave the row out"
        )
    cut = len(ids) - context
    return list(ids[cut:]), n_prompt - cut


def fit_prompt(ids: Sequence[int], context: int | None, *, max_new_tokens: int) -> list[int]:
    """A generation prompt cut from the left so that it and `max_new_tokens` fit in `context`."""
    if context is None:
        return list(ids)
    room = context - max_new_tokens
    if room < 1:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of {context} "
            f"tokens (max_position_embeddings): pass --max-new-tokens {context - 1} or less"
        )
    return list(ids[-room:]) if len(ids) > room else list(ids)
