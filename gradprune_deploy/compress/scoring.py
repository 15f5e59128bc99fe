"""Which layers to drop: every scorer behind one call, and the cut judge behind `auto`.

`score_layers` runs the configured scorer (igia = GradPruner's LoRA probe; the baselines in
baselines.py; ppl on the validation rows). `judge_cut` applies a candidate cut (drop + merge) to a
copy of the model, optionally heals it with a few LoRA steps, and measures it on the validation
rows; `--scorer auto` and `--drop-layers auto` pick cuts with it.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..data import CompletionCollator, Example
from ..manifest import QualityPoint
from .config import CompressConfig
from .finetune import TrainSettings, planned_steps, recovery_finetune, run_probe
from .ledger import measure
from .merge import layers_to_merge, merge_dropped_layers
from .surgery import drop_layers, find_layer_stack

logger = logging.getLogger(__name__)


@dataclass
class Scores:
    scorer: str
    values: torch.Tensor  # [num_layers] float64, higher = more important
    stats: dict = field(default_factory=dict)
    record: object = None  # the IGIA ProbeRecord (igia only): element-level F for the merge
    gblm_batches: list | None = None  # --merge-criterion gblm: calibration batches the merge ranks entries by
    gblm_cache: dict = field(default_factory=dict)  # layer → {linear: GBLM metric} of the dense model, filled by apply_cut


def probe_length(config: CompressConfig, num_examples: int, settings: TrainSettings) -> tuple[int, int]:
    """(probe steps, planned fine-tune steps): the paper's ~1% of the run, with a floor."""
    planned = planned_steps(num_examples, settings)
    return config.probe_steps or max(config.probe_min_steps, math.ceil(config.probe_fraction * planned)), planned


def batches_of(features: Sequence[dict], tokenizer, batch_size: int, limit: int | None = None) -> list[dict]:
    collate = CompletionCollator(tokenizer.pad_token_id)
    batches = [collate(list(features[i : i + batch_size])) for i in range(0, len(features), batch_size)]
    return batches[:limit] if limit else batches


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
    if scorer == "igia":
        steps, planned = probe_length(config, len(features), settings)
        record, stats = run_probe(model, features, tokenizer, settings, probe_steps=steps)
        by_gblm = config.merge_criterion == "gblm"
        gblm_batches = batches_of(features, tokenizer, config.batch_size, config.scorer_batches) if by_gblm else None
        return Scores(
            "igia",
            record.scores(),
            {**stats, "planned_finetune_steps": planned, "probe_fraction": config.probe_fraction},
            record,
            gblm_batches,
        )
    from .baselines import SCORERS

    start = time.perf_counter()
    if scorer == "ppl":
        if not validation_features:
            from ..errors import ConfigError

            raise ConfigError("--scorer ppl measures the validation loss: drop --no-ledger")
        batches = batches_of(validation_features, tokenizer, config.batch_size)
    else:
        batches = batches_of(features, tokenizer, config.batch_size, config.scorer_batches)
    fn = SCORERS[scorer]
    if scorer == "gradmap" and drop_count:
        fn = functools.partial(fn, max_decisions=drop_count)
    values = fn(model, batches, seed=config.seed).double()
    return Scores(scorer, values, {"batches": len(batches), "seconds": time.perf_counter() - start})


def apply_cut(model, scores: Scores, dropped: Sequence[int], merge_count: int | None, keep_top_p: float) -> dict:
    """Merge (igia only: `merge_count` highest-scoring dropped layers; None = all) then drop, in place.

    The merge ranks entries by IGIA, or with `scores.gblm_batches` by GBLM-Pruner's metric, computed
    here on `model` before any weight changes; it is cached per layer, so every call must get the
    same dense model (or a copy of it, as judge_cut passes)."""
    _, layers = find_layer_stack(model)
    merge_record = {"enabled": False, "targets": {}}
    if scores.record is not None and merge_count != 0 and dropped:
        merged = layers_to_merge(dropped, scores.values.tolist(), merge_count)
        criterion = scores.record.igia_for_layer
        if scores.gblm_batches is not None:
            from .baselines import gblm_importance

            missing = [i for i in merged if i not in scores.gblm_cache]
            if missing:
                scores.gblm_cache.update(gblm_importance(model, scores.gblm_batches, layers=missing))
            criterion = scores.gblm_cache.__getitem__
        merge_record = merge_dropped_layers(layers, criterion, dropped, merged, keep_top_p)
        merge_record["criterion"] = "igia" if scores.gblm_batches is None else "gblm"
    drop_layers(model, dropped)
    return merge_record


def judge_cut(
    model,
    scores: Scores,
    dropped: Sequence[int],
    *,
    config: CompressConfig,
    settings: TrainSettings,
    features,
    validation: list[Example],
    tokenizer,
) -> dict:
    """A candidate cut measured on a copy: raw (drop + merge) and, with heal steps, after a short LoRA heal."""
    start = time.perf_counter()
    candidate = copy.deepcopy(model)
    apply_cut(candidate, scores, dropped, config.merge_count, config.keep_top_p)
    raw = measure(candidate, tokenizer, validation, stage="cut", batch_size=config.batch_size)
    healed = None
    if config.heal_steps:
        candidate, _ = recovery_finetune(candidate, features, tokenizer, settings, mode="lora", steps=config.heal_steps, quiet=True)
        healed = measure(candidate, tokenizer, validation, stage="healed", batch_size=config.batch_size)
    del candidate
    return {
        "scorer": scores.scorer,
        "dropped": list(dropped),
        "raw": raw,
        "healed": healed,
        "seconds": round(time.perf_counter() - start, 3),
    }


def judged_point(judgement: dict) -> QualityPoint:
    """The point a judgement is ranked by: healed when there was a heal, else raw."""
    return judgement["healed"] or judgement["raw"]


def better(a: QualityPoint, b: QualityPoint, metric: str) -> bool:
    """Whether a is better than b on `metric` (accuracy, ties broken by loss; or loss)."""
    if metric == "accuracy" and a.accuracy is not None and b.accuracy is not None and a.accuracy != b.accuracy:
        return a.accuracy > b.accuracy
    return a.loss < b.loss


def within_budget(point: QualityPoint, reference: QualityPoint, *, metric: str, max_drop: float) -> bool:
    """Loss: relative increase ≤ max_drop; accuracy: drop ≤ max_drop points."""
    if metric == "accuracy":
        if point.accuracy is None or reference.accuracy is None:
            from ..errors import ConfigError

            raise ConfigError("--quality-metric accuracy needs `choices` in every validation row: use --quality-metric loss")
        return 100 * (reference.accuracy - point.accuracy) <= max_drop
    return point.loss <= reference.loss * (1 + max_drop)
