"""The parts of CompressConfig that belong to no one method: what to compress (SourceConfig), the quality
ledger (LedgerConfig), the cut (CutConfig), the recovery (RecoveryConfig, FinetuneConfig) and the run
(RunConfig). Each is a small dataclass with help on every field and its own `validate()`; the methods'
parts live in their folders (igia/config.py, scorers/config.py, gradmap/config.py, prunedlora/config.py).
Torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..config_schema import Range
from ..errors import ConfigError
from ..formatting import help_field
from .scorers.names import AUTO, AUTO_CANDIDATES, SCORER_NAMES
from .validation import int_or_word, require_at_least_one

DEFAULT_DROP_RATIO = 0.4
# The fine-tune's ranges, checked by validate_fields (CLI, YAML and Python alike); each is finite.
_POSITIVE = Range(0, None, low_inclusive=False)
_FRACTION = Range(0, 1, high_inclusive=False)  # a dropout probability; a warm-up ratio (>= 1 is a step count to transformers)
_SHARD_SIZE = re.compile(r"^(\d+)(GIB|MIB|KIB|GB|MB|KB)$", re.IGNORECASE)  # what save_pretrained's max_shard_size parses


@dataclass
class SourceConfig:
    """The model and data to compress, and where the checkpoint goes."""

    out: str = help_field(None, "output checkpoint directory (written atomically)")
    model: str = help_field("bundled:SmolLM2-135M-Instruct", "checkpoint dir, .gguf file, cached Hub id, or bundled:SmolLM2-135M-Instruct")
    data: str = help_field("bundled:gsm8k", "prompt/completion .jsonl/.csv, a folder with train.jsonl, a datasets dir, or bundled:gsm8k")
    split: str = help_field("train", "split to read when --data is a folder")
    max_examples: int | None = help_field(None, "use only the first N training rows")
    max_length: int = help_field(512, "maximum tokens per example (prompt + completion)")

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("--out is required: the directory to write the pruned checkpoint to")
        require_at_least_one(self, ("max_length",))
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError("--max-examples must be at least 1")


@dataclass
class LedgerConfig:
    """The held-out quality ledger (ledger.py): which rows, how many."""

    ledger: bool = help_field(True, "measure held-out quality (dense, pruned, recovered) and record it in gradprune.json")
    validation_split: str | None = help_field(
        None, "split to measure quality on (default: the data's validation or test split, else a seeded slice of the training rows)"
    )
    validation_fraction: float = help_field(0.1, "fraction of the training rows held out when the data has no validation split")
    validation_rows: int = help_field(128, "at most this many validation rows")
    dense_reference: str | None = help_field(None, "a dense fine-tuned checkpoint to compare against in the ledger")
    ledger_generate: int = help_field(
        16, "greedy-answer the first N validation prompts at every stage: repeated 4-gram rate, distinct-2, exact match (0: off)"
    )
    ledger_new_tokens: int = help_field(48, "tokens generated at most per --ledger-generate answer")

    def validate(self) -> None:
        require_at_least_one(self, ("validation_rows", "ledger_new_tokens"))
        if self.ledger_generate < 0:
            raise ConfigError(f"--ledger-generate must be 0 (off) or more, got {self.ledger_generate}")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"--validation-fraction must be between 0 and 1 (exclusive), got {self.validation_fraction}")


@dataclass
class CutConfig:
    """What to drop: the scorer, the budget (one of ratio, count, parameters, quality) and the protected layers."""

    scorer: Literal[SCORER_NAMES] = help_field(
        "igia",
        "layer-importance metric; igia is GradPruner's; ppl removes each layer alone "
        "and measures the validation loss; auto tries several and keeps the best",
    )
    drop_ratio: float | None = help_field(None, f"fraction of layers to drop (default {DEFAULT_DROP_RATIO} if no budget is given)")
    drop_layers: str | None = help_field(None, "number of layers to drop, or auto (the largest cut within --max-quality-drop)")
    target_params: int | None = help_field(None, "drop layers until the model has at most this many parameters")
    max_quality_drop: float | None = help_field(
        None,
        "with --drop-layers auto: allowed drop vs the dense model (--quality-metric loss: "
        "relative loss increase, e.g. 0.15; accuracy: points, e.g. 2)",
    )
    quality_metric: Literal["loss", "accuracy"] = help_field("loss", "what --max-quality-drop and --scorer auto judge by")
    auto_candidates: list[str] | None = help_field(
        None, f"--scorer auto: the scorers whose cuts are compared (default: {' '.join(AUTO_CANDIDATES)})"
    )
    heal_steps: int = help_field(
        10,
        "--scorer auto / --drop-layers auto: short LoRA heal of each candidate cut before judging it "
        "(0: judge the raw cut, which mispredicts post-recovery quality)",
    )
    protect_first: int = help_field(0, "never drop the first K layers", range=(0, None))
    protect_last: int = help_field(0, "never drop the last K layers", range=(0, None))

    @property
    def auto_drop(self) -> bool:
        """--drop-layers auto: the largest cut within --max-quality-drop (the one place that spells the test)."""
        return self.drop_layers == AUTO

    def validate(self) -> None:
        """Parse --drop-layers, default the budget to --drop-ratio {DEFAULT_DROP_RATIO}, check each budget."""
        self.drop_layers = int_or_word(self.drop_layers, "--drop-layers", (AUTO,), minimum=1)
        budgets = [b is not None for b in (self.drop_ratio, self.drop_layers, self.target_params)]
        if sum(budgets) > 1:
            raise ConfigError("give only one of --drop-ratio, --drop-layers, --target-params")
        if sum(budgets) == 0:
            self.drop_ratio = DEFAULT_DROP_RATIO
        if self.drop_ratio is not None and not 0 < self.drop_ratio < 1:
            raise ConfigError(f"--drop-ratio must be between 0 and 1 (exclusive), got {self.drop_ratio}")
        if self.target_params is not None and self.target_params < 1:
            raise ConfigError("--target-params must be positive")
        if self.auto_drop != (self.max_quality_drop is not None):
            raise ConfigError(
                "--drop-layers auto and --max-quality-drop go together: give both (e.g. --drop-layers auto "
                "--max-quality-drop 0.15) or neither"
            )
        if self.max_quality_drop is not None and self.max_quality_drop <= 0:
            raise ConfigError(f"--max-quality-drop must be positive, got {self.max_quality_drop}")

    def validate_scorer(self) -> None:
        """--scorer, --auto-candidates and --heal-steps, and the quality budget's units."""
        if self.scorer not in SCORER_NAMES:
            raise ConfigError(f"--scorer must be one of {', '.join(SCORER_NAMES)}")
        if self.heal_steps < 0:
            raise ConfigError(f"--heal-steps must be at least 0, got {self.heal_steps}")
        if self.auto_candidates is not None:
            allowed = [name for name in SCORER_NAMES if name != AUTO]
            bad = [name for name in self.auto_candidates if name not in allowed]
            if bad or not self.auto_candidates:
                raise ConfigError(f"--auto-candidates: choose among {', '.join(allowed)}, got {' '.join(map(str, bad)) or 'nothing'}")
            if self.scorer != AUTO:
                raise ConfigError("--auto-candidates is for --scorer auto: add --scorer auto or drop it")
        if self.scorer == AUTO and self.auto_drop:
            raise ConfigError(
                "--scorer auto picks among cuts of one size: give --drop-layers N with it, or a scorer with --drop-layers auto"
            )
        if self.quality_metric == "accuracy" and self.auto_drop and self.max_quality_drop is not None and self.max_quality_drop < 0.5:
            raise ConfigError(
                f"--max-quality-drop {self.max_quality_drop} with --quality-metric accuracy is in points "
                "(e.g. 2 for two points), not a fraction"
            )

    @property
    def scorers_to_try(self) -> tuple[str, ...]:
        """The scorers whose cuts are compared: --auto-candidates (or AUTO_CANDIDATES) with --scorer auto, else --scorer."""
        return tuple(self.auto_candidates or AUTO_CANDIDATES) if self.scorer == AUTO else (self.scorer,)


@dataclass
class RecoveryConfig:
    """How the pruned model recovers: the fine-tune mode, and distillation from a teacher (distill.py)."""

    finetune: Literal["lora", "full", "prunedlora", "none"] = help_field(
        "lora",
        "recovery fine-tune of the pruned model (LoRA is merged at the end; prunedlora starts LoRA at "
        "--prunedlora-start-rank and prunes it to --lora-r during the run, PrunedLoRA 2025)",
    )
    distill: bool = help_field(False, "recover by logit distillation from the dense model (KL at --distill-temperature mixed with CE)")
    teacher: str | None = help_field(None, "distillation teacher checkpoint (default: the dense model before pruning)")
    distill_alpha: float = help_field(0.5, "weight of the KL term (1 - alpha on cross-entropy)", range=(0, 1))
    distill_temperature: float = help_field(1.0, "softmax temperature of the KL term", range=_POSITIVE)
    distill_top_k: int | None = help_field(None, "KL over the teacher's top-k tokens only (less memory)")
    teacher_dtype: Literal["same", "bfloat16", "float16"] = help_field(
        "same",
        "dtype of the distillation teacher (same: --dtype); bfloat16 or float16 halve a float32 teacher's memory, "
        "at the price of slightly less exact teacher logits",
    )
    teacher_device: Literal["same", "cpu"] = help_field(
        "same",
        "where the distillation teacher runs (same: beside the student); cpu moves its weights off the GPU, at the "
        "price of a device transfer per batch (inputs to the CPU, logits back) and a CPU forward pass",
    )
    mix_data: str | None = help_field(
        None,
        "general prompt/completion rows mixed into the recovery (any --data source, e.g. bundled:gsm8k); a tenth of them "
        "(at most --validation-rows) are held out and scored in the ledger as the general validation set",
    )
    mix_ratio: float = help_field(
        0.25, "fraction of the recovery rows that come from --mix-data (0: train on none, only score the general rows)"
    )
    mix_completions: Literal["data", "dense"] = help_field(
        "data", "train on --mix-data's own completions, or on the dense model's greedy answers to its prompts (self-data distillation)"
    )
    mix_new_tokens: int = help_field(128, "--mix-completions dense: tokens generated at most per answer")

    def validate(self) -> None:
        if self.distill_top_k is not None and self.distill_top_k < 1:
            raise ConfigError(f"--distill-top-k must be at least 1, got {self.distill_top_k}")
        if (self.teacher or self.distill_top_k) and not self.distill:
            raise ConfigError("--teacher and --distill-top-k configure distillation: add --distill")
        if (self.teacher_dtype != "same" or self.teacher_device != "same") and not self.distill:
            raise ConfigError("--teacher-dtype and --teacher-device configure the distillation teacher: add --distill")
        if self.distill and self.finetune == "none":
            raise ConfigError("--distill needs a recovery fine-tune: use --finetune lora, full or prunedlora")
        self.validate_mix()

    def validate_mix(self) -> None:
        if not 0 <= self.mix_ratio < 1:
            raise ConfigError(f"--mix-ratio must be at least 0 and below 1, got {self.mix_ratio}")
        if self.mix_new_tokens < 1:
            raise ConfigError(f"--mix-new-tokens must be at least 1, got {self.mix_new_tokens}")
        if self.mix_data is None:
            return
        if self.finetune == "none":
            raise ConfigError("--mix-data mixes rows into the recovery fine-tune: use --finetune lora, full or prunedlora")
        if not self.mix_data.strip():
            raise ConfigError("--mix-data is empty: give a prompt/completion source, e.g. bundled:gsm8k")


@dataclass
class FinetuneConfig:
    """The fine-tune's length, batch, learning rate and LoRA (the probe and the recovery share them)."""

    epochs: float = help_field(1.0, "fine-tune epochs (also sets the probe length through --probe-fraction)", range=_POSITIVE)
    max_steps: int | None = help_field(None, "fine-tune optimizer steps (overrides --epochs)")
    batch_size: int = help_field(8, "per-device batch size")
    grad_accum: int = help_field(1, "gradient accumulation steps")
    learning_rate: float | None = help_field(None, "learning rate (default 2e-4 for LoRA, 2e-5 for full)", range=_POSITIVE)
    lora_r: int = help_field(8, "LoRA rank (probe and LoRA fine-tune)")
    lora_alpha: int = help_field(16, "LoRA alpha (the update is scaled by alpha / r; 0 would train nothing)", range=(1, None))
    lora_dropout: float = help_field(0.05, "LoRA dropout probability", range=_FRACTION)

    def validate(self) -> None:
        require_at_least_one(self, ("batch_size", "grad_accum", "lora_r"))
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("--max-steps must be at least 1")


@dataclass
class RunConfig:
    """The rest of the run: warm-up, memory, seed, and how the model is loaded and written."""

    warmup_ratio: float = help_field(
        0.03, "warm-up fraction of the fine-tune (below 1: transformers reads 1 or more as a number of steps)", range=_FRACTION
    )
    gradient_checkpointing: bool = help_field(False, "recompute activations in backward: far less memory, ~30 percent more time")
    seed: int = help_field(0, "random seed (LoRA init, data order, validation slice, random scorer)", range=(0, 2**32 - 1))
    # loading / output
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = help_field(
        "float32", "dtype to load, train and save in (auto: the checkpoint's torch_dtype in config.json; float32 for GGUF)"
    )
    max_shard_size: str = help_field(
        "5GB", "largest safetensors file of the saved checkpoint (e.g. 5GB, 500MB, 2GiB); larger models save sharded, with an index"
    )
    trust_remote_code: bool = help_field(False, "allow custom modelling code shipped with the checkpoint")
    allow_pickle: bool = help_field(False, "allow pickled .bin weights (they can run arbitrary code)")
    overwrite: bool = help_field(False, "replace an existing --out")
    plot: bool = help_field(True, "write layer_importance.png")

    def validate(self) -> None:
        size = _SHARD_SIZE.match(self.max_shard_size)
        if not size or int(size.group(1)) < 1:
            raise ConfigError(
                f"--max-shard-size: expected a positive integer and a unit (e.g. 5GB, 500MB, 2GiB), got {self.max_shard_size!r}"
            )
