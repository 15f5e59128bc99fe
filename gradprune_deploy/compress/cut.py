"""Which layers go: apply a cut (merge + drop), judge a candidate cut, and choose the cut the config
asks for (the configured scorer's, the best of `--scorer auto`, or the largest within
`--drop-layers auto`'s quality budget).

`judge_cut` applies a candidate cut to the model itself for the duration (`cut_applied`: the layer
list is swapped and only the merge targets are copied, never the whole model), optionally heals it
with a few LoRA steps, measures it on the validation rows, and puts the model back bit-identical;
each judgement is a `ProposalRecord` in the manifest.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer

from ..data import Example, tokenize_examples
from ..errors import ConfigError
from ..manifest import MergeRecord, ProposalRecord, QualityPoint
from .config import CompressConfig
from .finetune import TrainSettings, recovery_finetune
from .hooks import preserved_train_state
from .igia.apply_merge import merge_dropped_layers, merged_targets
from .igia.merge import layers_to_merge
from .ledger import measure
from .scorers.gblm import gblm_importance
from .scorers.names import AUTO, IGIA
from .scoring import Scores, score_layers
from .selection import rank_for_removal, select_layers_to_drop
from .surgery import drop_layers, find_layer_stack, replace_layer_stack

logger = logging.getLogger(__name__)


@dataclass
class Cut:
    """The chosen cut: the scores it came from, the layers it drops, and every judged proposal."""

    scores: Scores
    dropped: list[int]
    proposals: list[ProposalRecord]


def cut_budget(config: CompressConfig, layer_params: Sequence[int], total_params: int) -> dict:
    """select_layers_to_drop's budget keywords (drop_count None with --drop-layers auto: grown per candidate)."""
    return dict(
        drop_count=None if config.auto_drop else config.drop_layers,
        drop_ratio=config.drop_ratio,
        target_params=config.target_params,
        layer_params=list(layer_params),
        total_params=total_params,
        protect_first=config.protect_first,
        protect_last=config.protect_last,
    )


def check_budget(budget: dict, *, auto_drop: bool) -> None:
    """Fail now on an impossible budget (with --drop-layers auto, only the protections can be checked)."""
    checked = {**budget, "drop_count": 1} if auto_drop else budget
    select_layers_to_drop(torch.zeros(len(budget["layer_params"])), **checked)


def _layers_to_merge(scores: Scores, dropped: Sequence[int], merge_count: int | None) -> list[int] | None:
    """The dropped layers the merge adds into kept ones (igia only), or None when there is no merge."""
    if scores.record is None or merge_count == 0 or not dropped:
        return None
    return layers_to_merge(dropped, scores.values.tolist(), merge_count)


def merge_cut(
    model, layers: nn.ModuleList, scores: Scores, dropped: Sequence[int], merge_count: int | None, keep_top_p: float
) -> MergeRecord:
    """The merge half of a cut, in place on `layers` (the model's stack, or a stand-in holding copies of the
    merge targets): `merge_count` highest-scoring dropped layers (igia only; None = all) are added into their
    targets. The entries are ranked by IGIA, or with `scores.gblm_batches` by GBLM-Pruner's metric, computed
    on `model`, which must still be the dense model; it is cached per layer, so every call must get the same
    dense model."""
    merged = _layers_to_merge(scores, dropped, merge_count)
    if merged is None:
        return MergeRecord()
    criterion = scores.record.igia_for_layer
    if scores.gblm_batches is not None:
        missing = [i for i in merged if i not in scores.gblm_cache]
        if missing:
            scores.gblm_cache.update(gblm_importance(model, scores.gblm_batches, layers=missing))
        criterion = scores.gblm_cache.__getitem__
    merge = merge_dropped_layers(layers, criterion, dropped, merged, keep_top_p)
    merge.criterion = "igia" if scores.gblm_batches is None else "gblm"
    return merge


def apply_cut(model, scores: Scores, dropped: Sequence[int], merge_count: int | None, keep_top_p: float) -> MergeRecord:
    """Merge (merge_cut) then drop, in place."""
    merge = merge_cut(model, find_layer_stack(model)[1], scores, dropped, merge_count, keep_top_p)
    drop_layers(model, dropped)
    return merge


@dataclass
class _StackState:
    """What applying a cut (and healing it) changes outside the weights: the layer list, each layer's
    layer_idx, the config, and the peft_config attribute peft leaves on a model it wrapped."""

    path: str
    layers: nn.ModuleList
    layer_idx: dict
    config: dict
    peft_config: bool

    @classmethod
    def of(cls, model) -> _StackState:
        path, layers = find_layer_stack(model)
        layer_idx = {m: m.layer_idx for layer in layers for m in layer.modules() if hasattr(m, "layer_idx")}
        return cls(path, layers, layer_idx, model.config.to_dict(), "peft_config" in vars(model))

    def restore(self, model) -> None:
        replace_layer_stack(model, self.path, self.layers)
        if not self.peft_config:
            vars(model).pop("peft_config", None)
        for module, idx in self.layer_idx.items():
            module.layer_idx = idx
        now = model.config.to_dict()
        for key, value in self.config.items():
            if now.get(key) != value:
                setattr(model.config, key, value)


def remove_adapters(model) -> None:
    """Unwrap every peft adapter layer (LoRA) back to the module it wraps, without merging it."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.get_base_layer())


@contextlib.contextmanager
def cut_applied(model, scores: Scores, dropped: Sequence[int], merge_count: int | None, keep_top_p: float) -> Iterator[MergeRecord]:
    """`model` with a candidate cut applied for the duration, without copying the model: the merge goes
    into copies of its target layers (the only layers it changes), the layer list is swapped for the kept
    layers and the config rewritten (surgery.drop_layers), so the forward passes inside see a consistent
    pruned model. On exit, error included: adapters a heal attached are removed unmerged, and the layer
    list, every layer_idx, the config, train/eval modes and requires_grad flags come back, every weight
    bit-identical to before."""
    saved = _StackState.of(model)
    merged = _layers_to_merge(scores, dropped, merge_count) or []
    targets = set(merged_targets(dropped, merged, len(saved.layers)).values())
    working = nn.ModuleList([copy.deepcopy(layer) if i in targets else layer for i, layer in enumerate(saved.layers)])
    with preserved_train_state(model):
        try:
            merge = merge_cut(model, working, scores, dropped, merge_count, keep_top_p)
            replace_layer_stack(model, saved.path, working)
            drop_layers(model, dropped)
            yield merge
        finally:
            remove_adapters(model)
            saved.restore(model)


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
) -> ProposalRecord:
    """A candidate cut measured on the model itself (cut_applied: no copy, restored after): raw (drop +
    merge) and, with heal steps, after a short LoRA heal, measured with its adapters unmerged."""
    start = time.perf_counter()
    with cut_applied(model, scores, dropped, config.merge_count, config.keep_top_p):
        raw = measure(model, tokenizer, validation, stage="cut", batch_size=config.batch_size)
        healed = None
        if config.heal_steps:
            heal = dict(mode="lora", steps=config.heal_steps, quiet=True, merge=False)
            healed_model, _ = recovery_finetune(model, features, tokenizer, settings, **heal)
            healed = measure(healed_model, tokenizer, validation, stage="healed", batch_size=config.batch_size)
            del healed_model
    seconds = round(time.perf_counter() - start, 3)
    return ProposalRecord(scorer=scores.scorer, dropped=list(dropped), raw=raw, healed=healed, seconds=seconds)


def better(a: QualityPoint, b: QualityPoint, metric: str) -> bool:
    """Whether a is better than b on `metric` (accuracy, ties broken by loss; or loss)."""
    if metric == "accuracy" and a.accuracy is not None and b.accuracy is not None and a.accuracy != b.accuracy:
        return a.accuracy > b.accuracy
    return a.loss < b.loss


def within_budget(point: QualityPoint, reference: QualityPoint, *, metric: str, max_drop: float) -> bool:
    """Loss: relative increase ≤ max_drop; accuracy: drop ≤ max_drop points."""
    if metric == "accuracy":
        if point.accuracy is None or reference.accuracy is None:
            raise ConfigError("--quality-metric accuracy needs `choices` in every validation row: use --quality-metric loss")
        return 100 * (reference.accuracy - point.accuracy) <= max_drop
    return point.loss <= reference.loss * (1 + max_drop)


def largest_cut_within_budget(model, scores: Scores, budget: dict, dense_point: QualityPoint, config: CompressConfig, judge: dict):
    """Grow the cut one layer at a time (lowest score first) while the judged quality stays within budget:
    (the largest such cut, every judged proposal)."""
    order = rank_for_removal(scores.values, range(budget["protect_first"], len(scores.values) - budget["protect_last"]))
    chosen, proposals = [], []
    for n in range(1, len(order)):
        dropped = sorted(order[:n])
        proposal = judge_cut(model, scores, dropped, **judge)
        proposal.within_budget = within_budget(proposal.judged, dense_point, metric=config.quality_metric, max_drop=config.max_quality_drop)
        proposals.append(proposal)
        if not proposal.within_budget:
            break
        chosen = dropped
    if not chosen:
        raise ConfigError(
            f"no cut stays within --max-quality-drop {config.max_quality_drop} ({config.quality_metric}): "
            "even one layer costs more; raise it, raise --heal-steps, or give --drop-layers N"
        )
    return chosen, proposals


def choose_cut(model, features, held, tokenizer, config: CompressConfig, settings, budget: dict, dense_point, timed) -> Cut:
    """The configured scorer's cut, the best of `--scorer auto`, or `--drop-layers auto`'s largest within budget.

    `timed(name)` is the pipeline's timer (a context manager per scorer, and `probe` for igia's probe)."""
    validation_features = tokenize_examples(held.validation, tokenizer, max_length=config.max_length) if held.validation else []
    fixed_size = not (config.target_params or config.auto_drop)
    planned_drop = len(select_layers_to_drop(torch.zeros(len(budget["layer_params"])), **budget)) if fixed_size else None
    judge = dict(config=config, settings=settings, features=features, validation=held.validation, tokenizer=tokenizer)
    proposals: list[ProposalRecord] = []
    best: Cut | None = None
    for name in config.scorers_to_try:
        with timed(f"score_{name}"), timed("probe") if name == IGIA else contextlib.nullcontext():  # the IGIA probe is its scoring
            scores = score_layers(name, model, features, validation_features, tokenizer, config, settings, drop_count=planned_drop)
        if config.auto_drop:
            dropped, judged = largest_cut_within_budget(model, scores, budget, dense_point, config, judge)
            proposals += judged
        else:
            dropped = select_layers_to_drop(scores.values, **budget)
        if config.scorer == AUTO:
            proposal = judge_cut(model, scores, dropped, **judge)
            proposals.append(proposal)
            if best is not None and not better(proposal.judged, best.proposals[-1].judged, config.quality_metric):
                continue
            best = Cut(scores, dropped, [proposal])
        else:
            best = Cut(scores, dropped, [])
    if config.scorer == AUTO:
        logger.info("auto: %s's cut %s is the best by %s", best.scores.scorer, best.dropped, "healed" if config.heal_steps else "raw")
    return Cut(best.scores, best.dropped, proposals)
