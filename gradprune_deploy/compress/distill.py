"""Logit knowledge distillation for the recovery fine-tune (Hinton et al. 2015; Minitron's recipe).

The pruned student learns from the dense teacher's next-token distribution on the completion
tokens of the training rows (the tokens fine-tuning puts labels on):

    loss = alpha · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) + (1 − alpha) · CE(z_s, y)

averaged over completion tokens. With `top_k`, the KL runs over the teacher's k most likely
tokens only: the teacher distribution is renormalised over them and the student's
log-probabilities (full-vocabulary softmax) are read at the same ids. `distillation_loss` is
pure; `DistillTrainer` wires it into `transformers.Trainer` with teacher logits on the fly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Trainer

IGNORE_INDEX = -100


@dataclass(frozen=True)
class DistillSettings:
    alpha: float = 0.5
    temperature: float = 1.0
    top_k: int | None = None
    teacher_device: str = "same"  # same: the teacher runs where the student's batches are; cpu: it stays on the CPU


def completion_positions(labels: torch.Tensor) -> torch.Tensor:
    """Mask [batch, seq-1] of logit positions that predict a completion token (labels shifted by one)."""
    return labels[:, 1:] != IGNORE_INDEX


def kl_on_completion(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """Mean over completion tokens of KL(teacher ‖ student) at `temperature` (not yet × T²)."""
    mask = completion_positions(labels)
    s = student_logits[:, :-1][mask].float() / temperature  # [tokens, vocab]
    t = teacher_logits[:, :-1][mask].float() / temperature
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    s_logp = F.log_softmax(s, dim=-1)
    if top_k is not None and top_k < t.shape[-1]:
        t_top, ids = t.topk(top_k, dim=-1)
        t_logp = F.log_softmax(t_top, dim=-1)
        s_logp = s_logp.gather(-1, ids)
    else:
        t_logp = F.log_softmax(t, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, ce_loss: torch.Tensor, settings: DistillSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, KL term) — see the module docstring."""
    kl = kl_on_completion(student_logits, teacher_logits, labels, temperature=settings.temperature, top_k=settings.top_k)
    total = settings.alpha * settings.temperature**2 * kl + (1 - settings.alpha) * ce_loss
    return total, kl


def frozen_copy(model: torch.nn.Module, *, dtype: torch.dtype | None = None, device: str | None = None) -> torch.nn.Module:
    """A frozen deep copy of `model` (the teacher: the dense model before pruning). With `dtype` or `device`
    each parameter is made directly in that dtype on that device, one at a time, so a half-precision or
    offloaded teacher never holds a full-precision copy on the way; buffers are moved, never cast."""
    if dtype is None and device is None:
        return copy.deepcopy(model).eval().requires_grad_(False)
    memo = {
        id(p): torch.nn.Parameter(
            p.detach().to(device=device or p.device, dtype=dtype if dtype and p.is_floating_point() else p.dtype, copy=True),
            requires_grad=False,
        )
        for p in model.parameters()
    }
    teacher = copy.deepcopy(model, memo)
    return (teacher.to(device) if device else teacher).eval().requires_grad_(False)


def teacher_forward(teacher: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The teacher's logits on a batch, computed on the teacher's own device."""
    device = next(teacher.parameters()).device
    return teacher(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device), use_cache=False).logits


class DistillTrainer(Trainer):
    """A Trainer whose loss mixes the student's CE with KL to a frozen teacher's logits."""

    def __init__(self, *args, teacher: torch.nn.Module, distill: DistillSettings, **kwargs):
        super().__init__(*args, **kwargs)
        # the teacher runs where the student's batches are (Trainer moves the student, not this attribute),
        # unless it was offloaded (--teacher-device cpu): then its inputs go to it and its logits come back
        teacher = teacher.eval().requires_grad_(False)
        self.teacher = teacher.to(self.args.device) if distill.teacher_device == "same" else teacher
        self.distill = distill
        # compute_loss returns a per-batch mean: let Trainer divide by the accumulation steps itself
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = teacher_forward(self.teacher, inputs).to(outputs.logits.device)
        loss, _ = distillation_loss(outputs.logits, teacher_logits, inputs["labels"], outputs.loss, self.distill)
        return (loss, outputs) if return_outputs else loss
