"""Layer scores: every scorer behind one call (`score_layers`), and the typed record of how they were made.

igia is GradPruner's LoRA probe (igia/, run by finetune.run_probe); the other scorers share one
signature (scorers/registry.py); ppl reads the validation rows, the rest `--scorer-batches`
training batches.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..data import CompletionCollator
from ..errors import ConfigError
from .config import CompressConfig
from .finetune import TrainSettings, planned_steps, run_probe
from .igia.convergence import StabilityRule
from .igia.probe import ProbeOptions, ProbeRecord
from .scorers.names import GRADMAP, IGIA, PPL
from .scorers.registry import SCORERS


@dataclass
class ProbeStats:
    """How the IGIA probe ran (the manifest's `scoring` for --scorer igia)."""

    probe_steps: int
    zero_gradient_steps: int
    optimizer_steps: int
    seconds: float
    seconds_per_step: float
    igia_callback_seconds: float
    stored_factor_numbers: int
    gradient_clipping: str
    planned_finetune_steps: int
    probe_fraction: float
    igia_reduce: str = "squared"  # squared: the paper's layer score; norm: the official code's
    probe_clip_grad_norm: float | None = None  # None: clipping off during the probe; else the max norm (official code: 1.0)
    adaptive: dict | None = None  # --probe-steps auto: the rule, steps used, the τ trace and why it stopped


@dataclass
class ScorerStats:
    """How a baseline scorer ran (the manifest's `scoring` for every other scorer)."""

    batches: int
    seconds: float


@dataclass
class Scores:
    scorer: str
    values: torch.Tensor  # [num_layers] float64, higher = more important
    stats: ProbeStats | ScorerStats | None = None
    record: ProbeRecord | None = None  # the IGIA probe's record (igia only): element-level F for the merge
    gblm_batches: list | None = None  # --merge-criterion gblm: calibration batches the merge ranks entries by
    gblm_cache: dict = field(default_factory=dict)  # layer → {linear: GBLM metric} of the dense model, filled by cut.apply_cut


def probe_length(config: CompressConfig, num_examples: int, settings: TrainSettings) -> tuple[int, int]:
    """(probe steps, planned fine-tune steps): the paper's ~1% of the run, with a floor; --probe-steps auto: the cap."""
    planned = planned_steps(num_examples, settings)
    if config.adaptive_probe:
        return config.probe_max_steps, planned
    return config.probe_steps or max(config.probe_min_steps, math.ceil(config.probe_fraction * planned)), planned


def probe_options(config: CompressConfig, drop_count: int | None) -> ProbeOptions:
    """The probe's variant and stopping rule; `drop_count` (the budget's cut size, when known) lets
    --probe-steps auto require the cut itself to settle, not only the ranking."""
    rule = None
    if config.adaptive_probe:
        rule = StabilityRule(
            tau_min=config.probe_tau,
            patience=config.probe_patience,
            min_steps=config.probe_min_steps,
            max_steps=config.probe_max_steps,
            drop_count=drop_count,
            protect_first=config.protect_first,
            protect_last=config.protect_last,
        )
    return ProbeOptions(reduce=config.igia_reduce, clip_grad_norm=config.probe_clip_grad_norm, until_stable=rule)


def batches_of(features: Sequence[dict], tokenizer, batch_size: int, limit: int | None = None) -> list[dict]:
    collate = CompletionCollator(tokenizer.pad_token_id)
    batches = [collate(list(features[i : i + batch_size])) for i in range(0, len(features), batch_size)]
    return batches[:limit] if limit else batches


def igia_scores(model, features, tokenizer, config: CompressConfig, settings: TrainSettings, drop_count: int | None = None) -> Scores:
    """GradPruner's scores: a LoRA probe of ~1% of the planned fine-tune (or until the ranking converges), IGIA summed per layer."""
    steps, planned = probe_length(config, len(features), settings)
    record, stats = run_probe(model, features, tokenizer, settings, probe_steps=steps, options=probe_options(config, drop_count))
    by_gblm = config.merge_criterion == "gblm"
    gblm_batches = batches_of(features, tokenizer, config.batch_size, config.scorer_batches) if by_gblm else None
    stats = ProbeStats(**stats, planned_finetune_steps=planned, probe_fraction=config.probe_fraction)
    return Scores(IGIA, record.scores(), stats, record, gblm_batches)


def score_layers(
    scorer: str,
    model,
    features,
    validation_features,
    tokenizer,
    config: CompressConfig,
    settings: TrainSettings,
    *,
    drop_count: int | None = None,
) -> Scores:
    """Layer scores of one scorer. `drop_count`, when known, lets GradMAP stop after that many
    greedy decisions (one backward pass each) instead of ranking every layer; the dropped set is the same."""
    if scorer == IGIA:
        return igia_scores(model, features, tokenizer, config, settings, drop_count)
    start = time.perf_counter()
    if scorer == PPL:
        if not validation_features:
            raise ConfigError("--scorer ppl measures the validation loss: drop --no-ledger")
        batches = batches_of(validation_features, tokenizer, config.batch_size)
    else:
        batches = batches_of(features, tokenizer, config.batch_size, config.scorer_batches)
    fn = SCORERS[scorer]
    if scorer == GRADMAP and drop_count:
        fn = functools.partial(fn, max_decisions=drop_count)
    values = fn(model, batches, seed=config.seed).double()
    return Scores(scorer, values, ScorerStats(len(batches), time.perf_counter() - start))
