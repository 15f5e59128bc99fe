"""GradMAP's option: stage 2, the projection compensation (`--compensate`). Torch-free;
CompressConfig inherits it, so its fields stay flat flags and YAML keys. (Stage 1 is `--scorer gradmap`.)"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ...formatting import help_field

DEFAULT_COMPENSATE_RIDGE = 0.05  # = compensation.DEFAULT_RIDGE (kept apart: this module must not import torch)


@dataclass
class CompensationConfig:
    """GradMAP stage 2: correct the pruned layers whose outputs drift most from the dense model."""

    compensate: bool = help_field(
        False,
        "after the cut, correct the pruned layers whose outputs drift most from the dense model (mean shift on "
        "--scorer-batches training batches) with GradMAP's projection compensation, folded into mlp.down_proj; "
        "sets mlp_bias (Llama-family configs only); holds a copy of the dense model meanwhile",
    )
    compensate_layers: int = help_field(1, "--compensate: how many layers to correct, largest mean shift first")
    compensate_ridge: float = help_field(
        DEFAULT_COMPENSATE_RIDGE,
        "--compensate: ridge pulling the projection toward identity, relative to the MLP output variance (large: a mean-shift bias)",
    )

    def validate(self) -> None:
        if self.compensate_layers < 1:
            raise ConfigError(f"--compensate-layers must be at least 1, got {self.compensate_layers}")
        if self.compensate_ridge < 0:
            raise ConfigError(f"--compensate-ridge must be at least 0, got {self.compensate_ridge}")
        if not self.compensate and (self.compensate_layers != 1 or self.compensate_ridge != DEFAULT_COMPENSATE_RIDGE):
            raise ConfigError("--compensate-layers and --compensate-ridge configure the compensation: add --compensate")
