"""What a `gradprune bench` backend is: a runtime that serves the dense and the pruned checkpoint
under the same settings and returns per-run samples of each metric (see report.METRICS).

bench.py only talks to this interface: it checks every selected backend before anything heavy
starts, asks each how many prompts it needs, runs it and hands its samples to the report.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # bench_config imports the registry (its --backend choices): no import back at run time
    from ..bench_config import BenchConfig


class BenchBackend(ABC):
    """One runtime of `gradprune bench`. Subclass it in a module of serving/backends/ and add an
    instance to serving/backends/__init__.py's BACKENDS; that is the whole wiring."""

    name: ClassVar[str]  # the --backend value and the report's key
    colour: ClassVar[str] = "#7f7f7f"  # its bars in report.png

    def check_inputs(self, config: BenchConfig) -> None:  # noqa: B027 - optional hook
        """Flags that name this backend's inputs (checked even when it is not run: a typo is a typo)."""

    def check_environment(self, config: BenchConfig) -> None:  # noqa: B027 - optional hook
        """Installed and usable on `config.device`, or one error naming the fix; before anything heavy."""

    def check_lengths(self, config: BenchConfig, total: int) -> None:  # noqa: B027 - optional hook
        """Refuse `total` = input + output tokens if this runtime cannot hold it."""

    def prompts_needed(self, config: BenchConfig) -> int:
        return config.num_prompts

    def dtype(self, config: BenchConfig) -> str:
        """The weights dtype this backend runs (`--dtype auto` resolved)."""
        return config.torch_dtype

    def settings(self, config: BenchConfig) -> dict[str, Any]:
        """What this backend's numbers were measured with (recorded per backend, since reports merge)."""
        return {**common_settings(self, config), "threads": config.threads or os.cpu_count()}

    @abstractmethod
    def run(self, checkpoints: dict[str, Path], prompts: list[list[int]], tokenizer, config: BenchConfig) -> dict[str, Any]:
        """Measure {"dense": dir, "pruned": dir} on `prompts` (token ids, exactly --input-len each);
        return at least {"device", "settings", "samples": {label: {metric: [per-run values]}}, "notes"}."""


def common_settings(backend: BenchBackend, config: BenchConfig) -> dict[str, Any]:
    settings = {k: getattr(config, k) for k in ("input_len", "output_len", "num_prompts", "runs", "warmup", "prompts")}
    settings["dtype"] = backend.dtype(config)
    return settings
