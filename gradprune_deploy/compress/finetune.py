"""Trainer + peft set-up for the two fine-tunes GradPruner runs: the short LoRA probe on the dense
model, and the recovery fine-tune of the pruned model (LoRA merged at the end, or full).

Both go through `transformers.Trainer`, so `accelerate launch` scales them out: DDP (tested on CPU),
FSDP2 on GPUs. Under FSDP the Trainer trains a `training_twin` of the model (sharded by accelerate),
and the trained parameters are gathered back into the caller's plain model (distributed.py): no
function outside the Trainer ever sees a sharded parameter, and the saved checkpoint is a standard
full state dict. check_launch (distributed.py) refuses the launches that cannot work.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, replace

import torch
from accelerate import PartialState
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..data import CompletionCollator
from ..errors import raise_if_interrupted
from ..utils import progress_disabled
from .config import CompressConfig
from .distill import DistillTrainer
from .distributed import copy_trained, fsdp_requested, training_twin
from .divergence import StopOnNonFiniteLoss
from .igia.probe import IGIAProbe, ProbeOptions, ProbeRecord, lora_pairs
from .prunedlora.callback import PrunedLoRACallback, lora_modules
from .prunedlora.pruning import PRUNE_INTERVAL, PRUNE_PER_EVENT, paper_pace_gap
from .surgery import find_layer_stack

logger = logging.getLogger(__name__)


DEFAULT_LEARNING_RATE = {"lora": 2e-4, "full": 2e-5, "prunedlora": 2e-4}


@dataclass
class TrainSettings:
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float | None = None  # None: DEFAULT_LEARNING_RATE[mode]
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    prunedlora_start_rank: int = 64  # PrunedLoRA: LoRA rank the recovery starts from, pruned down to lora_r
    seed: int = 0
    gradient_checkpointing: bool = False
    sampling: str = "random"  # Trainer's train_sampling_strategy; "sequential" for reproducible tests


def train_settings(config: CompressConfig) -> TrainSettings:
    """The fine-tune settings (probe and recovery) a CompressConfig asks for."""
    return TrainSettings(
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        learning_rate=config.learning_rate,
        epochs=config.epochs,
        max_steps=config.max_steps,
        warmup_ratio=config.warmup_ratio,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        prunedlora_start_rank=config.prunedlora_start_rank,
        seed=config.seed,
        gradient_checkpointing=config.gradient_checkpointing,
    )


def world_size() -> int:
    return PartialState().num_processes


def planned_steps(num_examples: int, s: TrainSettings) -> int:
    """Optimizer steps the fine-tune would take: max_steps, else epochs × steps per epoch."""
    if s.max_steps:
        return s.max_steps
    per_epoch = math.ceil(num_examples / (s.batch_size * s.grad_accum * world_size()))
    return max(1, math.ceil(s.epochs * per_epoch))


def _training_args(
    output_dir: str, s: TrainSettings, *, max_steps: int, max_grad_norm: float, learning_rate: float, disable_tqdm: bool | None = None
):
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=learning_rate,
        max_steps=max_steps,
        warmup_steps=s.warmup_ratio,  # a float < 1 is a ratio of the run in transformers 5
        weight_decay=s.weight_decay,
        max_grad_norm=max_grad_norm,
        lr_scheduler_type="linear",
        logging_steps=max(1, max_steps // 10),
        logging_nan_inf_filter=False,  # log a NaN/inf loss as it is, so a diverged run stops (divergence.py)
        save_strategy="no",
        report_to="none",
        seed=s.seed,
        data_seed=s.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=progress_disabled() if disable_tqdm is None else disable_tqdm,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy=s.sampling,
        gradient_checkpointing=s.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if s.gradient_checkpointing else None,
    )


def attach_lora(model, s: TrainSettings):
    torch.manual_seed(s.seed)  # LoRA A init: same on every process
    config = LoraConfig(
        r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, target_modules="all-linear", task_type="CAUSAL_LM", bias="none"
    )
    return get_peft_model(model, config)


class _LogToLogger(TrainerCallback):
    """Trainer prints its log dicts to stdout; send them to logging instead (library code logs)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            logger.info(
                "step %d: %s", state.global_step, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
            )


class _StopOnSignal(TrainerCallback):
    """Stop at the next step if a signal arrived whose exception was swallowed (see errors.py)."""

    def on_step_end(self, args, state, control, **kwargs):
        raise_if_interrupted()


class _BarOnly(ProgressCallback):
    """The progress bar, without printing every log dict."""

    def on_log(self, *args, **kwargs):
        pass


def _trainer(model, features, tokenizer, args, callbacks=(), *, stage: str = "fine-tune", final_forward=True, teacher=None, distill=None):
    """The Trainer of every fine-tune; a non-finite loss stops it, naming `stage` (divergence.py). `final_forward`:
    also check the loss after the last step (off for the probe, whose adapters are discarded)."""
    kwargs = dict(
        model=model,
        args=args,
        train_dataset=features,
        data_collator=CompletionCollator(tokenizer.pad_token_id),
        callbacks=[*callbacks, _StopOnSignal(), StopOnNonFiniteLoss(stage, final_forward=final_forward)],
    )
    if teacher is not None:
        trainer = DistillTrainer(**kwargs, teacher=teacher, distill=distill)
    else:
        trainer = Trainer(**kwargs)
    trainer.remove_callback(PrinterCallback)
    if not args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_BarOnly)
    trainer.add_callback(_LogToLogger())
    return trainer


def run_probe(
    model, features, tokenizer, s: TrainSettings, *, probe_steps: int, keep_factors=True, snapshot_steps=(), options=None
) -> tuple[ProbeRecord, dict]:
    """LoRA fine-tune the dense model until `probe_steps` informative steps are recorded (with
    `options.until_stable`: until the layer ranking converges, `probe_steps` being the cap).

    The probe's adapters are discarded afterwards: the model comes back with its weights
    untouched. Gradient clipping is off during the probe so the gradients read are ∇L, unless
    `options.clip_grad_norm` asks for the official code's clipped gradients (igia/probe.py).
    `snapshot_steps`: also keep the layer scores after these many informative steps (record.snapshots).
    `options` (igia.probe.ProbeOptions): the IGIA reduction, the clipping, the adaptive stop; default the paper's.
    Dropout in LoRA is kept as configured (it is part of the fine-tune being probed).
    """
    num_layers = len(find_layer_stack(model)[1])
    options = options or ProbeOptions()
    model.config.use_cache = False
    sharded = fsdp_requested()  # the Trainer shards what it trains: give it a twin, keep `model` plain
    peft_model = attach_lora(training_twin(model) if sharded else model, s)
    probe = IGIAProbe(
        lora_pairs(peft_model), num_layers, probe_steps, keep_factors=keep_factors, snapshot_steps=snapshot_steps, options=options
    )
    # The probe is the start of the planned fine-tune (same LR schedule, warm-up included); the
    # callback stops it after `probe_steps` informative steps. Zero-gradient steps are expected
    # at the start (B = 0; linear warm-up also makes the first learning rate 0): leave room.
    max_steps = max(planned_steps(len(features), s), probe_steps + 4)
    lr = s.learning_rate or DEFAULT_LEARNING_RATE["lora"]
    with tempfile.TemporaryDirectory(prefix="gradprune-probe-") as tmp:
        args = _training_args(tmp, s, max_steps=max_steps, max_grad_norm=options.clip_grad_norm or 0.0, learning_rate=lr)
        trainer = _trainer(peft_model, features, tokenizer, args, callbacks=[probe], stage="LoRA probe", final_forward=False)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    if not probe.done:
        raise RuntimeError(f"the probe recorded {probe.record.informative_steps} informative steps of {probe_steps}")
    if not sharded:
        peft_model.unload()  # removes the LoRA wrappers; base weights were never modified
    model.config.use_cache = True
    for p in model.parameters():
        p.grad = None
    optimizer_steps = probe.record.informative_steps + probe.record.zero_gradient_steps
    stats = {
        "probe_steps": probe.record.informative_steps,
        "zero_gradient_steps": probe.record.zero_gradient_steps,
        "optimizer_steps": optimizer_steps,
        "seconds": seconds,
        "seconds_per_step": seconds / max(1, optimizer_steps),
        "igia_callback_seconds": probe.record.callback_seconds,
        "stored_factor_numbers": probe.record.factor_numbers(),
        **probe.stats(),  # the IGIA reduction, the clipping and, with --probe-steps auto, how it stopped
    }
    return probe.record, stats


def recovery_finetune(
    model,
    features,
    tokenizer,
    s: TrainSettings,
    *,
    mode: str,
    steps: int | None = None,
    teacher=None,
    distill=None,
    quiet: bool = False,
    merge: bool = True,
):
    """Fine-tune the pruned model. mode: 'lora' (merged into the weights at the end), 'prunedlora'
    (LoRA started at s.prunedlora_start_rank and pruned to s.lora_r during the run, then merged;
    see prunedlora/) or 'full'.

    With `teacher` (a frozen dense model) and `distill` (DistillSettings) the loss is logit
    distillation mixed with CE (distill.py). `steps` overrides the planned length (short heals).
    `merge=False` returns the peft model with its LoRA unmerged (a judged heal removes it afterwards).
    """
    if mode not in DEFAULT_LEARNING_RATE:
        raise ValueError(mode)
    lr = s.learning_rate or DEFAULT_LEARNING_RATE[mode]
    model.config.use_cache = False
    stage = f"{mode} heal of a candidate cut (--heal-steps)" if steps else f"{mode} recovery fine-tune"
    steps = steps or planned_steps(len(features), s)
    sharded = fsdp_requested()  # the Trainer shards what it trains: give it a twin, keep `model` plain
    train_model, callbacks = _trainable(model, s, mode=mode, steps=steps, twin=sharded)
    with tempfile.TemporaryDirectory(prefix="gradprune-finetune-") as tmp:
        args = _training_args(tmp, s, max_steps=steps, max_grad_norm=s.max_grad_norm, learning_rate=lr, disable_tqdm=quiet or None)
        trainer = _trainer(train_model, features, tokenizer, args, callbacks, stage=stage, teacher=teacher, distill=distill)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    prunedlora = callbacks[0].stats() if mode == "prunedlora" else None
    if sharded:
        train_model = _gather_trained(train_model, model, s, mode=mode)
    if mode in ("lora", "prunedlora"):
        model = train_model.merge_and_unload() if merge else train_model
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    model.config.use_cache = True
    model.eval()
    stats = {
        "mode": mode,
        "objective": "distill" if teacher is not None else "ce",
        "steps": steps,
        "learning_rate": lr,
        "seconds": seconds,
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
    }
    if prunedlora is not None:
        stats["prunedlora"] = prunedlora
    return model, stats


def _trainable(model, s: TrainSettings, *, mode: str, steps: int, twin: bool):
    """(the model the Trainer trains, its callbacks): the model with LoRA attached, or itself made trainable
    (mode full). `twin`: a training_twin of it instead, for the Trainer to shard (FSDP)."""
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    base = training_twin(model) if twin else model
    if mode == "lora":
        return attach_lora(base, s), []
    if mode == "prunedlora":
        peft_model, pruner = _attach_prunedlora(base, s, total_steps=steps)
        return peft_model, [pruner]
    return base, []


def _gather_trained(trained, model, s: TrainSettings, *, mode: str):
    """The sharded twin's trained parameters gathered (full tensors, every rank) into the plain `model`:
    into a LoRA attached to it the same way (mode lora; the caller merges it), else into its own weights."""
    target = attach_lora(model, s) if mode == "lora" else model
    copy_trained(trained, target)
    return target


def _attach_prunedlora(model, s: TrainSettings, *, total_steps: int):
    """LoRA at the start rank R0, with alpha scaled by R0/r so the LoRA scaling (alpha/rank) is the
    one a rank-r LoRA with s.lora_alpha would have; plus the callback that prunes it to rank r."""
    if s.prunedlora_start_rank < s.lora_r:
        raise ValueError(f"prunedlora_start_rank {s.prunedlora_start_rank} is below the target rank lora_r {s.lora_r}")
    gap = paper_pace_gap(start_rank=s.prunedlora_start_rank, target_rank=s.lora_r, total_steps=total_steps)
    if gap is not None:
        max_start_rank, min_steps = gap
        logger.warning(
            "PrunedLoRA: %d steps cannot prune rank %d to %d at the paper's pace (%d components every %d steps), so each "
            "event prunes more (on sst2, 64 -> 8 in 100 steps ended at chance); "
            "use --prunedlora-start-rank %d or less, or --max-steps %d or more",
            total_steps,
            s.prunedlora_start_rank,
            s.lora_r,
            PRUNE_PER_EVENT,
            PRUNE_INTERVAL,
            max_start_rank,
            min_steps,
        )
    start = replace(s, lora_r=s.prunedlora_start_rank, lora_alpha=s.lora_alpha * s.prunedlora_start_rank / s.lora_r)
    peft_model = attach_lora(model, start)
    return peft_model, PrunedLoRACallback(lora_modules(peft_model), target_rank=s.lora_r, total_steps=total_steps)
