"""ScorerConfig: the options of the baseline scorers (names.py, registry.py). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ...formatting import help_field


@dataclass
class ScorerConfig:
    """How much data the non-igia scorers (and the GBLM merge criterion, and the compensation) read."""

    scorer_batches: int = help_field(8, "batches of data for the non-igia scorers")

    def validate(self) -> None:
        if self.scorer_batches < 1:
            raise ConfigError(f"--scorer-batches must be at least 1, got {self.scorer_batches}")
