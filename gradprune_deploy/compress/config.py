"""CompressConfig: every option of `gradprune compress`, its CLI flag and its YAML recipe key.

The same dataclass is the CLI (config_schema.py), the YAML schema and the Python API, so all three
validate the same way, in `__post_init__`, before any model is loaded. `train_settings()` is the
one place that turns it into the fine-tune settings (each default lives once, in TrainSettings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config_schema import validate_fields
from ..errors import ConfigError

DEFAULT_DROP_RATIO = 0.4
SCORER_NAMES = ("igia", "block-influence", "last-n", "random", "gradmap", "taylor", "gblm", "ppl", "auto")
AUTO_CANDIDATES = ("igia", "block-influence", "last-n", "ppl")
DEFAULT_MERGE_LAYERS = "1"
DEFAULT_COMPENSATE_RIDGE = 0.05  # = compensation.DEFAULT_RIDGE (kept apart: this module must not import torch)


def _f(default, help_text, **metadata):
    return field(default=default, metadata={"help": help_text, **metadata})


def _int_or_word(value, flag: str, words: tuple[str, ...], *, minimum: int):
    """An int (or its digits as a string), or one of `words`; anything else is a ConfigError."""
    if value is None or (isinstance(value, str) and value in words):
        return value
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())):
        raise ConfigError(f"{flag}: expected an integer{' or ' + ' or '.join(words) if words else ''}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ConfigError(f"{flag}: must be at least {minimum}, got {value}")
    return value


@dataclass
class CompressConfig:
    """Prune a causal LM with GradPruner: probe (LoRA + IGIA) → drop the least important layers →
    same-sign merge of a few dropped layers → recovery fine-tune (CE or distillation) → standard
    checkpoint + gradprune.json with the held-out quality before and after."""

    out: str = _f(None, "output checkpoint directory (written atomically)")
    model: str = _f("bundled:SmolLM2-135M-Instruct", "checkpoint dir, .gguf file, cached Hub id, or bundled:SmolLM2-135M-Instruct")
    data: str = _f("bundled:gsm8k", "prompt/completion .jsonl/.csv, a folder with train.jsonl, a datasets dir, or bundled:gsm8k")
    split: str = _f("train", "split to read when --data is a folder")
    max_examples: int | None = _f(None, "use only the first N training rows")
    max_length: int = _f(512, "maximum tokens per example (prompt + completion)")
    # held-out quality ledger
    ledger: bool = _f(True, "measure held-out quality (dense, pruned, recovered) and record it in gradprune.json")
    validation_split: str | None = _f(
        None, "split to measure quality on (default: the data's validation or test split, else a seeded slice of the training rows)"
    )
    validation_fraction: float = _f(0.1, "fraction of the training rows held out when the data has no validation split")
    validation_rows: int = _f(128, "at most this many validation rows")
    dense_reference: str | None = _f(None, "a dense fine-tuned checkpoint to compare against in the ledger")
    # what to drop
    scorer: Literal[SCORER_NAMES] = _f(
        "igia",
        "layer-importance metric; igia is GradPruner's; ppl removes each layer alone "
        "and measures the validation loss; auto tries several and keeps the best",
    )
    drop_ratio: float | None = _f(None, f"fraction of layers to drop (default {DEFAULT_DROP_RATIO} if no budget is given)")
    drop_layers: str | None = _f(None, "number of layers to drop, or auto (the largest cut within --max-quality-drop)")
    target_params: int | None = _f(None, "drop layers until the model has at most this many parameters")
    max_quality_drop: float | None = _f(
        None,
        "with --drop-layers auto: allowed drop vs the dense model (--quality-metric loss: "
        "relative loss increase, e.g. 0.15; accuracy: points, e.g. 2)",
    )
    quality_metric: Literal["loss", "accuracy"] = _f("loss", "what --max-quality-drop and --scorer auto judge by")
    auto_candidates: list[str] | None = _f(
        None, f"--scorer auto: the scorers whose cuts are compared (default: {' '.join(AUTO_CANDIDATES)})"
    )
    heal_steps: int = _f(
        10,
        "--scorer auto / --drop-layers auto: short LoRA heal of each candidate cut before judging it "
        "(0: judge the raw cut, which mispredicts post-recovery quality)",
    )
    protect_first: int = _f(0, "never drop the first K layers")
    protect_last: int = _f(0, "never drop the last K layers")
    # probe
    probe_steps: int | None = _f(
        None, "informative LoRA steps to collect IGIA over (default: probe_fraction of the fine-tune, at least probe_min_steps)"
    )
    probe_fraction: float = _f(0.01, "probe length as a fraction of the planned fine-tune steps (the paper's ~1 percent)")
    probe_min_steps: int = _f(
        8,
        "floor on the probe length (sst2: 2 steps already rank the layers as 100 do, but the merge's per-entry "
        "IGIA from 2 steps ended 6.0 +- 4.0 points lower than from 8; docs/results.md)",
    )
    scorer_batches: int = _f(8, "batches of data for the non-igia scorers")
    # merge
    merge_layers: str | None = _f(
        None,
        "how many dropped layers to merge into their preceding kept layer: K, all or "
        "none (the highest-scoring dropped layers; the paper merges 1-3; default "
        f"{DEFAULT_MERGE_LAYERS} with --scorer igia, none otherwise)",
    )
    keep_top_p: float = _f(0.2, "fraction of each merged linear's entries (top by --merge-criterion) considered for the merge")
    merge_criterion: Literal["igia", "gblm"] = _f(
        "igia",
        "what ranks a merged linear's entries for the top-p: igia (GradPruner's, from the probe) or gblm "
        "(GBLM-Pruner's |W|*||X|| + |W|*||G||, from --scorer-batches batches on the dense model)",
    )
    # compensation (GradMAP stage 2)
    compensate: bool = _f(
        False,
        "after the cut, correct the pruned layers whose outputs drift most from the dense model (mean shift on "
        "--scorer-batches training batches) with GradMAP's projection compensation, folded into mlp.down_proj; "
        "sets mlp_bias (Llama-family configs only); holds a copy of the dense model meanwhile",
    )
    compensate_layers: int = _f(1, "--compensate: how many layers to correct, largest mean shift first")
    compensate_ridge: float = _f(
        DEFAULT_COMPENSATE_RIDGE,
        "--compensate: ridge pulling the projection toward identity, relative to the MLP output variance (large: a mean-shift bias)",
    )
    # fine-tune
    finetune: Literal["lora", "full", "prunedlora", "none"] = _f(
        "lora",
        "recovery fine-tune of the pruned model (LoRA is merged at the end; prunedlora starts LoRA at "
        "--prunedlora-start-rank and prunes it to --lora-r during the run, PrunedLoRA 2025)",
    )
    distill: bool = _f(False, "recover by logit distillation from the dense model (KL at --distill-temperature mixed with CE)")
    teacher: str | None = _f(None, "distillation teacher checkpoint (default: the dense model before pruning)")
    distill_alpha: float = _f(0.5, "weight of the KL term (1 - alpha on cross-entropy)")
    distill_temperature: float = _f(1.0, "softmax temperature of the KL term")
    distill_top_k: int | None = _f(None, "KL over the teacher's top-k tokens only (less memory)")
    epochs: float = _f(1.0, "fine-tune epochs (also sets the probe length through --probe-fraction)")
    max_steps: int | None = _f(None, "fine-tune optimizer steps (overrides --epochs)")
    batch_size: int = _f(8, "per-device batch size")
    grad_accum: int = _f(1, "gradient accumulation steps")
    learning_rate: float | None = _f(None, "learning rate (default 2e-4 for LoRA, 2e-5 for full)")
    lora_r: int = _f(8, "LoRA rank (probe and LoRA fine-tune)")
    lora_alpha: int = _f(16, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    prunedlora_start_rank: int = _f(64, "--finetune prunedlora: LoRA rank to start from (pruned to --lora-r during the fine-tune)")
    warmup_ratio: float = _f(0.03, "warm-up fraction of the fine-tune")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward: far less memory, ~30 percent more time")
    seed: int = _f(0, "random seed (LoRA init, data order, validation slice, random scorer)")
    # loading / output
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype to load, train and save in")
    trust_remote_code: bool = _f(False, "allow custom modelling code shipped with the checkpoint")
    allow_pickle: bool = _f(False, "allow pickled .bin weights (they can run arbitrary code)")
    overwrite: bool = _f(False, "replace an existing --out")
    plot: bool = _f(True, "write layer_importance.png")

    def __post_init__(self):
        validate_fields(self)  # types, choices and booleans, as for the CLI and a YAML recipe
        if not self.out:
            raise ConfigError("--out is required: the directory to write the pruned checkpoint to")
        self.drop_layers = _int_or_word(self.drop_layers, "--drop-layers", ("auto",), minimum=1)
        budgets = [b is not None for b in (self.drop_ratio, self.drop_layers, self.target_params)]
        if sum(budgets) > 1:
            raise ConfigError("give only one of --drop-ratio, --drop-layers, --target-params")
        if sum(budgets) == 0:
            self.drop_ratio = DEFAULT_DROP_RATIO
        if self.drop_ratio is not None and not 0 < self.drop_ratio < 1:
            raise ConfigError(f"--drop-ratio must be between 0 and 1 (exclusive), got {self.drop_ratio}")
        if self.target_params is not None and self.target_params < 1:
            raise ConfigError("--target-params must be positive")
        if (self.drop_layers == "auto") != (self.max_quality_drop is not None):
            raise ConfigError(
                "--drop-layers auto and --max-quality-drop go together: give both (e.g. --drop-layers auto "
                "--max-quality-drop 0.15) or neither"
            )
        if self.max_quality_drop is not None and self.max_quality_drop <= 0:
            raise ConfigError(f"--max-quality-drop must be positive, got {self.max_quality_drop}")
        if not 0 < self.keep_top_p <= 1:
            raise ConfigError(f"--keep-top-p must be in (0, 1], got {self.keep_top_p}")
        if self.probe_steps is not None and self.probe_steps < 1:
            raise ConfigError("--probe-steps must be at least 1")
        if not 0 < self.probe_fraction <= 1:
            raise ConfigError("--probe-fraction must be in (0, 1]")
        if self.scorer not in SCORER_NAMES:
            raise ConfigError(f"--scorer must be one of {', '.join(SCORER_NAMES)}")
        merges_by_igia = self.scorer in ("igia", "auto")
        if self.merge_layers is None:
            self.merge_layers = DEFAULT_MERGE_LAYERS if merges_by_igia else "none"
        self.merge_layers = str(_int_or_word(str(self.merge_layers).strip().lower(), "--merge-layers", ("all", "none"), minimum=0))
        if self.merge_layers == "0":
            self.merge_layers = "none"
        if self.merge_layers != "none" and not merges_by_igia:
            raise ConfigError(
                f"--merge-layers {self.merge_layers} needs --scorer igia (IGIA picks the entries to merge): pass --merge-layers none"
            )
        if self.merge_criterion != "igia" and self.merge_layers == "none":
            raise ConfigError(
                f"--merge-criterion {self.merge_criterion} ranks the entries of merged layers, but nothing is merged "
                "(--merge-layers none, or a --scorer other than igia): drop --merge-criterion"
            )
        for name in ("batch_size", "grad_accum", "max_length", "lora_r", "scorer_batches", "validation_rows", "probe_min_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.compensate_layers < 1:
            raise ConfigError(f"--compensate-layers must be at least 1, got {self.compensate_layers}")
        if self.compensate_ridge < 0:
            raise ConfigError(f"--compensate-ridge must be at least 0, got {self.compensate_ridge}")
        if not self.compensate and (self.compensate_layers != 1 or self.compensate_ridge != DEFAULT_COMPENSATE_RIDGE):
            raise ConfigError("--compensate-layers and --compensate-ridge configure the compensation: add --compensate")
        if self.heal_steps < 0:
            raise ConfigError(f"--heal-steps must be at least 0, got {self.heal_steps}")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"--validation-fraction must be between 0 and 1 (exclusive), got {self.validation_fraction}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError("--max-examples must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("--max-steps must be at least 1")
        if self.epochs <= 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ConfigError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0 <= self.distill_alpha <= 1:
            raise ConfigError(f"--distill-alpha must be in [0, 1], got {self.distill_alpha}")
        if self.distill_temperature <= 0:
            raise ConfigError(f"--distill-temperature must be positive, got {self.distill_temperature}")
        if self.distill_top_k is not None and self.distill_top_k < 1:
            raise ConfigError(f"--distill-top-k must be at least 1, got {self.distill_top_k}")
        if (self.teacher or self.distill_top_k) and not self.distill:
            raise ConfigError("--teacher and --distill-top-k configure distillation: add --distill")
        if self.finetune == "prunedlora" and self.prunedlora_start_rank < self.lora_r:
            raise ConfigError(
                f"--prunedlora-start-rank ({self.prunedlora_start_rank}) must be at least --lora-r ({self.lora_r}): it is pruned down to it"
            )
        if self.distill and self.finetune == "none":
            raise ConfigError("--distill needs a recovery fine-tune: use --finetune lora, full or prunedlora")
        if self.auto_candidates is not None:
            allowed = [name for name in SCORER_NAMES if name != "auto"]
            bad = [name for name in self.auto_candidates if name not in allowed]
            if bad or not self.auto_candidates:
                raise ConfigError(f"--auto-candidates: choose among {', '.join(allowed)}, got {' '.join(map(str, bad)) or 'nothing'}")
            if self.scorer != "auto":
                raise ConfigError("--auto-candidates is for --scorer auto: add --scorer auto or drop it")
        if self.scorer == "auto" and self.drop_layers == "auto":
            raise ConfigError(
                "--scorer auto picks among cuts of one size: give --drop-layers N with it, or a scorer with --drop-layers auto"
            )
        if (self.scorer == "auto" or self.drop_layers == "auto") and not self.ledger:
            raise ConfigError("--scorer auto and --drop-layers auto judge cuts on the validation rows: drop --no-ledger")
        if (
            self.quality_metric == "accuracy"
            and self.drop_layers == "auto"
            and self.max_quality_drop is not None
            and self.max_quality_drop < 0.5
        ):
            raise ConfigError(
                f"--max-quality-drop {self.max_quality_drop} with --quality-metric accuracy is in points "
                "(e.g. 2 for two points), not a fraction"
            )

    @property
    def merge_count(self) -> int | None:
        """K layers to merge; None = all dropped layers."""
        return None if self.merge_layers == "all" else 0 if self.merge_layers == "none" else int(self.merge_layers)


def train_settings(config: CompressConfig):
    """The fine-tune settings (probe and recovery) a CompressConfig asks for."""
    from .finetune import TrainSettings

    return TrainSettings(
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        learning_rate=config.learning_rate,
        epochs=config.epochs,
        max_steps=config.max_steps,
        warmup_ratio=config.warmup_ratio,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        prunedlora_start_rank=config.prunedlora_start_rank,
        seed=config.seed,
        gradient_checkpointing=config.gradient_checkpointing,
    )
