"""The hf backend: transformers, one forward per token with a KV cache, each model in its own worker
process (serving/bench_worker.py `HfRunner`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import BenchBackend
from .worker import run_worker_backend

if TYPE_CHECKING:
    from ..bench_config import BenchConfig


class HfBackend(BenchBackend):
    name = "hf"
    colour = "#1f77b4"

    def run(self, checkpoints: dict[str, Path], prompts: list[list[int]], tokenizer, config: BenchConfig) -> dict[str, Any]:
        return run_worker_backend(self, checkpoints, prompts[: config.num_prompts], config)
