"""The IGIA probe: a TrainerCallback that reads LoRA gradients during the first steps of an
ordinary LoRA fine-tune and accumulates GradPruner's importance (see importance.py).

Gradients are read in `on_pre_optimizer_step`: after gradient accumulation and, under DDP,
after the all-reduce, so every process sees the same averaged gradient and computes the same
scores as one process on the same global batch. The probe run disables gradient clipping
(see finetune.run_probe) so the gradient read is ∇L itself, not a clipped copy.

With LoRA's B initialised to zero, ∇A = s·Bᵀ(∂L/∂y)xᵀ is exactly zero on the first step, so
G_1 = ∇B_1·∇A_1 = 0 carries no information. Such steps are counted (`zero_gradient_steps`) but do
not count toward `probe_steps`: the probe runs until it has `probe_steps` informative steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from .importance import igia_matrix, igia_step_total, layer_scores
from .surgery import find_layer_stack

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraPair:
    """One LoRA-wrapped linear inside decoder layer `layer`, e.g. (3, 'self_attn.q_proj')."""

    layer: int
    name: str
    lora_a: torch.nn.Parameter  # r × in
    lora_b: torch.nn.Parameter  # out × r

    @property
    def key(self) -> tuple[int, str]:
        return (self.layer, self.name)


def lora_pairs(peft_model, adapter: str = "default") -> list[LoraPair]:
    """Every LoRA-wrapped linear in the decoder-layer stack of a peft model."""
    from peft.tuners.lora import LoraLayer

    _, layers = find_layer_stack(peft_model.get_base_model())
    pairs = []
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                pairs.append(LoraPair(i, name, module.lora_A[adapter].weight, module.lora_B[adapter].weight))
    if not pairs:
        raise RuntimeError("no LoRA-wrapped linear found in the decoder layers")
    return pairs


@dataclass
class ProbeRecord:
    """What the probe measured: per-linear IGIA totals and the per-step low-rank factors."""

    num_layers: int
    totals: dict[tuple[int, str], float] = field(default_factory=dict)
    factors: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    informative_steps: int = 0
    zero_gradient_steps: int = 0
    callback_seconds: float = 0.0
    snapshots: dict[int, list[float]] = field(default_factory=dict)  # informative steps → layer scores then

    def scores(self) -> torch.Tensor:
        return layer_scores(self.totals, self.num_layers)

    def igia_for_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """Element-level F for every linear of one layer (materialised on demand)."""
        return {name: igia_matrix(f) for (i, name), f in self.factors.items() if i == layer}

    def factor_numbers(self) -> int:
        return sum(gb.numel() + ga.numel() for f in self.factors.values() for gb, ga in f)


class IGIAProbe(TrainerCallback):
    """Accumulates IGIA for `probe_steps` informative optimizer steps, then stops training."""

    def __init__(
        self, pairs: list[LoraPair], num_layers: int, probe_steps: int, *, keep_factors: bool = True, snapshot_steps: tuple[int, ...] = ()
    ):
        if probe_steps < 1:
            raise ValueError("probe_steps must be ≥ 1")
        self.snapshot_steps = set(snapshot_steps)  # layer scores are also kept after these many informative steps
        self.pairs = pairs
        self.probe_steps = probe_steps
        self.keep_factors = keep_factors
        self.record = ProbeRecord(
            num_layers=num_layers,
            totals={p.key: 0.0 for p in pairs},
            factors={p.key: [] for p in pairs},
        )

    @property
    def done(self) -> bool:
        return self.record.informative_steps >= self.probe_steps

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.done:
            return
        start = time.perf_counter()
        grads = []
        for p in self.pairs:
            if p.lora_a.grad is None or p.lora_b.grad is None:
                raise RuntimeError(f"layer {p.layer} {p.name}: LoRA parameter has no gradient at the optimizer step")
            grads.append((p.lora_b.grad.detach(), p.lora_a.grad.detach()))
        if all(ga.count_nonzero() == 0 for _, ga in grads):
            self.record.zero_gradient_steps += 1  # B = 0 ⇒ ∇A = 0 ⇒ G = 0: nothing to learn
        else:
            for p, (gb, ga) in zip(self.pairs, grads):
                self.record.totals[p.key] += igia_step_total(gb, ga)
                if self.keep_factors:
                    self.record.factors[p.key].append((gb.float().cpu().clone(), ga.float().cpu().clone()))
            self.record.informative_steps += 1
            if self.record.informative_steps in self.snapshot_steps:
                self.record.snapshots[self.record.informative_steps] = self.record.scores().tolist()
        self.record.callback_seconds += time.perf_counter() - start

    def on_step_end(self, args, state, control, **kwargs):
        if self.done:
            control.should_training_stop = True
        return control
