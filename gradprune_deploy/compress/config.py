"""CompressConfig: every option of `gradprune compress`, its CLI flag and its YAML recipe key.

The same dataclass is the CLI (config_schema.py), the YAML schema and the Python API, so all three
validate the same way, in `__post_init__`, before any model is loaded. It is composed of one small
config per concern, each with help on every field and its own `validate()` (peft's shape):

    SourceConfig, LedgerConfig, CutConfig,           config_parts.py
    RecoveryConfig, FinetuneConfig, RunConfig
    ProbeConfig, MergeConfig                         igia/config.py (GradPruner)
    ScorerConfig                                     scorers/config.py
    CompensationConfig                               gradmap/config.py (GradMAP stage 2)
    PrunedLoRAConfig                                 prunedlora/config.py
    RecipeConfig (--recipe paper)                    recipes.py

It inherits them all, so the fields stay flat (`CompressConfig(data=..., drop_layers=...)`, one
`--flag` each); dataclasses order the fields from the last base to the first, which keeps the
`--help` order. `__post_init__` runs each part's checks, then the checks across parts.
`finetune.train_settings()` is the one place that turns it into the fine-tune settings. Torch-free
(the CLI validates a config before torch loads).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config_schema import validate_fields
from ..errors import ConfigError
from .config_parts import (
    DEFAULT_DROP_RATIO,
    CutConfig,
    FinetuneConfig,
    LedgerConfig,
    RecoveryConfig,
    RunConfig,
    SourceConfig,
)
from .gradmap.config import DEFAULT_COMPENSATE_RIDGE, CompensationConfig
from .igia.config import DEFAULT_MERGE_LAYERS, MergeConfig, ProbeConfig
from .prunedlora.config import PrunedLoRAConfig
from .recipes import RecipeConfig, apply_recipe, remember_given_options
from .scorers.config import ScorerConfig
from .scorers.names import AUTO, AUTO_CANDIDATES, SCORER_NAMES

__all__ = [
    "AUTO_CANDIDATES",
    "DEFAULT_COMPENSATE_RIDGE",
    "DEFAULT_DROP_RATIO",
    "DEFAULT_MERGE_LAYERS",
    "SCORER_NAMES",
    "CompressConfig",
]


@remember_given_options  # which options the caller gave: a --recipe fills only the others
@dataclass
class CompressConfig(
    RecipeConfig,
    RunConfig,
    PrunedLoRAConfig,
    FinetuneConfig,
    RecoveryConfig,
    CompensationConfig,
    MergeConfig,
    ScorerConfig,
    ProbeConfig,
    CutConfig,
    LedgerConfig,
    SourceConfig,
):
    """Prune a causal LM with GradPruner: probe (LoRA + IGIA) → drop the least important layers →
    same-sign merge of a few dropped layers → recovery fine-tune (CE or distillation) → standard
    checkpoint + gradprune.json with the held-out quality before and after."""

    def __post_init__(self):
        apply_recipe(self)  # --recipe: its values for the options not given, then validated like any others
        validate_fields(self)  # types, choices and booleans, as for the CLI and a YAML recipe
        SourceConfig.validate(self)
        CutConfig.validate(self)
        MergeConfig.validate_top_p(self)
        ProbeConfig.validate(self)
        CutConfig.validate_scorer(self)
        ProbeConfig.validate_scorers(self, self.scorers_to_try)
        MergeConfig.validate(self, scorer=self.scorer)
        FinetuneConfig.validate(self)
        ScorerConfig.validate(self)
        LedgerConfig.validate(self)
        CompensationConfig.validate(self)
        RecoveryConfig.validate(self)
        PrunedLoRAConfig.validate(self, finetune=self.finetune, lora_r=self.lora_r)
        RunConfig.validate(self)
        if (self.scorer == AUTO or self.auto_drop) and not self.ledger:
            raise ConfigError("--scorer auto and --drop-layers auto judge cuts on the validation rows: drop --no-ledger")
