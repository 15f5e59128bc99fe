"""Pure: GBLM-Pruner's weight-importance metric (Das, Ma, Shen 2023, "Beyond Size: How Gradients
Shape Pruning Decisions in Large Language Models"), from statistics over calibration samples.

For a linear with weight W [out, in], over N calibration samples (sequences) n:

    metric[i, j] = |W[i, j]| * sqrt(sum_{n, tokens t} X[n, t, j]^2 / N)  +  |W[i, j]| * sqrt(sum_n (s * G_n[i, j])^2)

with G_n = dL_n/dW the gradient of sample n's own mean loss (one backward pass per sample) and
the gradient scale s = 100. This is what the official code (VILA-Lab/GBLM-Pruner) computes:

- gradient_computation.py, class `gradient_computation.update_gradient`: per calibration
  sequence (batch of one, `loss.backward()`), `gradients_l2 += (grad * scale) ** 2` with
  `--scale 100`; the `__main__` block then takes `sqrt` (the l2 norm over samples of the scaled
  per-sample gradient).
- lib/layerwrapper.py, `WrappedGPT.add_batch`: `scaler_row` = sum over tokens of the input's
  squared column norms divided by the number of sequences seen (Wanda's statistic).
- lib/prune.py, `prune_gblm`: `W_metric = |W| * sqrt(scaler_row) + |W| * |gradients_l2|`, i.e.
  the activation term plus the gradient term with weight 1 (the scale lives in the gradient).

Deviations, stated plainly: the official code stores the gradient norm in float16 (kept in float32
here), computes the activations on the progressively pruned model (here everything comes from the
dense model, which is what is scored), and uses causal-LM loss on every token of C4 sequences (here
the task's completion-token loss, and the activations of every non-padding prompt+completion token).
"""

from __future__ import annotations

import torch

GRADIENT_SCALE = 100.0  # gradient_computation.py `--scale` default


def gblm_metric(
    weight: torch.Tensor, input_sq_sum: torch.Tensor, grad_sq_sum: torch.Tensor, num_samples: int, *, scale: float = GRADIENT_SCALE
) -> torch.Tensor:
    """GBLM-Pruner's metric for one linear, [out, in] float32.

    weight: [out, in]; input_sq_sum: [in], the sum over samples and tokens of the input's squares;
    grad_sq_sum: [out, in], the sum over samples of the squared per-sample gradient (unscaled);
    num_samples: N, the number of calibration samples both sums ran over.
    """
    if num_samples < 1:
        raise ValueError("the GBLM metric needs at least one calibration sample")
    if input_sq_sum.shape != weight.shape[1:] or grad_sq_sum.shape != weight.shape:
        raise ValueError(
            f"shape mismatch: weight {tuple(weight.shape)}, input_sq_sum {tuple(input_sq_sum.shape)}, "
            f"grad_sq_sum {tuple(grad_sq_sum.shape)}"
        )
    magnitude = weight.detach().float().abs()
    activation = torch.sqrt(input_sq_sum.float() / num_samples).reshape(1, -1)
    gradient = scale * torch.sqrt(grad_sq_sum.float())  # == sqrt(sum (scale * g)^2), as the official code accumulates it
    return magnitude * activation + magnitude * gradient


def layer_total(metrics: dict[str, torch.Tensor]) -> float:
    """A layer's score for `--scorer gblm`: the sum of the metric over every entry of its linears (float64).

    GBLM-Pruner ranks weights within a layer and gives no layer aggregate; the sum is the
    first-order estimate of what removing every weight of the layer costs, like `taylor`'s.
    """
    return float(sum(m.double().sum() for m in metrics.values()))
