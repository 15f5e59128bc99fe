"""SCORERS: every baseline scorer's name (names.py) → its function, one signature for all:
`score(model, batches, *, seed=0) -> torch.Tensor` of shape [num_layers], float64, HIGHER = MORE
IMPORTANT (selection drops the lowest). `model` is a plain `AutoModelForCausalLM`; `batches` are
CompletionCollator dicts (`input_ids`, `attention_mask`, `labels` = -100 on prompt and padding).
Every scorer leaves the model as it found it: weights, `requires_grad` flags, `.grad`, train/eval
mode of every module, and no hooks left behind."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..gradmap.score import gradmap
from .block_influence import block_influence
from .data_free import last_n, random_scores
from .gblm import gblm
from .names import BASELINE_SCORERS
from .ppl import ppl
from .taylor import taylor

SCORERS: dict[str, Callable[..., torch.Tensor]] = {
    "ppl": ppl,
    "block-influence": block_influence,
    "last-n": last_n,
    "random": random_scores,
    "taylor": taylor,
    "gradmap": gradmap,
    "gblm": gblm,
}
assert set(SCORERS) == set(BASELINE_SCORERS), "scorers/names.py and SCORERS disagree"
