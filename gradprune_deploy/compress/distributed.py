"""Multi-process launches: what accelerate's environment asks for, what compress refuses, and the
FSDP2 helpers the fine-tunes use.

`accelerate launch` tells the processes how to distribute through environment variables
(ACCELERATE_USE_FSDP, FSDP_VERSION, ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE,
ACCELERATE_DEEPSPEED_CONFIG_FILE); `check_launch` reads them before the model loads and refuses
what would not do what was asked:

- FSDP without a CUDA device: accelerate 1.16 makes the state MULTI_CPU and the Trainer wraps the
  model in DistributedDataParallel, without a word (FSDP is only set up for GPU-like devices).
- FSDP version 1: its flat parameters hand out per-rank slices of the LoRA gradients.
- DeepSpeed ZeRO stage 3: parameters and gradients are partitioned and `.grad` is None at the
  optimizer step (deepspeed.utils.safe_get_full_grad would be needed), so the probe cannot read ∇L.
- PrunedLoRA under FSDP: its callback reads and edits whole LoRA matrices, which FSDP2 shards.

Under FSDP2 the Trainer shards the model it is given in place (parameters become DTensors sharded
on dim 0). The fine-tunes therefore train a `training_twin` — the same modules, sharing every
tensor's storage with the caller's model, nothing copied — and `copy_trained` gathers the trained
parameters back as full tensors. The caller's model stays plain, so surgery, the merge, the ledger
and `save_pretrained` (a standard full state dict) never see a sharded parameter.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from ..errors import ConfigError

_TRUE = ("1", "true", "yes", "on")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in _TRUE


def fsdp_requested() -> bool:
    """accelerate launch was given an FSDP config (the Trainer will shard the model)."""
    return _env_true("ACCELERATE_USE_FSDP")


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage accelerate launch configured (None: no DeepSpeed, or a stage it did not say)."""
    if not _env_true("ACCELERATE_USE_DEEPSPEED"):
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
    if not stage:
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        try:
            stage = str(json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", ""))
        except (OSError, ValueError, AttributeError):
            return None
    return int(stage) if stage.isdigit() else None


def check_launch(*, finetune: str) -> None:
    """Refuse (ConfigError, before the model loads) a launch that would silently do something else."""
    if deepspeed_zero_stage() == 3:
        raise ConfigError(
            "DeepSpeed ZeRO stage 3 is not supported: it partitions the gradients (.grad is None at the optimizer step), "
            "so the IGIA probe cannot read them; launch with FSDP2 (examples/accelerate/fsdp2.yaml) or DDP (examples/accelerate/ddp.yaml)"
        )
    if not fsdp_requested():
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            "accelerate is configured for FSDP (ACCELERATE_USE_FSDP=true) but this process sees no CUDA device, and accelerate "
            "would silently fall back to DDP; on CPU launch with examples/accelerate/ddp.yaml, or run the FSDP config on GPUs"
        )
    if os.environ.get("FSDP_VERSION", "2").strip() != "2":
        raise ConfigError(
            f"FSDP version {os.environ.get('FSDP_VERSION')} is not supported: set fsdp_version: 2 in the accelerate config "
            "(see examples/accelerate/fsdp2.yaml)"
        )
    if finetune == "prunedlora":
        raise ConfigError(
            "--finetune prunedlora cannot run under FSDP: its callback edits whole LoRA matrices, which FSDP2 shards; "
            "use --finetune lora or full, or launch with DDP (examples/accelerate/ddp.yaml)"
        )


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (an FSDP2 shard) is gathered — a collective every rank must call,
    in the same order; a plain tensor is returned as is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def training_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same modules as `model`, whose parameters and buffers share storage with `model`'s.

    FSDP2 copies each rank's shard into new storage and replaces the twin's parameters, so the twin
    can be sharded and trained while `model` keeps its plain, unchanged tensors. Tied parameters stay tied.
    """
    memo: dict[int, object] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in memo:
            memo[id(p)] = torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    for _, b in model.named_buffers(remove_duplicate=False):
        memo[id(b)] = b
    return copy.deepcopy(model, memo)


def copy_trained(trained: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy every trainable parameter of `trained` (sharded or not) into the same-named one of `target`.

    Under FSDP2 every rank gathers each parameter (full_tensor) in the same order and copies it, so
    every rank's `target` ends up whole and identical.
    """
    params = dict(target.named_parameters())
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if p.requires_grad:
                params[name].copy_(full_tensor(p.detach()))
