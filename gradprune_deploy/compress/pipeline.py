"""compress(): data → model → dense quality → scores → cut → merge → surgery → pruned quality →
recovery → recovered quality → checkpoint + gradprune.json.

Only wiring lives here; each step is a function in its own module. Under `accelerate launch`
every process runs the same steps on the same averaged gradients; only the main process writes.
The output's temporary sibling directory is created first, so an unwritable --out fails before
any work, and a failed or interrupted run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from ..data import has_chat_template, read_examples, tokenize_examples
from ..loading import load_model_and_tokenizer, resolve_source
from ..manifest import KNOWN_HUB_IDS, DataRecord, FinetuneRecord, Manifest, MergeRecord, command_line, summarize
from ..utils import atomic_output_dir, check_output_dir
from .config import AUTO_CANDIDATES, CompressConfig, train_settings
from .finetune import recovery_finetune
from .ledger import HeldOut, build_ledger, hold_out, measure
from .scoring import apply_cut, batches_of, better, judge_cut, judged_point, score_layers, within_budget
from .selection import rank_for_removal, select_layers_to_drop
from .surgery import count_parameters, find_layer_stack

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[f"{name}_seconds"] = round(time.perf_counter() - start, 3)


def _read_data(config: CompressConfig) -> HeldOut:
    train = read_examples(config.data, split=config.split, limit=config.max_examples)
    if not config.ledger:
        return HeldOut(train, [], "none (--no-ledger)")
    return hold_out(
        train,
        data=config.data,
        split=config.split,
        validation_split=config.validation_split,
        fraction=config.validation_fraction,
        max_rows=config.validation_rows,
        seed=config.seed,
    )


def _teacher(config: CompressConfig, model):
    """The distillation teacher: --teacher, else a frozen copy of the dense model before pruning."""
    if not config.distill:
        return None
    if config.teacher:
        teacher, _ = load_model_and_tokenizer(
            config.teacher, dtype=config.dtype, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle
        )
    else:
        teacher = copy.deepcopy(model)
    return teacher.eval().requires_grad_(False)


def _choose_cut(model, features, held: HeldOut, tokenizer, config: CompressConfig, settings, budget: dict, dense_point, timings: dict):
    """(Scores, dropped layers, proposals): the configured scorer's cut, or the best of `auto`."""
    validation_features = tokenize_examples(held.validation, tokenizer, max_length=config.max_length) if held.validation else []
    planned_drop = (
        None
        if config.target_params or config.drop_layers == "auto"
        else len(select_layers_to_drop(torch.zeros(len(budget["layer_params"])), **budget))
    )
    judge = dict(config=config, settings=settings, features=features, validation=held.validation, tokenizer=tokenizer)
    names = (config.auto_candidates or AUTO_CANDIDATES) if config.scorer == "auto" else (config.scorer,)
    proposals, best = [], None
    for name in names:
        with _timed(timings, f"score_{name}"):
            scores = score_layers(name, model, features, validation_features, tokenizer, config, settings, drop_count=planned_drop)
        if config.drop_layers == "auto":
            dropped, judgements = _largest_cut_within_budget(model, scores, budget, dense_point, config, judge)
            proposals += [_proposal(j) for j in judgements]
        else:
            dropped = select_layers_to_drop(scores.values, **budget)
            if config.scorer == "auto":
                judgement = judge_cut(model, scores, dropped, **judge)
                proposals.append(_proposal(judgement))
                if best is not None and not better(judged_point(judgement), best[2], config.quality_metric):
                    continue
                best = (scores, dropped, judged_point(judgement))
                continue
        best = (scores, dropped, None)
    if config.scorer == "auto":
        logger.info("auto: %s's cut %s is the best by %s", best[0].scorer, best[1], "healed" if config.heal_steps else "raw")
    return best[0], best[1], proposals


def _largest_cut_within_budget(model, scores, budget, dense_point, config, judge):
    """Grow the cut one layer at a time (lowest score first) while the judged quality stays within budget."""
    order = rank_for_removal(scores.values, range(budget["protect_first"], len(scores.values) - budget["protect_last"]))
    chosen, judgements = [], []
    for n in range(1, len(order)):
        dropped = sorted(order[:n])
        judgement = judge_cut(model, scores, dropped, **judge)
        judgement["within_budget"] = within_budget(
            judged_point(judgement), dense_point, metric=config.quality_metric, max_drop=config.max_quality_drop
        )
        judgements.append(judgement)
        if not judgement["within_budget"]:
            break
        chosen = dropped
    if not chosen:
        from ..errors import ConfigError

        raise ConfigError(
            f"no cut stays within --max-quality-drop {config.max_quality_drop} ({config.quality_metric}): "
            "even one layer costs more; raise it, raise --heal-steps, or give --drop-layers N"
        )
    return chosen, judgements


def _proposal(judgement: dict) -> dict:
    out = {k: v for k, v in judgement.items() if k not in ("raw", "healed")}
    for key in ("raw", "healed"):
        out[key] = dataclasses.asdict(judgement[key]) if judgement[key] else None
    return out


def compress(config: CompressConfig) -> dict:
    """Run GradPruner end to end and write the pruned checkpoint (+ gradprune.json) to `config.out`."""
    from accelerate import PartialState
    from transformers import set_seed

    state = PartialState()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    out = check_output_dir(config.out, overwrite=config.overwrite)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_output_dir(out, overwrite=config.overwrite)) if state.is_main_process else None
        set_seed(config.seed)
        held = _read_data(config)  # bad data fails before the model loads
        for source in (config.teacher, config.dense_reference):
            if source:
                resolve_source(source, allow_pickle=config.allow_pickle)  # missing or incomplete: fail now

        with _timed(timings, "load"):
            model, tokenizer = load_model_and_tokenizer(
                config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle
            )
            features = tokenize_examples(held.train, tokenizer, max_length=config.max_length)
        _, layers = find_layer_stack(model)
        if config.compensate:
            from .compensate import biased_mlp_linears

            biased_mlp_linears(model)  # an architecture that cannot carry --compensate fails before scoring
        num_layers, params_before = len(layers), count_parameters(model)
        layer_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        settings = train_settings(config)
        budget = dict(
            drop_count=None if config.drop_layers == "auto" else config.drop_layers,
            drop_ratio=config.drop_ratio,
            target_params=config.target_params,
            layer_params=layer_params,
            total_params=params_before,
            protect_first=config.protect_first,
            protect_last=config.protect_last,
        )
        if config.drop_layers == "auto":
            budget["drop_count"] = 1  # checked below per candidate; here only protections are validated
        select_layers_to_drop(torch.zeros(num_layers), **budget)  # an impossible budget fails now
        if config.drop_layers == "auto":
            budget["drop_count"] = None

        points = []
        with _timed(timings, "ledger"):
            if config.ledger:
                points.append(measure(model, tokenizer, held.validation, stage="dense", batch_size=config.batch_size))
                if config.dense_reference:
                    reference, _ = load_model_and_tokenizer(config.dense_reference, dtype=config.dtype, allow_pickle=config.allow_pickle)
                    points.append(measure(reference, tokenizer, held.validation, stage="dense-reference", batch_size=config.batch_size))
                    del reference
        teacher = _teacher(config, model)

        with _timed(timings, "score"):
            scores, dropped, proposals = _choose_cut(
                model, features, held, tokenizer, config, settings, budget, points[-1] if points else None, timings
            )
        kept = [i for i in range(num_layers) if i not in dropped]
        logger.info("dropping %d of %d layers: %s", len(dropped), num_layers, dropped)

        # --compensate compares against the dense model: the distillation teacher when it is that model, else a copy
        dense = (teacher if teacher is not None and not config.teacher else copy.deepcopy(model)) if config.compensate else None
        with _timed(timings, "surgery"):
            merge = apply_cut(model, scores, dropped, config.merge_count, config.keep_top_p)
        compensation = None
        if config.compensate:
            from .compensate import compensate_cut

            with _timed(timings, "compensate"):
                calibration = batches_of(features, tokenizer, config.batch_size, config.scorer_batches)
                compensation = compensate_cut(
                    model,
                    dense,
                    calibration,
                    kept=kept,
                    num_layers=num_layers,
                    layers=config.compensate_layers,
                    ridge=config.compensate_ridge,
                )
            del dense, calibration
        scores.record = None  # the per-step factors were only needed for the merge
        scores.gblm_cache.clear()  # as were the GBLM metrics (--merge-criterion gblm)
        params_after = count_parameters(model)
        if config.ledger:
            with _timed(timings, "ledger_pruned"):
                points.append(measure(model, tokenizer, held.validation, stage="pruned", batch_size=config.batch_size))

        finetune = FinetuneRecord(settings={k: v for k, v in dataclasses.asdict(settings).items() if k != "sampling"})
        if config.finetune != "none":
            from .distill import DistillSettings

            distill = (
                DistillSettings(config.distill_alpha, config.distill_temperature, config.distill_top_k) if teacher is not None else None
            )
            with _timed(timings, "finetune"):
                model, stats = recovery_finetune(
                    model, features, tokenizer, settings, mode=config.finetune, teacher=teacher, distill=distill
                )
            finetune = FinetuneRecord(
                **stats,
                settings=finetune.settings,
                distill={"teacher": config.teacher or "the dense model before pruning", **dataclasses.asdict(distill)} if distill else None,
            )
            del teacher
            if config.ledger:
                with _timed(timings, "ledger_recovered"):
                    points.append(measure(model, tokenizer, held.validation, stage="recovered", batch_size=config.batch_size))

        manifest = Manifest(
            method="GradPruner (ICLR 2026)" if scores.scorer == "igia" else f"layer pruning by {scores.scorer}",
            base_model=config.model,
            base_model_id=KNOWN_HUB_IDS.get(
                config.model, config.model if "/" in config.model and not Path(config.model).exists() else None
            ),
            architecture=type(model).__name__,
            model_type=model.config.model_type,
            data=DataRecord(
                source=config.data,
                split=config.split,
                examples=len(held.train),
                tokenized=len(features),
                max_length=config.max_length,
                chat_template=has_chat_template(tokenizer),
                validation=held.description if config.ledger else None,
                validation_rows=len(held.validation),
            ),
            scorer=scores.scorer if config.scorer != "auto" else f"auto → {scores.scorer}",
            layer_scores=[float(s) for s in scores.values],
            removal_order=rank_for_removal(scores.values, range(num_layers)),
            budget={
                "drop_ratio": config.drop_ratio,
                "drop_layers": config.drop_layers,
                "target_params": config.target_params,
                "max_quality_drop": config.max_quality_drop,
                "quality_metric": config.quality_metric,
                "protect_first": config.protect_first,
                "protect_last": config.protect_last,
            },
            num_layers_before=num_layers,
            num_layers_after=len(kept),
            layers_dropped=dropped,
            layers_kept=kept,
            params_before=params_before,
            params_after=params_after,
            params_per_layer=layer_params,
            scoring=scores.stats,
            proposals=proposals,
            merge=MergeRecord(
                enabled=merge["enabled"],
                layers_requested=config.merge_layers,
                criterion=merge.get("criterion", config.merge_criterion),
                keep_top_p=config.keep_top_p if merge["enabled"] else None,
                targets=merge["targets"],
                merged_entries_total=merge.get("merged_entries_total", 0),
                per_layer=merge.get("per_layer", {}),
            ),
            finetune=finetune,
            compensation=compensation,
            quality=build_ledger(points, held) if config.ledger else None,
            seed=config.seed,
            world_size=state.num_processes,
            command=command_line(),
            config=dataclasses.asdict(config),
        )
        if manifest.quality and manifest.quality.warning:
            logger.warning("quality: %s", manifest.quality.verdict)
        if state.is_main_process:
            with _timed(timings, "save"):
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                if config.plot:
                    from .plots import plot_layer_scores

                    plot_layer_scores(manifest.layer_scores, dropped, tmp / "layer_importance.png", scorer=scores.scorer)
                manifest.timings = {**timings, "total_seconds": round(time.perf_counter() - start, 3)}
                manifest.write(tmp)
    state.wait_for_everyone()
    return {
        "out": str(out),
        "layers_dropped": dropped,
        "num_layers": [num_layers, len(kept)],
        "params": [params_before, params_after],
        "seconds": round(time.perf_counter() - start, 1),
        "quality": {p.stage: {"loss": p.loss, "accuracy": p.accuracy} for p in points},
        "manifest": manifest,
    }


def present_compress(result: dict) -> str:
    """The CLI's view of compress's result: the human summary (with the quality ledger), then one JSON line."""
    result = dict(result)
    manifest = result.pop("manifest")
    return summarize(manifest) + "\n" + json.dumps(result, default=str)
