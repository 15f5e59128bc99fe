"""Model-state helpers the scorers and the compensation share: run a model in eval mode and put it
back as it was, bypass decoder layers, capture module outputs, move a batch to the model.

Orchestration only (hooks and flags, no math). A scorer or a fit wraps its forward passes in
`preserved_train_state`, so it leaves the model as it found it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

Batch = dict[str, torch.Tensor]


@contextlib.contextmanager
def preserved_train_state(*models: nn.Module) -> Iterator[None]:
    """Eval mode inside; every module's training flag and every parameter's requires_grad restored after."""
    modes = {m: m.training for model in models for m in model.modules()}
    flags = {p: p.requires_grad for model in models for p in model.parameters()}
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
        for p, flag in flags.items():
            p.requires_grad_(flag)


@contextlib.contextmanager
def bypassed_layers(layers: nn.ModuleList, skip: Sequence[int]) -> Iterator[None]:
    """Make layers `skip` identity maps (output := input hidden states) for the duration.

    A forward hook replaces the output, so indices, per-layer config (sliding windows) and the
    rest of the stack are untouched; the skipped layer's weights get no gradient.
    """

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in skip]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def captured_outputs(modules: dict, store: dict) -> Iterator[None]:
    """While inside, each forward of modules[key] writes its (first) output tensor to store[key]."""

    def make(key):
        def hook(module, args, output):
            store[key] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [module.register_forward_hook(make(key)) for key, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_kwargs(model: nn.Module, batch: Batch, *, labels: bool) -> dict[str, torch.Tensor]:
    """The batch's model inputs (with labels when asked), on the model's device."""
    device = next(model.parameters()).device
    keys = ("input_ids", "attention_mask", "labels") if labels else ("input_ids", "attention_mask")
    return {k: batch[k].to(device) for k in keys if k in batch}
