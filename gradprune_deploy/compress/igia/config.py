"""GradPruner's options: the IGIA probe (ProbeConfig) and the same-sign merge (MergeConfig). Torch-free;
CompressConfig inherits both, so their fields stay flat flags and YAML keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...errors import ConfigError
from ...formatting import help_field
from ..scorers.names import MERGING_SCORERS
from ..validation import int_or_word

DEFAULT_MERGE_LAYERS = "1"


@dataclass
class ProbeConfig:
    """The LoRA probe that accumulates IGIA (igia/probe.py): how many informative steps."""

    probe_steps: int | None = help_field(
        None, "informative LoRA steps to collect IGIA over (default: probe_fraction of the fine-tune, at least probe_min_steps)"
    )
    probe_fraction: float = help_field(0.01, "probe length as a fraction of the planned fine-tune steps (the paper's ~1 percent)")
    probe_min_steps: int = help_field(
        8,
        "floor on the probe length (sst2: 2 steps already rank the layers as 100 do, but the merge's per-entry "
        "IGIA from 2 steps ended 6.0 +- 4.0 points lower than from 8; docs/results.md)",
    )

    def validate(self) -> None:
        if self.probe_steps is not None and self.probe_steps < 1:
            raise ConfigError("--probe-steps must be at least 1")
        if not 0 < self.probe_fraction <= 1:
            raise ConfigError("--probe-fraction must be in (0, 1]")
        if self.probe_min_steps < 1:
            raise ConfigError(f"--probe-min-steps must be at least 1, got {self.probe_min_steps}")


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
