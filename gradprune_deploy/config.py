"""CompressConfig: every option of `gradprune compress`, its CLI flag and its YAML recipe key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .errors import ConfigError

DEFAULT_DROP_RATIO = 0.4
SCORER_NAMES = ("igia", "block-influence", "last-n", "random", "gradmap", "taylor")


def _f(default, help_text, **metadata):
    return field(default=default, metadata={"help": help_text, **metadata})


@dataclass
class CompressConfig:
    """Prune a causal LM with GradPruner: probe (LoRA + IGIA) → drop the least important layers →
    same-sign merge → recovery fine-tune → standard checkpoint + gradprune.json."""

    out: str = _f(None, "output checkpoint directory (written atomically)")
    model: str = _f("bundled:SmolLM2-135M-Instruct", "checkpoint dir, .gguf file, cached Hub id, or bundled:SmolLM2-135M-Instruct")
    data: str = _f("bundled:gsm8k", "prompt/completion .jsonl/.csv, a folder with train.jsonl, a datasets dir, or bundled:gsm8k")
    split: str = _f("train", "split to read when --data is a folder")
    max_examples: Optional[int] = _f(None, "use only the first N rows of the data")
    max_length: int = _f(512, "maximum tokens per example (prompt + completion)")
    # what to drop
    scorer: Literal[SCORER_NAMES] = _f("igia", "layer-importance metric; igia is GradPruner's")
    drop_ratio: Optional[float] = _f(None, f"fraction of layers to drop (default {DEFAULT_DROP_RATIO} if no budget is given)")
    drop_layers: Optional[int] = _f(None, "number of layers to drop")
    target_params: Optional[int] = _f(None, "drop layers until the model has at most this many parameters")
    protect_first: int = _f(0, "never drop the first K layers")
    protect_last: int = _f(0, "never drop the last K layers")
    # probe
    probe_steps: Optional[int] = _f(None, "informative LoRA steps to collect IGIA over (default: probe_fraction of the fine-tune, at least probe_min_steps)")
    probe_fraction: float = _f(0.01, "probe length as a fraction of the planned fine-tune steps (the paper's ~1%)")
    probe_min_steps: int = _f(8, "floor on the probe length")
    scorer_batches: int = _f(8, "batches of data for the non-igia scorers")
    # merge
    merge: Optional[bool] = _f(None, "same-sign merge of dropped layers into kept ones (default: on for igia, off otherwise)")
    keep_top_p: float = _f(0.2, "fraction of each dropped linear's entries (top by IGIA) considered for the merge")
    # fine-tune
    finetune: Literal["lora", "full", "none"] = _f("lora", "recovery fine-tune of the pruned model (LoRA is merged at the end)")
    epochs: float = _f(1.0, "fine-tune epochs (also sets the probe length through --probe-fraction)")
    max_steps: Optional[int] = _f(None, "fine-tune optimizer steps (overrides --epochs)")
    batch_size: int = _f(8, "per-device batch size")
    grad_accum: int = _f(1, "gradient accumulation steps")
    learning_rate: Optional[float] = _f(None, "learning rate (default 2e-4 for LoRA, 2e-5 for full)")
    lora_r: int = _f(8, "LoRA rank (probe and LoRA fine-tune)")
    lora_alpha: int = _f(16, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    warmup_ratio: float = _f(0.03, "warm-up fraction of the fine-tune")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward: far less memory, ~30% more time")
    seed: int = _f(0, "random seed (LoRA init, data order, random scorer)")
    # loading / output
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype to load, train and save in")
    trust_remote_code: bool = _f(False, "allow custom modelling code shipped with the checkpoint")
    allow_pickle: bool = _f(False, "allow pickled .bin weights (they can run arbitrary code)")
    overwrite: bool = _f(False, "replace an existing --out")
    plot: bool = _f(True, "write layer_importance.png")

    def __post_init__(self):
        if not self.out:
            raise ConfigError("--out is required: the directory to write the pruned checkpoint to")
        budgets = [b is not None for b in (self.drop_ratio, self.drop_layers, self.target_params)]
        if sum(budgets) > 1:
            raise ConfigError("give only one of --drop-ratio, --drop-layers, --target-params")
        if sum(budgets) == 0:
            self.drop_ratio = DEFAULT_DROP_RATIO
        if self.drop_ratio is not None and not 0 < self.drop_ratio < 1:
            raise ConfigError(f"--drop-ratio must be between 0 and 1 (exclusive), got {self.drop_ratio}")
        if self.drop_layers is not None and self.drop_layers < 1:
            raise ConfigError(f"--drop-layers must be at least 1, got {self.drop_layers}")
        if self.target_params is not None and self.target_params < 1:
            raise ConfigError("--target-params must be positive")
        if not 0 < self.keep_top_p <= 1:
            raise ConfigError(f"--keep-top-p must be in (0, 1], got {self.keep_top_p}")
        if self.probe_steps is not None and self.probe_steps < 1:
            raise ConfigError("--probe-steps must be at least 1")
        if not 0 < self.probe_fraction <= 1:
            raise ConfigError("--probe-fraction must be in (0, 1]")
        if self.scorer not in SCORER_NAMES:
            raise ConfigError(f"--scorer must be one of {', '.join(SCORER_NAMES)}")
        if self.merge is None:
            self.merge = self.scorer == "igia"
        elif self.merge and self.scorer != "igia":
            raise ConfigError("--merge needs --scorer igia (IGIA picks the entries to merge); pass --no-merge")
        for name in ("batch_size", "grad_accum", "max_length", "lora_r", "scorer_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError("--max-examples must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("--max-steps must be at least 1")
