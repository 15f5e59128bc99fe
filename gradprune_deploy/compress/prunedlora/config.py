"""PrunedLoRA's option: the rank the recovery LoRA starts from (`--finetune prunedlora`). Torch-free;
CompressConfig inherits it, so the field stays a flat flag and YAML key."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ...formatting import help_field


@dataclass
class PrunedLoRAConfig:
    """PrunedLoRA (2025): start the recovery LoRA over-parameterised and prune it to --lora-r."""

    prunedlora_start_rank: int = help_field(64, "--finetune prunedlora: LoRA rank to start from (pruned to --lora-r during the fine-tune)")

    def validate(self, *, finetune: str, lora_r: int) -> None:
        if finetune == "prunedlora" and self.prunedlora_start_rank < lora_r:
            raise ConfigError(
                f"--prunedlora-start-rank ({self.prunedlora_start_rank}) must be at least --lora-r ({lora_r}): it is pruned down to it"
            )
