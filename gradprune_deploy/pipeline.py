"""compress(): model + data → probe → scores → selection → merge → surgery → fine-tune → checkpoint.

Only wiring lives here; each step is a function in its own module. Under `accelerate launch`
every process runs the same steps on the same averaged gradients; only the main process writes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import CompressConfig
from .data import CompletionCollator, has_chat_template, read_examples, tokenize_examples
from .finetune import TrainSettings, planned_steps, recovery_finetune, run_probe
from .loading import load_model_and_tokenizer
from .manifest import command_line, write_manifest
from .merge import merge_targets, same_sign_merge
from .selection import rank_for_removal, select_layers_to_drop
from .surgery import count_parameters, drop_layers, find_layer_stack, linear_weights_by_layer
from .utils import atomic_output_dir, check_output_dir

logger = logging.getLogger(__name__)

KNOWN_HUB_IDS = {"bundled:SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@contextmanager
def _timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[f"{name}_seconds"] = round(time.perf_counter() - start, 3)


def _train_settings(c: CompressConfig) -> TrainSettings:
    return TrainSettings(batch_size=c.batch_size, grad_accum=c.grad_accum, learning_rate=c.learning_rate or 2e-4,
                         epochs=c.epochs, max_steps=c.max_steps, warmup_ratio=c.warmup_ratio, lora_r=c.lora_r,
                         lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, seed=c.seed,
                         gradient_checkpointing=c.gradient_checkpointing)


def probe_length(c: CompressConfig, num_examples: int, settings: TrainSettings) -> tuple[int, int]:
    """(probe steps, planned fine-tune steps): the paper's ~1% of the run, with a floor."""
    planned = planned_steps(num_examples, settings)
    return c.probe_steps or max(c.probe_min_steps, math.ceil(c.probe_fraction * planned)), planned


def score_layers(model, features, tokenizer, c: CompressConfig, settings: TrainSettings, *, drop_count: int | None = None):
    """(scores, probe record or None, stats) for the configured scorer.

    `drop_count`, when known, lets GradMAP stop after that many greedy decisions (one backward
    pass each) instead of ranking every layer; the dropped set is the same.
    """
    if c.scorer == "igia":
        steps, planned = probe_length(c, len(features), settings)
        record, stats = run_probe(model, features, tokenizer, settings, probe_steps=steps)
        return record.scores(), record, {**stats, "planned_finetune_steps": planned, "probe_fraction": c.probe_fraction}
    from .scorers import SCORERS

    collate = CompletionCollator(tokenizer.pad_token_id)
    batches = [collate(features[i:i + c.batch_size]) for i in range(0, len(features), c.batch_size)][: c.scorer_batches]
    start = time.perf_counter()
    scorer = SCORERS[c.scorer]
    if c.scorer == "gradmap" and drop_count:
        scorer = functools.partial(scorer, max_decisions=drop_count)
    scores = scorer(model, batches, seed=c.seed)
    return scores.double(), None, {"batches": len(batches), "seconds": time.perf_counter() - start}


def merge_dropped_layers(model, record, dropped: list[int], keep_top_p: float) -> dict:
    """Same-sign merge of every dropped layer's linears into its target kept layer (in place)."""
    num_layers = len(find_layer_stack(model)[1])
    targets = merge_targets(dropped, num_layers)
    linears = linear_weights_by_layer(model)
    per_layer, total_merged = {}, 0
    for removed, target in targets.items():
        igia = record.igia_for_layer(removed)
        linear_stats = {}
        for name, removed_linear in linears[removed].items():
            if name not in igia:
                continue  # not LoRA-wrapped, so no IGIA: nothing principled to merge
            kept_linear = linears[target][name]
            with torch.no_grad():
                merged, stats = same_sign_merge(kept_linear.weight.data, removed_linear.weight.data, igia[name], keep_top_p)
                kept_linear.weight.data.copy_(merged)
            linear_stats[name] = stats.as_dict()
            total_merged += stats.merged_entries
        per_layer[str(removed)] = {
            "into": target,
            "merged_entries": sum(s["merged_entries"] for s in linear_stats.values()),
            "entries": sum(s["entries"] for s in linear_stats.values()),
            "linears": linear_stats,
        }
        logger.info("merged layer %d into %d: %d entries", removed, target, per_layer[str(removed)]["merged_entries"])
    return {"enabled": True, "keep_top_p": keep_top_p, "targets": {str(k): v for k, v in targets.items()},
            "merged_entries_total": total_merged, "per_layer": per_layer}


def compress(config: CompressConfig) -> dict:
    """Run GradPruner end to end and write the pruned checkpoint to `config.out`."""
    from accelerate import PartialState
    from transformers import set_seed

    state = PartialState()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    out = check_output_dir(config.out, overwrite=config.overwrite)  # fail before any work
    set_seed(config.seed)

    with _timed(timings, "load"):
        model, tokenizer = load_model_and_tokenizer(config.model, dtype=config.dtype,
                                                    trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
        examples = read_examples(config.data, split=config.split, limit=config.max_examples)
        features = tokenize_examples(examples, tokenizer, max_length=config.max_length)
    _, layers = find_layer_stack(model)
    num_layers = len(layers)
    params_before = count_parameters(model)
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    settings = _train_settings(config)
    budget = dict(drop_count=config.drop_layers, drop_ratio=config.drop_ratio, target_params=config.target_params,
                  layer_params=layer_params, total_params=params_before,
                  protect_first=config.protect_first, protect_last=config.protect_last)
    # An impossible budget fails now, not after the probe.
    planned_drop = len(select_layers_to_drop(torch.zeros(num_layers), **budget))

    with _timed(timings, "score"):
        scores, record, score_stats = score_layers(model, features, tokenizer, config, settings,
                                                   drop_count=None if config.target_params else planned_drop)
    dropped = select_layers_to_drop(scores, **budget)
    kept = [i for i in range(num_layers) if i not in dropped]
    logger.info("dropping %d of %d layers: %s", len(dropped), num_layers, dropped)

    merge_record = {"enabled": False}
    if config.merge:
        with _timed(timings, "merge"):
            merge_record = merge_dropped_layers(model, record, dropped, config.keep_top_p)
    del record  # the per-step factors are only needed for the merge

    with _timed(timings, "surgery"):
        drop_layers(model, dropped)
    params_after = count_parameters(model)

    finetune_record = {"mode": "none"}
    if config.finetune != "none":
        with _timed(timings, "finetune"):
            model, finetune_record = recovery_finetune(model, features, tokenizer, settings, mode=config.finetune,
                                                       learning_rate=config.learning_rate)
        finetune_record.update({k: v for k, v in dataclasses.asdict(settings).items() if k not in ("sampling",)})

    manifest = {
        "tool": "gradprune-deploy",
        "method": "GradPruner (ICLR 2026)" if config.scorer == "igia" else f"layer pruning by {config.scorer}",
        "base_model": config.model,
        "base_model_id": KNOWN_HUB_IDS.get(config.model, config.model if "/" in config.model and not Path(config.model).exists() else None),
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "data": {"source": config.data, "split": config.split, "examples": len(examples), "tokenized": len(features),
                 "max_length": config.max_length, "chat_template": has_chat_template(tokenizer), "loss": "completion tokens only"},
        "scorer": config.scorer,
        "layer_scores": [float(s) for s in scores],
        "removal_order": rank_for_removal(scores, range(num_layers)),
        "budget": {"drop_ratio": config.drop_ratio, "drop_layers": config.drop_layers, "target_params": config.target_params,
                   "protect_first": config.protect_first, "protect_last": config.protect_last},
        "num_layers_before": num_layers,
        "num_layers_after": len(kept),
        "layers_dropped": dropped,
        "layers_kept": kept,
        "params_before": params_before,
        "params_after": params_after,
        "params_per_layer": layer_params,
        "probe" if config.scorer == "igia" else "scoring": score_stats,
        "merge": merge_record,
        "finetune": finetune_record,
        "seed": config.seed,
        "world_size": state.num_processes,
        "command": command_line(),
        "config": dataclasses.asdict(config),
    }
    if state.is_main_process:
        with _timed(timings, "save"), atomic_output_dir(out, overwrite=config.overwrite) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if config.plot:
                from .plots import plot_layer_scores

                plot_layer_scores(manifest["layer_scores"], dropped, tmp / "layer_importance.png", scorer=config.scorer)
            manifest["timings"] = {**timings, "total_seconds": round(time.perf_counter() - start, 3)}
            write_manifest(tmp, manifest)
    state.wait_for_everyone()
    return {"out": str(out), "layers_dropped": dropped, "num_layers": [num_layers, len(kept)],
            "params": [params_before, params_after], "seconds": round(time.perf_counter() - start, 1)}


def compress_from_config(config: CompressConfig) -> dict:
    return compress(config)
