"""compress(): data → model → dense quality → scores → cut → merge → surgery → pruned quality →
recovery → recovered quality → checkpoint + gradprune.json.

Only wiring lives here; each step is a function in its own module (cut.py chooses and applies the
cut, gradmap/ compensates, finetune.py recovers, ledger.py measures, Manifest.from_run records).
Under `accelerate launch` every process runs the same steps on the same averaged gradients; only
the main process writes. The output's temporary sibling directory is created first, so an
unwritable --out fails before any work, and a failed or interrupted run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import set_seed

from ..data import has_chat_template, read_examples, tokenize_examples
from ..errors import DataError
from ..layout import LAYER_PLOT
from ..loading import load_model_and_tokenizer, resolve_dtype, resolve_source
from ..manifest import DataRecord, FinetuneRecord, Manifest
from ..manifest_text import summarize
from ..utils import atomic_output_dir, check_output_dir, peak_rss_mb, reset_peak_rss
from .config import CompressConfig
from .cut import Cut, check_budget, choose_cut, cut_budget, merge_cut
from .distill import DistillSettings, frozen_copy
from .distributed import check_launch
from .divergence import check_input_finite, check_output_finite
from .finetune import recovery_finetune, train_settings
from .gradmap.compensate import biased_mlp_linears, capture_dense, compensate_cut
from .gradmap.compensation import target_positions
from .ledger import HeldOut, build_ledger, hold_out, measure, verdict
from .mix import Mix, dense_completions, mix_rows, pick, read_mix, shuffled_together
from .plots import plot_layer_scores
from .scoring import batches_of
from .selection import rank_for_removal
from .surgery import count_parameters, drop_layers, find_layer_stack

logger = logging.getLogger(__name__)


class _Timed:
    """`timed(name)`: a stage's wall time and peak memory into `timings` ({name}_seconds, {name}_peak_mb, MiB).

    Peak memory is torch.cuda.max_memory_allocated on CUDA, else the process's high-water RSS (VmHWM),
    reset at each stage's start. Stages nest: the high-water mark is read before every reset and counted
    in every open stage and in the run's peak (total_peak_mb), so each stays exact although a reset clears
    the one counter for all. Where /proc cannot reset VmHWM, every stage records the process's peak so far."""

    def __init__(self, timings: dict):
        self.timings, self.cuda, self.resettable = timings, torch.cuda.is_available(), True
        self.open: dict[str, float] = {}  # open stage → its peak so far
        self.peak = self._high_water()

    def _high_water(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else peak_rss_mb() or 0.0

    def _fold(self) -> None:
        now = self._high_water()
        self.peak = max(self.peak, now)
        self.open = {name: max(peak, now) for name, peak in self.open.items()}

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.resettable and not reset_peak_rss():
            self.resettable = False
            logger.warning("/proc/self/clear_refs is not writable: each stage's peak_mb is the process's peak since it started")

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._fold()
        self._reset()
        self.open[name] = self._high_water()
        start = time.perf_counter()
        yield
        self._fold()
        self.timings[f"{name}_seconds"] = round(time.perf_counter() - start, 3)
        self.timings[f"{name}_peak_mb"] = round(self.open.pop(name), 1)

    def run_peak_mb(self) -> float:
        """The peak of the whole run so far (every stage and the gaps between them)."""
        self._fold()
        return round(self.peak, 1)


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


def _load(config: CompressConfig, source: str, *, dtype: str | None = None, **kwargs):
    """Load `source` in `dtype` (default --dtype; auto: the checkpoint's own, float32 for a GGUF)."""
    dtype = dtype or config.dtype
    if dtype == "auto":
        resolved = resolve_source(source, allow_pickle=config.allow_pickle)
        dtype = resolve_dtype(dtype, None if resolved.gguf_file else resolved.path)
    return load_model_and_tokenizer(source, dtype=dtype, allow_pickle=config.allow_pickle, **kwargs)


def _teacher(config: CompressConfig, model):
    """The distillation teacher: --teacher, else a frozen copy of the dense model before pruning, in
    --teacher-dtype on --teacher-device. The one second model compress makes, and only with --distill."""
    if not config.distill:
        return None
    dtype = None if config.teacher_dtype == "same" else config.teacher_dtype
    device = None if config.teacher_device == "same" else config.teacher_device
    if config.teacher:
        teacher = _load(config, config.teacher, dtype=dtype, trust_remote_code=config.trust_remote_code)[0]
        return (teacher.to(device) if device else teacher).eval().requires_grad_(False)
    return frozen_copy(model, dtype=getattr(torch, dtype) if dtype else None, device=device)


@dataclass
class _LedgerRun:
    """The ledger's measurements: each stage on the task's held-out rows and, with --mix-data, on the
    general held-out rows, with --ledger-generate greedy answers on both."""

    config: CompressConfig
    tokenizer: object
    held: HeldOut
    mix: Mix | None
    points: list = field(default_factory=list)
    general: list = field(default_factory=list)

    def _measure(self, model, rows, stage: str):
        c = self.config
        return measure(
            model,
            self.tokenizer,
            rows,
            stage=stage,
            batch_size=c.batch_size,
            generate_rows=c.ledger_generate,
            max_new_tokens=c.ledger_new_tokens,
        )

    def stage(self, model, stage: str) -> None:
        if not self.config.ledger:
            return
        self.points.append(self._measure(model, self.held.validation, stage))
        if self.mix:
            self.general.append(self._measure(model, self.mix.validation, stage))

    def dense(self, model) -> None:
        """The first points: the dense model, and --dense-reference when given."""
        self.stage(model, "dense")
        if self.config.ledger and self.config.dense_reference:
            reference, _ = _load(self.config, self.config.dense_reference)
            self.stage(reference, "dense-reference")

    def ledger(self):
        if not self.config.ledger:
            return None
        ledger = build_ledger(self.points, self.held)
        if self.mix:
            ledger.general_validation, ledger.general_points = self.mix.description, self.general
            general, _ = verdict(self.general)
            ledger.verdict = "; ".join(t for t in (ledger.verdict, general and f"general rows: {general}") if t)
        return ledger


def _read_mix(config: CompressConfig) -> Mix | None:
    """--mix-data split into its training pool and general held-out rows (bad data fails before the model loads)."""
    if not config.mix_data:
        return None
    return read_mix(config.mix_data, max_rows=config.validation_rows, seed=config.seed)


def _recovery_features(model, tokenizer, features, mix: Mix | None, config: CompressConfig, timed):
    """The recovery's rows: the task's, plus --mix-ratio of --mix-data's pool (its completions, or the
    dense model's answers to its prompts: call this before the cut). --mix-ratio 0 adds none: the recovery is the
    no-mix one, row for row, and only the ledger scores the general rows."""
    if mix is None or config.mix_ratio == 0:
        return features
    extra = pick(mix.pool, mix_rows(len(features), config.mix_ratio), seed=config.seed)
    if config.mix_completions == "dense":
        with timed("mix_generate"):
            extra = dense_completions(model, tokenizer, extra, max_new_tokens=config.mix_new_tokens, batch_size=config.batch_size)
    if not extra:
        logger.warning("--mix-data: no rows to add (the dense model answered none of the pool prompts)")
        return features
    try:
        extra_features = tokenize_examples(extra, tokenizer, max_length=config.max_length)
    except DataError as exc:
        raise DataError(f"--mix-data {config.mix_data}: {exc}") from None
    mix.added = len(extra_features)
    return shuffled_together(features, extra_features, seed=config.seed)


def _cut_model(model, cut: Cut, features, tokenizer, config: CompressConfig, timed, num_layers: int):
    """The chosen cut, in place: (with --distill) the teacher, then merge + surgery, then (with --compensate)
    the compensation against the dense outputs captured before the cut. (merge, compensation, teacher)"""
    kept = [i for i in range(num_layers) if i not in cut.dropped]
    calibration = batches_of(features, tokenizer, config.batch_size, config.scorer_batches) if config.compensate else []
    if config.compensate:
        with timed("compensate_capture"):
            dense = capture_dense(model, calibration, target_positions(kept, num_layers))
    teacher = None
    if config.distill:
        with timed("teacher"):
            teacher = _teacher(config, model)
    with timed("surgery"):
        with timed("merge"):
            merge = merge_cut(model, find_layer_stack(model)[1], cut.scores, cut.dropped, config.merge_count, config.keep_top_p)
        drop_layers(model, cut.dropped)
    compensation = None
    if config.compensate:
        with timed("compensate"):
            compensation = compensate_cut(
                model, dense, calibration, kept=kept, num_layers=num_layers, layers=config.compensate_layers, ridge=config.compensate_ridge
            )
        del dense
    return merge, compensation, teacher


def _recover(model, features, tokenizer, settings, teacher, config: CompressConfig, timed):
    """The recovery fine-tune (none: the pruned model as is) and its manifest record."""
    record = FinetuneRecord(settings={k: v for k, v in dataclasses.asdict(settings).items() if k != "sampling"})
    if config.finetune == "none":
        return model, record
    distill = None
    if teacher is not None:
        distill = DistillSettings(config.distill_alpha, config.distill_temperature, config.distill_top_k, config.teacher_device)
    with timed("finetune"):
        model, stats = recovery_finetune(model, features, tokenizer, settings, mode=config.finetune, teacher=teacher, distill=distill)
    teacher_name = config.teacher or "the dense model before pruning"
    distill_record = {"teacher": teacher_name, **dataclasses.asdict(distill), "teacher_dtype": config.teacher_dtype} if distill else None
    return model, FinetuneRecord(**stats, settings=record.settings, distill=distill_record)


def _mix_record(config: CompressConfig, mix: Mix | None, task_rows: int) -> dict | None:
    if mix is None:
        return None
    return {
        "source": config.mix_data,
        "ratio": config.mix_ratio,
        "completions": config.mix_completions,
        "pool_rows": len(mix.pool),
        "rows_planned": mix_rows(task_rows, config.mix_ratio),
        "rows_added": mix.added,
        "general_validation_rows": len(mix.validation),
    }


def _data_record(config: CompressConfig, held: HeldOut, features, tokenizer, mix: Mix | None) -> DataRecord:
    return DataRecord(
        source=config.data,
        split=config.split,
        examples=len(held.train),
        tokenized=len(features),
        max_length=config.max_length,
        chat_template=has_chat_template(tokenizer),
        validation=held.description if config.ledger else None,
        validation_rows=len(held.validation),
        mix=_mix_record(config, mix, len(features)),
    )


def _save(model, tokenizer, manifest: Manifest, out: Path, *, scorer: str, config: CompressConfig, timed: _Timed, start: float) -> None:
    check_output_finite(model, finetune=config.finetune, quality=manifest.quality)  # a diverged run is refused, never saved
    with timed("save"):
        model.save_pretrained(out, max_shard_size=config.max_shard_size)
        tokenizer.save_pretrained(out)
        if config.plot:
            plot_layer_scores(manifest.layer_scores, manifest.layers_dropped, out / LAYER_PLOT, scorer=scorer)
    total = {"total_seconds": round(time.perf_counter() - start, 3), "total_peak_mb": timed.run_peak_mb()}
    manifest.timings = {**timed.timings, **total}
    manifest.write(out)


def _prune_and_recover(model, tokenizer, features, held: HeldOut, mix: Mix | None, config: CompressConfig, timed, world_size: int):
    """Every step between the loaded dense model and the finished one: (the model, its manifest, the ledger
    points, the scorer whose cut was kept)."""
    if config.compensate:
        biased_mlp_linears(model)  # an architecture that cannot carry --compensate fails before scoring
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in find_layer_stack(model)[1]]
    num_layers, params_before, settings = len(layer_params), count_parameters(model), train_settings(config)
    budget = cut_budget(config, layer_params, params_before)
    check_budget(budget, auto_drop=config.auto_drop)  # an impossible budget fails now
    ledger = _LedgerRun(config, tokenizer, held, mix)
    with timed("ledger"):
        ledger.dense(model)
    recovery_rows = _recovery_features(model, tokenizer, features, mix, config, timed)
    with timed("score"):
        cut = choose_cut(model, features, held, tokenizer, config, settings, budget, ledger.points[-1] if ledger.points else None, timed)
    logger.info("dropping %d of %d layers: %s", len(cut.dropped), num_layers, cut.dropped)
    merge, compensation, teacher = _cut_model(model, cut, features, tokenizer, config, timed, num_layers)
    cut.scores.record = None  # the per-step factors were only needed for the merge
    cut.scores.gblm_cache.clear()  # as were the GBLM metrics (--merge-criterion gblm)
    params_after = count_parameters(model)
    with timed("ledger_pruned"):
        ledger.stage(model, "pruned")

    model, finetune = _recover(model, recovery_rows, tokenizer, settings, teacher, config, timed)
    del teacher
    if config.finetune != "none":
        with timed("ledger_recovered"):
            ledger.stage(model, "recovered")

    manifest = Manifest.from_run(
        config,
        model=model,
        data=_data_record(config, held, features, tokenizer, mix),
        scorer=cut.scores.scorer,
        layer_scores=cut.scores.values.tolist(),
        removal_order=rank_for_removal(cut.scores.values, range(num_layers)),
        scoring=dataclasses.asdict(cut.scores.stats),
        params_per_layer=layer_params,
        params=(params_before, params_after),
        dropped=cut.dropped,
        proposals=cut.proposals,
        merge=merge,
        finetune=finetune,
        compensation=compensation,
        quality=ledger.ledger(),
        world_size=world_size,
    )
    return model, manifest, ledger.points, cut.scores.scorer


def compress(config: CompressConfig) -> dict:
    """Run GradPruner end to end and write the pruned checkpoint (+ gradprune.json) to `config.out`."""
    check_launch(finetune=config.finetune)  # FSDP without CUDA, ZeRO-3, ...: refused before anything loads
    state, timings, start = PartialState(), {}, time.perf_counter()
    timed = _Timed(timings)
    out = check_output_dir(
        config.out,
        overwrite=config.overwrite,
        inputs={
            "--model": config.model,
            "--data": config.data,
            "--teacher": config.teacher,
            "--dense-reference": config.dense_reference,
            "--mix-data": config.mix_data,
        },
    )
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_output_dir(out, overwrite=config.overwrite)) if state.is_main_process else None
        set_seed(config.seed)
        held, mix = _read_data(config), _read_mix(config)  # bad data fails before the model loads
        for source in (config.teacher, config.dense_reference):
            if source:
                resolve_source(source, allow_pickle=config.allow_pickle)  # missing or incomplete: fail now
        with timed("load"):
            model, tokenizer = _load(config, config.model, trust_remote_code=config.trust_remote_code)
            check_input_finite(model, config.model)
            features = tokenize_examples(held.train, tokenizer, max_length=config.max_length)
        model, manifest, points, scorer = _prune_and_recover(model, tokenizer, features, held, mix, config, timed, state.num_processes)
        if manifest.quality and manifest.quality.warning:
            logger.warning("quality: %s", manifest.quality.verdict)
        if state.is_main_process:
            _save(model, tokenizer, manifest, tmp, scorer=scorer, config=config, timed=timed, start=start)
    state.wait_for_everyone()
    return {
        "out": str(out),
        "layers_dropped": manifest.layers_dropped,
        "num_layers": [manifest.num_layers_before, manifest.num_layers_after],
        "params": [manifest.params_before, manifest.params_after],
        "seconds": round(time.perf_counter() - start, 1),
        "quality": {p.stage: {"loss": p.loss, "accuracy": p.accuracy} for p in points},
        "manifest": manifest,
    }


def present_compress(result: dict) -> str:
    """The CLI's view of compress's result: the human summary (with the quality ledger), then one JSON line."""
    result = dict(result)
    manifest = result.pop("manifest")
    return summarize(manifest) + "\n" + json.dumps(result, default=str)
