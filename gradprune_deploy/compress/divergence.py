"""A fine-tune whose loss goes non-finite stops, naming the option to change; a model whose weights
are not finite is never saved (nor compressed, when it is the input).

transformers' Trainer, left to its defaults, hides a diverged run: `logging_nan_inf_filter` replaces
each NaN/inf step loss by the running average before it is logged, so the log shows plausible numbers,
training carries on, and the run ends "successfully" with NaN weights. The fine-tunes here (probe,
heals, recovery; finetune._training_args) turn that filter off, so every logged loss is the true mean
of its steps, and `StopOnNonFiniteLoss` raises at the first non-finite one: the periodic `loss` logs
during training, and the run's mean `train_loss` that the Trainer logs at its end (covering the steps
after the last periodic log). The last optimizer step is seen by no loss (a step's loss is computed
before its update), so for a fine-tune whose weights are kept (`final_forward`) it also runs one
forward pass on a training batch after the last step. The ConfigError unwinds through compress's
atomic output: nothing is written, and the CLI prints one line and exits 2.

Before anything is saved, `check_output_finite` reads every weight of the finished model with
`verify.first_non_finite` (the test the exporters apply to the saved files) and checks its held-out
loss when the ledger measured one; at load, `check_input_finite` reads the input model's weights.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from ..errors import ConfigError, GradPruneError, ModelLoadError
from ..verify import first_non_finite
from .hooks import forward_kwargs, preserved_train_state

_LOSS_KEYS = ("loss", "train_loss")  # the periodic logs, and the mean loss the Trainer logs at the end
_LOWER_LR = "lower --learning-rate (defaults: 2e-4 for LoRA, 2e-5 for full)"


def divergence_error(stage: str, loss: float, *, when: str, learning_rate: float, dtype: torch.dtype | None) -> ConfigError:
    """The one line for a fine-tune whose loss went non-finite: what, when, and the option to change."""
    fix = _LOWER_LR
    if dtype == torch.float16:
        fix += ", or train in --dtype bfloat16 or float32 (float16 overflows easily)"
    return ConfigError(
        f"--learning-rate {learning_rate:g} made the {stage} loss non-finite ({loss}) {when}: {fix}; "
        "training was stopped and nothing was saved"
    )


class StopOnNonFiniteLoss(TrainerCallback):
    """Raise `divergence_error` as soon as a logged loss (periodic or the run's mean) is NaN or inf; with
    `final_forward`, also when the model after the last step gives a non-finite loss on a training batch."""

    def __init__(self, stage: str, *, final_forward: bool = False):
        self.stage, self.final_forward = stage, final_forward

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        for key in _LOSS_KEYS:
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise divergence_error(
                    self.stage, value, when=f"by step {state.global_step}", learning_rate=args.learning_rate, dtype=_dtype(model)
                )

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if not self.final_forward or model is None or train_dataloader is None:
            return
        batch = next(iter(train_dataloader))  # every process takes its own first batch: a collective forward under FSDP
        with torch.no_grad(), preserved_train_state(model):
            loss = model(**forward_kwargs(model, batch, labels=True)).loss
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss)  # every process decides on the same number, so all stop or none
        if not torch.isfinite(loss):
            when = f"after its last step (step {state.global_step})"
            raise divergence_error(self.stage, loss.item(), when=when, learning_rate=args.learning_rate, dtype=_dtype(model))


def _dtype(model) -> torch.dtype | None:
    return next(model.parameters()).dtype if model is not None else None


def check_weights_finite(model: torch.nn.Module, *, what: str, fix: str, error: type[GradPruneError] = ConfigError) -> None:
    """Refuse (one `error` line: `what`, the first broken tensor, `fix`) a model with a NaN or inf weight."""
    found = first_non_finite(model.state_dict().items())
    if found:
        name, count = found
        raise error(f"{what} has non-finite weights ({name}: {count:,} NaN/inf values): {fix}; nothing was saved")


def check_input_finite(model: torch.nn.Module, source: str) -> None:
    """The input model: NaN/inf weights would only be blamed on the fine-tune later."""
    fix = "compress a checkpoint whose weights are finite (copy or convert it again from its source)"
    check_weights_finite(model, what=f"--model {source}", fix=fix, error=ModelLoadError)


def check_output_finite(model: torch.nn.Module, *, finetune: str, quality=None) -> None:
    """The finished model, before it is saved: finite weights, and a finite held-out loss when the ledger
    (`quality`, a manifest QualityLedger) measured it; the message names what can have broken it."""
    if finetune == "none":
        fix = "the cut made them (the merge or --compensate): try --merge-layers none, or a larger --compensate-ridge"
    else:
        fix = f"the {finetune} recovery fine-tune diverged: {_LOWER_LR}"
    check_weights_finite(model, what="the compressed model", fix=fix)
    final = quality and (quality.point("recovered") or quality.point("pruned"))
    if final and final.loss is not None and not math.isfinite(final.loss):
        raise ConfigError(f"the compressed model's held-out loss is {final.loss} (ledger stage {final.stage}): {fix}; nothing was saved")
