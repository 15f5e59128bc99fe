"""GradPruner's options: the IGIA probe (ProbeConfig) and the same-sign merge (MergeConfig). Torch-free;
CompressConfig inherits both, so their fields stay flat flags and YAML keys. The defaults are the paper's;
the official code's two different choices (the layer score's reduction, clipped gradients) are options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...errors import ConfigError
from ...formatting import help_field
from ..scorers.names import IGIA, MERGING_SCORERS
from ..validation import int_or_word

DEFAULT_MERGE_LAYERS = "1"
AUTO_STEPS = "auto"  # --probe-steps auto
DEFAULT_PROBE_MAX_STEPS = 64
DEFAULT_PROBE_TAU = 0.9
DEFAULT_PROBE_PATIENCE = 3


@dataclass
class ProbeConfig:
    """The LoRA probe that accumulates IGIA (igia/probe.py): how long, how a step is scored, and whether
    the gradients are clipped. Defaults follow the paper; the official code's choices are options."""

    probe_steps: int | Literal["auto"] | None = help_field(
        None,
        "informative LoRA steps to collect IGIA over (default: probe_fraction of the fine-tune, at least probe_min_steps); "
        "auto: until the layer ranking has converged (the cut unchanged and Kendall tau-b >= --probe-tau between "
        "successive steps for --probe-patience steps), between --probe-min-steps and --probe-max-steps",
    )
    probe_fraction: float = help_field(0.01, "probe length as a fraction of the planned fine-tune steps (the paper's ~1 percent)")
    probe_min_steps: int = help_field(
        8,
        "floor on the probe length, fixed or auto (sst2: 2 steps already rank the layers as 100 do, but the merge's per-entry "
        "IGIA from 2 steps ended 6.0 +- 4.0 points lower than from 8; docs/results.md)",
    )
    probe_max_steps: int | None = help_field(
        None, f"--probe-steps auto: cap on the probe length (default {DEFAULT_PROBE_MAX_STEPS})", range=(1, None)
    )
    probe_tau: float | None = help_field(
        None,
        f"--probe-steps auto: Kendall tau-b between successive layer-score snapshots must reach this (default {DEFAULT_PROBE_TAU})",
        range=(-1, 1),
    )
    probe_patience: int | None = help_field(
        None,
        f"--probe-steps auto: consecutive stable steps (tau and cut) before the probe stops (default {DEFAULT_PROBE_PATIENCE})",
        range=(1, None),
    )
    igia_reduce: Literal["squared", "norm"] = help_field(
        "squared",
        "how a probe step enters a layer's score: squared = the paper's formula (sum over steps of ||dB dA||_F^2); "
        "norm = the official code (secretflow/ACoLab layer_important.py: sum of ||dB dA||_F). The merge ranks entries "
        "by the summed squared product under both, as the official merge does",
    )
    probe_clip_grad_norm: float | None = help_field(
        None,
        "gradient clipping during the probe: none (default, this project: the gradients read are the loss's own) or a "
        "max norm; 1.0 = the official code, which saves the LoRA gradients after the Trainer's clipping at max_grad_norm 1.0",
        range=(0, None),  # finite; 0 and below are refused in validate()
    )

    @property
    def adaptive_probe(self) -> bool:
        """--probe-steps auto: the probe stops when the layer ranking has converged (igia/convergence.py)."""
        return self.probe_steps == AUTO_STEPS

    def validate(self) -> None:
        self.probe_steps = int_or_word(self.probe_steps, "--probe-steps", (AUTO_STEPS,), minimum=1)
        if not 0 < self.probe_fraction <= 1:
            raise ConfigError("--probe-fraction must be in (0, 1]")
        if self.probe_min_steps < 1:
            raise ConfigError(f"--probe-min-steps must be at least 1, got {self.probe_min_steps}")
        if self.probe_clip_grad_norm is not None and not self.probe_clip_grad_norm > 0:
            raise ConfigError(f"--probe-clip-grad-norm must be positive (or none: no clipping), got {self.probe_clip_grad_norm}")
        self._validate_adaptive()

    def _validate_adaptive(self) -> None:
        """--probe-max-steps, --probe-tau and --probe-patience: only with --probe-steps auto, defaulted there
        (their ranges are checked by validate_fields, from each field's `range`)."""
        given = [flag for flag, value in self._adaptive_options().items() if value is not None]
        if not self.adaptive_probe:
            if given:
                raise ConfigError(f"{', '.join(given)} {_verb(given)} the adaptive probe: add --probe-steps auto, or drop them")
            return
        if self.probe_max_steps is None:
            self.probe_max_steps = max(DEFAULT_PROBE_MAX_STEPS, self.probe_min_steps)
        self.probe_tau = DEFAULT_PROBE_TAU if self.probe_tau is None else self.probe_tau
        self.probe_patience = DEFAULT_PROBE_PATIENCE if self.probe_patience is None else self.probe_patience
        if self.probe_max_steps < self.probe_min_steps:
            raise ConfigError(f"--probe-max-steps {self.probe_max_steps} is below --probe-min-steps {self.probe_min_steps}: raise it")

    def validate_scorers(self, scorers: tuple[str, ...]) -> None:
        """The IGIA probe's variants need a probe: refuse them when no scorer of the run is igia."""
        variants = {
            "--probe-steps auto": self.adaptive_probe,
            f"--igia-reduce {self.igia_reduce}": self.igia_reduce != "squared",
            f"--probe-clip-grad-norm {self.probe_clip_grad_norm}": self.probe_clip_grad_norm is not None,
        }
        given = [flag for flag, on in variants.items() if on]
        if given and IGIA not in scorers:
            raise ConfigError(
                f"{', '.join(given)} {_verb(given)} the IGIA probe, which --scorer {' '.join(scorers)} does not run: drop them"
            )

    def _adaptive_options(self) -> dict:
        return {"--probe-max-steps": self.probe_max_steps, "--probe-tau": self.probe_tau, "--probe-patience": self.probe_patience}


def _verb(flags: list[str]) -> str:
    return "configures" if len(flags) == 1 else "configure"


@dataclass
class MergeConfig:
    """GradPruner's same-sign merge of the highest-scoring dropped layers (igia/merge.py)."""

    merge_layers: str | None = help_field(
        None,
        "how many dropped layers to merge into their preceding kept layer: K, all or "
        "none (the highest-scoring dropped layers; the paper merges 1-3; default "
        f"{DEFAULT_MERGE_LAYERS} with --scorer igia, none otherwise)",
    )
    keep_top_p: float = help_field(0.2, "fraction of each merged linear's entries (top by --merge-criterion) considered for the merge")
    merge_criterion: Literal["igia", "gblm"] = help_field(
        "igia",
        "what ranks a merged linear's entries for the top-p: igia (GradPruner's, from the probe) or gblm "
        "(GBLM-Pruner's |W|*||X|| + |W|*||G||, from --scorer-batches batches on the dense model)",
    )

    def validate_top_p(self) -> None:
        if not 0 < self.keep_top_p <= 1:
            raise ConfigError(f"--keep-top-p must be in (0, 1], got {self.keep_top_p}")

    def validate(self, *, scorer: str) -> None:
        """Normalise --merge-layers (default by `scorer`; 0 = none) and refuse a merge the scorer cannot do."""
        merges_by_igia = scorer in MERGING_SCORERS
        if self.merge_layers is None:
            self.merge_layers = DEFAULT_MERGE_LAYERS if merges_by_igia else "none"
        self.merge_layers = str(int_or_word(str(self.merge_layers).strip().lower(), "--merge-layers", ("all", "none"), minimum=0))
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

    @property
    def merge_count(self) -> int | None:
        """K layers to merge; None = all dropped layers."""
        return None if self.merge_layers == "all" else 0 if self.merge_layers == "none" else int(self.merge_layers)
