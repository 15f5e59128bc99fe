"""PrunedLoRACallback: runs PrunedLoRA's rank pruning (pruning.py) inside an ordinary LoRA fine-tune.

Pruning happens in `on_pre_optimizer_step` of the scheduled steps: after gradient accumulation,
clipping and (under DDP) the all-reduce, so every process reads the same gradient and prunes the
same components, and the gradients read are the ones the optimizer is about to use, as in the
reference code (which prunes inside `optimizer.step`).

A pruned component is kept exactly zero: its gradient is masked before every optimizer step and
its rows of A / columns of B are re-zeroed right after it (`on_optimizer_step`). Masking alone is
not enough: Adam's running moments still move an entry whose gradient is zero.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from transformers import TrainerCallback

from .pruning import DEFAULT_DAMPING, PRUNE_INTERVAL, PRUNE_PER_EVENT, prune_components, rank_schedule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-wrapped linear: its name in the model and its A (R × in) and B (out × R) weights."""

    name: str
    lora_a: torch.nn.Parameter
    lora_b: torch.nn.Parameter


def lora_modules(peft_model, adapter: str = "default") -> list[LoraModule]:
    """Every LoRA-wrapped linear of a peft model (the whole model, not only the decoder layers)."""
    found = [
        LoraModule(name, m.lora_A[adapter].weight, m.lora_B[adapter].weight)
        for name, m in peft_model.named_modules()
        if isinstance(m, LoraLayer) and adapter in m.lora_A
    ]
    if not found:
        raise RuntimeError("no LoRA-wrapped linear found in the model")
    return found


@dataclass
class RankRecord:
    """What the callback did: the schedule it followed and the rank after each pruning event."""

    start_rank: int
    target_rank: int
    schedule: dict[int, int]
    events: list[dict] = field(default_factory=list)  # {"step", "pruned", "rank"}
    callback_seconds: float = 0.0


class PrunedLoRACallback(TrainerCallback):
    """Prunes every LoRA module from `start_rank` to `target_rank` over `total_steps` optimizer steps."""

    def __init__(
        self,
        modules: list[LoraModule],
        *,
        target_rank: int,
        total_steps: int,
        interval: int = PRUNE_INTERVAL,
        per_event: int = PRUNE_PER_EVENT,
        damping: float = DEFAULT_DAMPING,
    ):
        start_rank = modules[0].lora_a.shape[0]
        if any(m.lora_a.shape[0] != start_rank for m in modules):
            raise ValueError("all LoRA modules must start at the same rank")
        self.modules = modules
        self.damping = damping
        self.active = {m.name: torch.ones(start_rank, dtype=torch.bool, device=m.lora_a.device) for m in modules}
        self.record = RankRecord(
            start_rank=start_rank,
            target_rank=target_rank,
            schedule=rank_schedule(
                start_rank=start_rank, target_rank=target_rank, total_steps=total_steps, interval=interval, per_event=per_event
            ),
        )

    def ranks(self) -> dict[str, int]:
        """Current rank of every module, counted from the weights (components with a nonzero A row or B column)."""
        out = {}
        for m in self.modules:
            alive = (m.lora_a.detach() != 0).any(dim=1) | (m.lora_b.detach() != 0).any(dim=0)
            out[m.name] = int(alive.sum())
        return out

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        start = time.perf_counter()
        step = state.global_step + 1  # the optimizer step about to happen, 1-based
        k = self.record.schedule.get(step, 0)
        for m in self.modules:
            active = self.active[m.name]
            if k:
                if m.lora_a.grad is None or m.lora_b.grad is None:
                    raise RuntimeError(f"{m.name}: LoRA parameter has no gradient at the optimizer step")
                new_a, new_b, active, _ = prune_components(
                    m.lora_a, m.lora_b, m.lora_a.grad, m.lora_b.grad, active, k, damping=self.damping
                )
                m.lora_a.copy_(new_a)
                m.lora_b.copy_(new_b)
                self.active[m.name] = active
            if m.lora_a.grad is not None:
                m.lora_a.grad[~active] = 0.0
            if m.lora_b.grad is not None:
                m.lora_b.grad[:, ~active] = 0.0
        if k:
            rank = int(next(iter(self.active.values())).sum())
            self.record.events.append({"step": step, "pruned": k, "rank": rank})
            logger.info("PrunedLoRA step %d: pruned %d components per module, rank now %d", step, k, rank)
        self.record.callback_seconds += time.perf_counter() - start

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, **kwargs):
        for m in self.modules:
            active = self.active[m.name]
            m.lora_a[~active] = 0.0
            m.lora_b[:, ~active] = 0.0

    def stats(self) -> dict:
        ranks = self.ranks()
        return {
            "start_rank": self.record.start_rank,
            "target_rank": self.record.target_rank,
            "schedule": {str(k): v for k, v in self.record.schedule.items()},
            "pruning_steps": [e["step"] for e in self.record.events],
            "rank_after_step": {str(e["step"]): e["rank"] for e in self.record.events},
            "final_rank": max(ranks.values()),
            "final_rank_min": min(ranks.values()),
            "modules": len(ranks),
            "callback_seconds": self.record.callback_seconds,
        }
