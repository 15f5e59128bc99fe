"""Baseline layer scorers for `gradprune compress --scorer ...` (igia, GradPruner's own, lives in
importance.py).

One signature for all: `score(model, batches, *, seed=0) -> torch.Tensor` of shape
[num_layers], float64, HIGHER = MORE IMPORTANT (selection drops the lowest). `model` is a plain
`AutoModelForCausalLM`; `batches` are CompletionCollator dicts (`input_ids`, `attention_mask`,
`labels` = -100 on prompt and padding). Every scorer leaves the model as it found it: weights,
`requires_grad` flags, `.grad` (gradients are taken with `torch.autograd.grad`, never
accumulated into `.grad`), train/eval mode of every module, and no hooks left behind.

- block-influence: ShortGPT (Men et al. 2024), BI_l = E[1 - cos(h_in, h_out)] over the
  non-padding tokens of the task data.
- last-n: deepest layers least important, final layer kept (dropping k removes L-1-k .. L-2).
- random: a seeded permutation of 0..L-1.
- taylor: first-order Taylor, sum over the layer's parameters of |w * dL/dw|.
- ppl: Shortened LLaMA (Kim et al. 2024): loss increase when the layer alone is removed,
  measured on the validation rows.
- gradmap: GradMAP stage 1 (Liu, Li, Zhang, Tang 2026, arXiv 2602.14649), see `gradmap`.
- gblm: GBLM-Pruner's weight metric (gblm.py) summed over the layer's linears, see `gblm`.

Pure tensor math (`block_influence_terms`, `taylor_terms`, `gradient_magnitude_terms`,
`ranks_from_removal_order`) is separate from the hooks/autograd orchestration.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from ..errors import DataError
from .surgery import find_layer_stack

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


# ---------------------------------------------------------------- pure math


def block_influence_terms(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(sum of 1 - cos(h_in, h_out) over tokens where mask is 1, number of such tokens).

    h_in, h_out: [batch, seq, hidden]; mask: [batch, seq]. Computed in float64.
    """
    cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1, eps=1e-12)
    keep = mask.bool()
    return float((1.0 - cos)[keep].sum()), int(keep.sum())


def taylor_terms(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> float:
    """sum over all elements of |w * g| (float64)."""
    return float(sum((w.double() * g.double()).abs().sum() for w, g in zip(weights, grads)))


def gradient_magnitude_terms(grads: Sequence[torch.Tensor]) -> float:
    """Mean |g| over all elements of a layer's parameters (float64)."""
    numel = sum(g.numel() for g in grads)
    return float(sum(g.double().abs().sum() for g in grads) / numel)


def ranks_from_removal_order(removed: Sequence[int], survivor_scores: dict[int, float], num_layers: int) -> torch.Tensor:
    """Scores from a greedy removal sequence: the t-th layer removed scores t, survivors score
    above every removed layer, ordered among themselves by `survivor_scores`. Dropping the k
    lowest therefore drops exactly the first k layers removed."""
    scores = torch.empty(num_layers, dtype=torch.float64)
    for t, layer in enumerate(removed):
        scores[layer] = float(t)
    survivors = sorted(survivor_scores, key=lambda i: (survivor_scores[i], i))
    for rank, layer in enumerate(survivors):
        scores[layer] = float(len(removed) + rank)
    return scores


# ---------------------------------------------------------------- orchestration helpers


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every module's training flag and every parameter's requires_grad restored after."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
        for p, flag in flags.items():
            p.requires_grad_(flag)


@contextlib.contextmanager
def _skipping(layers: nn.ModuleList, skip: Sequence[int]) -> Iterator[None]:
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


def _forward_kwargs(model: nn.Module, batch: Batch, *, labels: bool) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    keys = ("input_ids", "attention_mask", "labels") if labels else ("input_ids", "attention_mask")
    return {k: batch[k].to(device) for k in keys if k in batch}


def _check_batches(batches: Sequence[Batch], *, need_labels: bool) -> None:
    if not batches:
        raise DataError("the scorer got no batches: give --data with at least one row")
    if need_labels and not any(bool((b["labels"] != -100).any()) for b in batches):
        raise DataError("no completion tokens in the scoring batches (every label is -100): check the data's completions")


def layer_gradients(model: nn.Module, batches: Sequence[Batch], *, skip: Sequence[int] = ()) -> list[list[torch.Tensor]]:
    """Per layer, dL/dw for each of its parameters (float32, same order as layer.parameters()),
    where L = sum over batches of the batch's mean completion-token loss. Layers in `skip` are
    bypassed (identity) and get zero gradients. One forward + backward per batch."""
    _, layers = find_layer_stack(model)
    params = [list(layer.parameters()) for layer in layers]
    flat = [p for group in params for p in group]
    totals = [torch.zeros_like(p, dtype=torch.float32) for p in flat]
    with _preserved(model), _skipping(layers, skip), torch.enable_grad():
        for p in flat:
            p.requires_grad_(True)
        for batch in batches:
            if not bool((batch["labels"] != -100).any()):
                continue  # no completion token: its mean loss is undefined (nan)
            loss = model(**_forward_kwargs(model, batch, labels=True), use_cache=False).loss
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
            for total, g in zip(totals, grads):
                if g is not None:
                    total += g.float()
    out, start = [], 0
    for group in params:
        out.append(totals[start : start + len(group)])
        start += len(group)
    return out


# ---------------------------------------------------------------- scorers


@torch.no_grad()
def block_influence(model: nn.Module, batches: Sequence[Batch], *, seed: int = 0) -> torch.Tensor:
    """ShortGPT Block Influence: BI_l = mean over non-padding tokens of 1 - cos(h_in_l, h_out_l).

    A layer that barely turns the hidden state (cos ~ 1) has low BI and is dropped first.
    Forward hooks read each decoder layer's input and output hidden states; one forward pass
    per batch; deterministic (`seed` unused). Deviation from the paper: tokens are the task's
    prompt+completion rows rather than a generic calibration corpus, and padding is excluded.
    """
    _check_batches(batches, need_labels=False)
    _, layers = find_layer_stack(model)
    sums, counts = [0.0] * len(layers), [0] * len(layers)
    current_mask: list[torch.Tensor] = []

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            s, n = block_influence_terms(h_in, h_out, current_mask[0])
            sums[index] += s
            counts[index] += n

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with _preserved(model):
            for batch in batches:
                kwargs = _forward_kwargs(model, batch, labels=False)
                current_mask[:] = [kwargs["attention_mask"]]
                model(**kwargs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.tensor([s / max(n, 1) for s, n in zip(sums, counts)], dtype=torch.float64)


def last_n(model: nn.Module, batches: Sequence[Batch] = (), *, seed: int = 0) -> torch.Tensor:
    """Deepest layers least important, the final layer most important; no data needed.

    Layer i < L-1 scores L-1-i, layer L-1 scores L: dropping the k lowest removes L-1-k .. L-2
    (the common "drop the last layers but keep the final one" baseline).
    """
    num_layers = len(find_layer_stack(model)[1])
    scores = torch.tensor([num_layers - 1 - i for i in range(num_layers)], dtype=torch.float64)
    scores[-1] = float(num_layers)
    return scores


def random_scores(model: nn.Module, batches: Sequence[Batch] = (), *, seed: int = 0) -> torch.Tensor:
    """A uniformly random permutation of 0..L-1, reproducible for a given seed."""
    num_layers = len(find_layer_stack(model)[1])
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_layers, generator=generator).to(torch.float64)


def taylor(model: nn.Module, batches: Sequence[Batch], *, seed: int = 0) -> torch.Tensor:
    """First-order Taylor importance: sum over the layer's parameters (every weight of the
    decoder layer: attention and MLP linears and the norms) of |w * dL/dw|.

    L is the completion-token loss summed over batches (each batch's mean, as in gradient
    accumulation), so dL/dw is the gradient accumulated over all batches; the absolute value is
    taken after accumulation (the first-order estimate of the loss change when w is zeroed).
    One forward + backward per batch; deterministic (`seed` unused).
    """
    _check_batches(batches, need_labels=True)
    _, layers = find_layer_stack(model)
    grads = layer_gradients(model, batches)
    return torch.tensor([taylor_terms([p.detach() for p in layer.parameters()], g) for layer, g in zip(layers, grads)], dtype=torch.float64)


def gradmap(
    model: nn.Module, batches: Sequence[Batch], *, seed: int = 0, iterative: bool = True, max_decisions: int | None = None
) -> torch.Tensor:
    """GradMAP stage 1 (arXiv 2602.14649): layer importance from gradient magnitudes, one
    backward pass (over `batches`) per pruning decision.

    Metric: the mean |dL/dw| over all parameters of the layer, with L the completion-token loss
    summed over batches (gradient accumulated over batches, magnitude taken after).
    `iterative=True` (default, the paper's procedure as its abstract states it): repeat
    {one backward pass; remove the layer with the smallest metric} on the progressively pruned
    model, removed layers bypassed as identity. Scores are the removal ranks (first removed =
    0), so selection dropping the k lowest reproduces exactly k greedy decisions. That costs one
    backward pass per decision: `max_decisions` (e.g. the number of layers to drop) stops early,
    and the layers never removed are ordered by the last pass's metric. `iterative=False`: a
    single pass, scores = the metric itself.

    Deviations, stated plainly: the paper's full text was not available here, only its abstract
    and summaries; the per-layer aggregate (mean absolute gradient) and the loss (task
    completion loss) are our reading of "a metric based on gradient magnitudes" and may differ in
    normalisation from the paper. Its stage 2 (a projection compensation of the hidden-state mean
    shift, folded into a down-projection) is `--compensate` (compensation.py): a weight change, not
    a score. `seed` is unused (deterministic).
    """
    _check_batches(batches, need_labels=True)
    num_layers = len(find_layer_stack(model)[1])
    if not iterative:
        return torch.tensor([gradient_magnitude_terms(g) for g in layer_gradients(model, batches)], dtype=torch.float64)
    decisions = num_layers - 1 if max_decisions is None else max(0, min(max_decisions, num_layers - 1))
    removed: list[int] = []
    metric: dict[int, float] = {}
    for _ in range(max(decisions, 1)):
        grads = layer_gradients(model, batches, skip=removed)
        metric = {i: gradient_magnitude_terms(grads[i]) for i in range(num_layers) if i not in removed}
        if len(removed) == decisions:
            break
        victim = min(metric, key=lambda i: (metric[i], i))
        removed.append(victim)
        logger.debug("gradmap decision %d: remove layer %d (mean |grad| %.3e)", len(removed), victim, metric[victim])
    survivors = {i: metric[i] for i in range(num_layers) if i not in removed}
    return ranks_from_removal_order(removed, survivors, num_layers)


def gblm_importance(
    model: nn.Module, batches: Sequence[Batch], *, layers: Sequence[int] | None = None
) -> dict[int, dict[str, torch.Tensor]]:
    """GBLM-Pruner's metric (gblm.gblm_metric) for every linear of decoder layers `layers` (all when
    None): {layer: {linear name within the layer: [out, in] float32 on the CPU}}.

    Each row of each batch is one calibration sample, as in the official code's batch of one: the
    row without its padding goes forward (hooks add the squares of every linear's input) and
    backward on its own mean completion-token loss (the squared per-sample gradient is added).
    Rows with no completion token are skipped. One forward + backward per row.
    """
    from .gblm import gblm_metric
    from .surgery import linear_weights_by_layer

    _check_batches(batches, need_labels=True)
    _, stack = find_layer_stack(model)
    wanted = range(len(stack)) if layers is None else sorted(set(layers))
    linears = {(i, name): mod for i, by_name in linear_weights_by_layer(stack).items() if i in wanted for name, mod in by_name.items()}
    input_sq = {key: torch.zeros(mod.in_features, dtype=torch.float32, device=mod.weight.device) for key, mod in linears.items()}
    grad_sq = {key: torch.zeros_like(mod.weight, dtype=torch.float32) for key, mod in linears.items()}
    weights = [mod.weight for mod in linears.values()]

    def make_hook(key):
        def hook(module, args, output):
            x = args[0].detach()
            input_sq[key] += x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)

        return hook

    handles = [mod.register_forward_hook(make_hook(key)) for key, mod in linears.items()]
    samples = 0
    try:
        with _preserved(model), torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            for batch in batches:
                for r in range(batch["input_ids"].shape[0]):
                    n = int(batch["attention_mask"][r].sum())
                    row = {k: batch[k][r : r + 1, :n] for k in ("input_ids", "attention_mask", "labels")}
                    if not bool((row["labels"][:, 1:] != -100).any()):
                        continue  # no completion token: the row's mean loss is undefined, and it adds no activations either
                    loss = model(**_forward_kwargs(model, row, labels=True), use_cache=False).loss
                    for key, g in zip(linears, torch.autograd.grad(loss, weights, allow_unused=True)):
                        if g is not None:
                            grad_sq[key] += g.float().pow(2)
                    samples += 1
    finally:
        for handle in handles:
            handle.remove()
    if not samples:
        raise DataError("no row of the scoring batches has a completion token to take a gradient of: check the data's completions")
    out: dict[int, dict[str, torch.Tensor]] = {i: {} for i in wanted}
    for (i, name), mod in linears.items():
        out[i][name] = gblm_metric(mod.weight, input_sq[i, name], grad_sq[i, name], samples).cpu()
    return out


def gblm(model: nn.Module, batches: Sequence[Batch], *, seed: int = 0) -> torch.Tensor:
    """GBLM-Pruner (Das, Ma, Shen 2023) as a layer score: the sum over the layer's linears of the
    GBLM metric |W|*||X_j|| + |W|*100*||G_ij||_2 (gblm.py, the official code's `prune_gblm`), from
    per-row gradients and input norms over `batches`. Deterministic (`seed` unused).
    """
    from .gblm import layer_total

    importance = gblm_importance(model, batches)
    return torch.tensor([layer_total(importance[i]) for i in sorted(importance)], dtype=torch.float64)


@torch.no_grad()
def completion_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean completion-token loss over `batches`, every token weighted once."""
    total, tokens = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n:
            total += float(model(**_forward_kwargs(model, batch, labels=True), use_cache=False).loss) * n
            tokens += n
    return total / max(tokens, 1)


@torch.no_grad()
def ppl(model: nn.Module, batches: Sequence[Batch], *, seed: int = 0) -> torch.Tensor:
    """Shortened LLaMA's perplexity criterion: remove each layer alone (identity bypass) and
    measure the completion loss increase over `batches` (the validation rows). One forward pass
    over the batches per layer, plus one for the intact model. Deterministic (`seed` unused).
    Score = loss without the layer − loss with it (log-perplexity increase): higher = more important.
    """
    _check_batches(batches, need_labels=True)
    _, layers = find_layer_stack(model)
    with _preserved(model):
        base = completion_loss(model, batches)
        scores = []
        for i in range(len(layers)):
            with _skipping(layers, [i]):
                scores.append(completion_loss(model, batches) - base)
    return torch.tensor(scores, dtype=torch.float64)


SCORERS: dict[str, Callable[..., torch.Tensor]] = {
    "ppl": ppl,
    "block-influence": block_influence,
    "last-n": last_n,
    "random": random_scores,
    "taylor": taylor,
    "gradmap": gradmap,
    "gblm": gblm,
}
