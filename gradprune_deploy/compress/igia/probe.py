"""The IGIA probe: a TrainerCallback that reads LoRA gradients during the first steps of an
ordinary LoRA fine-tune and accumulates GradPruner's importance (see importance.py).

Gradients are read in `on_pre_optimizer_step`: after gradient accumulation and, under DDP,
after the all-reduce, so every process sees the same averaged gradient and computes the same
scores as one process on the same global batch. Under FSDP2 a LoRA gradient is a DTensor sharded on
dim 0: `read_gradients` gathers it with `.full_tensor()` on every rank (LoRA factors are small), so the
IGIA math and every statistic (the zero-gradient test included) run on whole gradients, identical on
every rank — nothing is per-shard, so nothing needs an all-reduce. Plain tensors take the same path.
By default the probe run disables gradient clipping (see finetune.run_probe) so the gradient read is ∇L
itself; `ProbeOptions.clip_grad_norm` turns the Trainer's clipping on, as the official code ran it
(max_grad_norm 1.0, gradients saved after clipping): the Trainer clips before `on_pre_optimizer_step`,
so the gradients read here are then the clipped ones, for the layer scores and the merge's F alike.

With LoRA's B initialised to zero, ∇A = s·Bᵀ(∂L/∂y)xᵀ is exactly zero on the first step, so
G_1 = ∇B_1·∇A_1 = 0 carries no information. Such steps are counted (`zero_gradient_steps`) but do
not count toward `probe_steps`: the probe runs until it has `probe_steps` informative steps, or, with
`ProbeOptions.until_stable` (--probe-steps auto), until the layer ranking has converged
(convergence.ranking_converged; `probe_steps` is then the cap). Every process reads the same whole
gradients, so every process takes the same decision to stop.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from transformers import TrainerCallback

from ..distributed import full_tensor
from ..surgery import find_layer_stack
from .convergence import StabilityRule, ranking_converged
from .importance import REDUCTIONS, igia_matrix, layer_scores, step_score

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


@dataclass(frozen=True)
class ProbeOptions:
    """How the probe scores a step and when it stops (ProbeConfig's choices, resolved)."""

    reduce: str = "squared"  # importance.REDUCTIONS: squared = the paper, norm = the official code
    clip_grad_norm: float | None = None  # None: clipping off, the gradient read is ∇L; else the Trainer's max_grad_norm
    until_stable: StabilityRule | None = None  # --probe-steps auto: stop when the ranking has converged

    def __post_init__(self):
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {self.reduce!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {self.clip_grad_norm}")

    def describe_clipping(self) -> str:
        if self.clip_grad_norm is None:
            return "off during the probe"
        return f"max_grad_norm {self.clip_grad_norm:g} during the probe (gradients read after clipping)"


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
    stability: list[dict] = field(default_factory=list)  # --probe-steps auto: {step, tau, rule_met} per informative step
    stop_reason: str = "fixed length"  # or, with --probe-steps auto: "converged" / "cap"

    def scores(self) -> torch.Tensor:
        return layer_scores(self.totals, self.num_layers)

    def igia_for_layer(self, layer: int) -> LayerIGIA:
        """Element-level F for every linear of one layer, each computed when it is read (so a merge holds
        one linear's F at a time, not a whole layer's: ~240 MB at 1B, ~870 MB at 8B in float32)."""
        return LayerIGIA({name: f for (i, name), f in self.factors.items() if i == layer})

    def factor_numbers(self) -> int:
        return sum(gb.numel() + ga.numel() for f in self.factors.values() for gb, ga in f)


class IGIAProbe(TrainerCallback):
    """Accumulates IGIA for `probe_steps` informative optimizer steps (with `options.until_stable`: until the
    layer ranking has converged, `probe_steps` being the cap), then stops training."""

    def __init__(
        self,
        pairs: list[LoraPair],
        num_layers: int,
        probe_steps: int,
        *,
        keep_factors: bool = True,
        snapshot_steps: tuple[int, ...] = (),
        options: ProbeOptions = ProbeOptions(),
    ):
        if probe_steps < 1:
            raise ValueError("probe_steps must be ≥ 1")
        if options.until_stable is not None and options.until_stable.max_steps != probe_steps:
            raise ValueError(f"an adaptive probe's probe_steps is its cap: {probe_steps} ≠ max_steps {options.until_stable.max_steps}")
        self.snapshot_steps = set(snapshot_steps)  # layer scores are also kept after these many informative steps
        self.pairs = pairs
        self.probe_steps = probe_steps
        self.keep_factors = keep_factors
        self.options = options
        self.converged = False
        rule = options.until_stable
        self._recent: deque[list[float]] = deque(maxlen=rule.patience + 1 if rule else 1)  # what the rule looks back on
        self.record = ProbeRecord(
            num_layers=num_layers,
            totals={p.key: 0.0 for p in pairs},
            factors={p.key: [] for p in pairs},
        )

    @property
    def done(self) -> bool:
        return self.converged or self.record.informative_steps >= self.probe_steps

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.done:
            return
        start = time.perf_counter()
        informative = accumulate(
            self.record,
            read_gradients(self.pairs),
            keep_factors=self.keep_factors,
            snapshot_steps=self.snapshot_steps,
            reduce=self.options.reduce,
        )
        if informative and self.options.until_stable is not None:
            self._check_stability(self.options.until_stable)
        self.record.callback_seconds += time.perf_counter() - start

    def _check_stability(self, rule: StabilityRule) -> None:
        """Snapshot the scores, judge the last snapshots, stop once converged past the floor (or at the cap)."""
        steps = self.record.informative_steps
        self._recent.append(self.record.scores().tolist())
        stop, tau = ranking_converged(list(self._recent), rule)
        tau = None if tau is None or math.isnan(tau) else tau  # nan: a constant snapshot orders nothing (JSON has no nan)
        self.record.stability.append({"step": steps, "tau": tau, "rule_met": stop})
        if stop and steps >= rule.min_steps:
            self.converged, self.record.stop_reason = True, "converged"
        elif steps >= self.probe_steps:
            self.record.stop_reason = "cap"

    def on_step_end(self, args, state, control, **kwargs):
        if self.done:
            control.should_training_stop = True
        return control

    def stats(self) -> dict:
        """The probe's choices and, with --probe-steps auto, how it stopped (for the manifest's `scoring`)."""
        rule = self.options.until_stable
        adaptive = None
        if rule is not None:
            adaptive = {
                "rule": {**rule.as_dict(), "cut_checked": rule.drop_count is not None},
                "steps_used": self.record.informative_steps,
                "stopped": self.record.stop_reason,
                "tau_trace": [[s["step"], s["tau"]] for s in self.record.stability],
                "rule_met_at": next((s["step"] for s in self.record.stability if s["rule_met"]), None),  # the floor aside
            }
        return {
            "igia_reduce": self.options.reduce,
            "probe_clip_grad_norm": self.options.clip_grad_norm,
            "gradient_clipping": self.options.describe_clipping(),
            "adaptive": adaptive,
        }


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


def accumulate(
    record: ProbeRecord, grads: Gradients, *, keep_factors: bool = True, snapshot_steps=frozenset(), reduce: str = "squared"
) -> bool:
    """Add one optimizer step's LoRA gradients (whole tensors, see read_gradients) to the record; whether
    the step was informative. `reduce` is how a step enters the layer scores (importance.step_score);
    the stored factors, hence the merge's F, are the same under either."""
    if all(ga.count_nonzero() == 0 for _, ga in grads.values()):
        record.zero_gradient_steps += 1  # B = 0 ⇒ ∇A = 0 ⇒ G = 0: nothing to learn
        return False
    for key, (gb, ga) in grads.items():
        record.totals[key] += step_score(gb, ga, reduce)
        if keep_factors:
            record.factors[key].append((gb.float().cpu().clone(), ga.float().cpu().clone()))
    record.informative_steps += 1
    if record.informative_steps in snapshot_steps:
        record.snapshots[record.informative_steps] = record.scores().tolist()
    return True
