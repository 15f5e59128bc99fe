"""The IGIA probe: a TrainerCallback that reads LoRA gradients during the first steps of an
ordinary LoRA fine-tune and accumulates GradPruner's importance (see importance.py).

Gradients are read in `on_pre_optimizer_step`: after gradient accumulation and, under DDP,
after the all-reduce, so every process sees the same averaged gradient and computes the same
scores as one process on the same global batch. Under FSDP2 a LoRA gradient is a DTensor sharded on
dim 0: `read_gradients` gathers it with `.full_tensor()` on every rank (LoRA factors are small), so the
IGIA math and every statistic (the zero-gradient test included) run on whole gradients, identical on
every rank — nothing is per-shard, so nothing needs an all-reduce. Plain tensors take the same path.
The probe run disables gradient clipping (see finetune.run_probe) so the gradient read is ∇L itself,
not a clipped copy.

With LoRA's B initialised to zero, ∇A = s·Bᵀ(∂L/∂y)xᵀ is exactly zero on the first step, so
G_1 = ∇B_1·∇A_1 = 0 carries no information. Such steps are counted (`zero_gradient_steps`) but do
not count toward `probe_steps`: the probe runs until it has `probe_steps` informative steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from transformers import TrainerCallback

from ..distributed import full_tensor
from ..surgery import find_layer_stack
from .importance import igia_matrix, igia_step_total, layer_scores

logger = logging.getLogger(__name__)


Key = tuple[int, str]  # (decoder layer, linear's name in it)
Gradients = Mapping[Key, tuple[torch.Tensor, torch.Tensor]]  # key → (∇B: out×r, ∇A: r×in)


@dataclass(frozen=True)
class LoraPair:
    """One LoRA-wrapped linear inside decoder layer `layer`, e.g. (3, 'self_attn.q_proj').

    The parameters are looked up on the module at each read: FSDP2 replaces them (by DTensors)
    when the Trainer shards the model, after the pairs were listed."""

    layer: int
    name: str
    module: LoraLayer
    adapter: str = "default"

    @property
    def key(self) -> Key:
        return (self.layer, self.name)

    @property
    def lora_a(self) -> torch.nn.Parameter:  # r × in
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_b(self) -> torch.nn.Parameter:  # out × r
        return self.module.lora_B[self.adapter].weight


def lora_pairs(peft_model, adapter: str = "default") -> list[LoraPair]:
    """Every LoRA-wrapped linear in the decoder-layer stack of a peft model."""
    _, layers = find_layer_stack(peft_model.get_base_model())
    pairs = []
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                pairs.append(LoraPair(i, name, module, adapter))
    if not pairs:
        raise RuntimeError("no LoRA-wrapped linear found in the decoder layers")
    return pairs


class LayerIGIA(Mapping):
    """{linear name: F} of one layer, F = importance.igia_matrix(factors) computed on each read, never kept."""

    def __init__(self, factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]):
        self._factors = factors

    def __getitem__(self, name: str) -> torch.Tensor:
        return igia_matrix(self._factors[name])

    def __contains__(self, name: object) -> bool:  # without computing F
        return name in self._factors

    def __iter__(self) -> Iterator[str]:
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)


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

    def igia_for_layer(self, layer: int) -> LayerIGIA:
        """Element-level F for every linear of one layer, each computed when it is read (so a merge holds
        one linear's F at a time, not a whole layer's: ~240 MB at 1B, ~870 MB at 8B in float32)."""
        return LayerIGIA({name: f for (i, name), f in self.factors.items() if i == layer})

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
        accumulate(self.record, read_gradients(self.pairs), keep_factors=self.keep_factors, snapshot_steps=self.snapshot_steps)
        self.record.callback_seconds += time.perf_counter() - start

    def on_step_end(self, args, state, control, **kwargs):
        if self.done:
            control.should_training_stop = True
        return control


def read_gradients(pairs: list[LoraPair]) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
    """(∇B, ∇A) of every pair as whole tensors. A sharded (DTensor) gradient is gathered with
    full_tensor(): a collective, which every rank reaches here in the same order of pairs."""
    grads = {}
    for p in pairs:
        grad_a, grad_b = p.lora_a.grad, p.lora_b.grad
        if grad_a is None or grad_b is None:
            raise RuntimeError(f"layer {p.layer} {p.name}: LoRA parameter has no gradient at the optimizer step")
        grads[p.key] = (full_tensor(grad_b.detach()), full_tensor(grad_a.detach()))
    return grads


def accumulate(record: ProbeRecord, grads: Gradients, *, keep_factors: bool = True, snapshot_steps=frozenset()) -> None:
    """Add one optimizer step's LoRA gradients (whole tensors, see read_gradients) to the record."""
    if all(ga.count_nonzero() == 0 for _, ga in grads.values()):
        record.zero_gradient_steps += 1  # B = 0 ⇒ ∇A = 0 ⇒ G = 0: nothing to learn
        return
    for key, (gb, ga) in grads.items():
        record.totals[key] += igia_step_total(gb, ga)
        if keep_factors:
            record.factors[key].append((gb.float().cpu().clone(), ga.float().cpu().clone()))
    record.informative_steps += 1
    if record.informative_steps in snapshot_steps:
        record.snapshots[record.informative_steps] = record.scores().tolist()
