"""Backends that run in worker processes (hf, onnx): two workers (dense, pruned) driven A B A B.

Each model lives in its own `serving.bench_worker` process, so each one's peak RSS is its own.
Both workers stay alive for the whole backend run and receive requests in turn, request by
request (see `interleaved_schedule`); only one runs at a time, so each has the whole machine.
A backend of this kind has a runner class in serving/bench_worker.py (RUNNERS) under its name.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gradprune_deploy.errors import ServingError
from gradprune_deploy.utils import tqdm

if TYPE_CHECKING:
    from ..bench_config import BenchConfig
    from .base import BenchBackend

logger = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Pause before each request so the other worker's OpenMP threads, which spin for a few ms after
# their last parallel region (libgomp's default wait policy), are asleep when this one starts.
SETTLE_S = 0.05


class Worker:
    """One `python -m serving.bench_worker` process and its JSON-lines channel."""

    def __init__(self, label: str, args: list[str], *, log_dir: Path):
        self.label = label
        self.log_path = log_dir / f"worker-{label}.log"
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
            TOKENIZERS_PARALLELISM="false",
        )
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.bench_worker", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=PROJECT_ROOT,
        )
        self.ready: dict[str, Any] = {}

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        self.ready = self._read(timeout)
        return self.ready

    def call(self, request: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def _read(self, timeout: float) -> dict[str, Any]:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise ServingError(
                f"the {self.label} benchmark worker did not answer within {timeout:.0f} s "
                f"(raise --startup-timeout-s if the machine is slow); its log ends: {self._tail(1)}"
            )
        line = self.proc.stdout.readline()
        if not line:
            raise ServingError(f"the {self.label} benchmark worker exited with status {self.proc.wait()}: {self._tail()}")
        message = json.loads(line)
        if "error" in message:
            raise ServingError(f"the {self.label} benchmark worker failed: {message['error']}")
        return message

    def _tail(self, lines: int = 5) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        logger.debug("%s worker log:\n%s", self.label, "\n".join(text[-60:]))
        return " | ".join(text[-lines:]) or "no output"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def per_run_metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    """One run (a pass over the prompts) → medians of the per-request times and the run's tok/s."""
    return {
        "ttft_s": statistics.median(r["ttft_s"] for r in results),
        "tpot_s": statistics.median(r["tpot_s"] for r in results),
        "e2e_s": statistics.median(r["e2e_s"] for r in results),
        "output_tok_s": sum(r["output_tokens"] for r in results) / sum(r["e2e_s"] for r in results),
    }


def interleaved_schedule(*, rounds: int, items: int, models: tuple[str, ...] = ("dense", "pruned")) -> list[tuple[int, int, str]]:
    """(round, item, model) in execution order: every item is run for each model in turn, A B A B …"""
    return [(r, i, m) for r in range(rounds) for i in range(items) for m in models]


def run_worker_backend(
    backend: BenchBackend,
    checkpoints: dict[str, Path],
    prompts: list[list[int]],
    config: BenchConfig,
    *,
    onnx_dirs: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Start both workers, run the interleaved schedule, collect per-run samples."""
    log_dir = Path(tempfile.mkdtemp(prefix=f"gradprune-bench-{backend.name}-"))
    workers: dict[str, Worker] = {}
    try:
        for label, directory in checkpoints.items():
            workers[label] = Worker(label, _worker_args(backend.name, directory, config, onnx_dirs and onnx_dirs[label]), log_dir=log_dir)
        ready = {label: w.wait_ready(config.startup_timeout_s) for label, w in workers.items()}
        by_run, outputs = _run_schedule(backend.name, workers, prompts, config)
        stats = {label: w.call({"op": "stats"}) for label, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(log_dir, ignore_errors=True)  # errors quote the log's last lines: nothing is left in the temp dir
    same = sum(outputs["dense"][i] == outputs["pruned"][i] for i in outputs["dense"])
    return {
        "device": config.device,
        "device_name": torch.cuda.get_device_name(0) if config.device == "cuda" else None,
        "settings": backend.settings(config),
        "samples": {label: _samples(by_run[label], stats[label], config.device) for label in workers},
        "load_s": {label: round(r["load_s"], 2) for label, r in ready.items()},
        "memory": stats,
        "notes": [
            "memory: each model in its own worker process; peak RSS is the process's high-water mark VmHWM (loading included); "
            "'above the runtime' subtracts the RSS after importing the runtime, before loading the model; "
            "'steady' is the RSS after the runs, above that same baseline"
            if config.device == "cpu"
            else "memory: per-model worker process",
            f"greedy outputs identical for {same}/{len(outputs['dense'])} prompts (pruning changes the model; expected to differ)",
        ],
    }


def _worker_args(backend: str, directory: Path, config: BenchConfig, onnx_dir: Path | None) -> list[str]:
    args = ["--backend", backend, "--model", str(directory), "--device", config.device, "--dtype", config.torch_dtype]
    args += ["--threads", str(config.threads)]
    return args + (["--onnx-dir", str(onnx_dir)] if onnx_dir else [])


def _run_schedule(
    backend: str, workers: dict[str, Worker], prompts: list[list[int]], config: BenchConfig
) -> tuple[dict[str, dict[int, list]], dict[str, dict[int, list[int]]]]:
    """Every prompt to each worker in turn, warm-up rounds first: (measured results by label and round,
    the generated token ids by label and prompt)."""
    by_run: dict[str, dict[int, list]] = {label: defaultdict(list) for label in workers}
    outputs: dict[str, dict[int, list[int]]] = {label: {} for label in workers}
    schedule = interleaved_schedule(rounds=config.warmup + config.runs, items=len(prompts), models=tuple(workers))
    for round_, item, label in tqdm(schedule, desc=f"bench {backend}", unit="req"):
        time.sleep(SETTLE_S)
        result = workers[label].call({"op": "generate", "prompt_ids": prompts[item], "output_len": config.output_len})
        if result["output_tokens"] != config.output_len:
            raise ServingError(f"{backend} {label} produced {result['output_tokens']} tokens, not --output-len {config.output_len}")
        outputs[label][item] = result.pop("token_ids")
        if round_ >= config.warmup:
            by_run[label][round_].append(result)
    return by_run, outputs


def _samples(by_run: dict[int, list], stats: dict[str, Any], device: str) -> dict[str, list[float]]:
    """One model's per-run timings and its memory (one value each: a process has one peak)."""
    runs = [per_run_metrics(by_run[r]) for r in sorted(by_run)]
    samples = {k: [run[k] for run in runs] for k in runs[0]}
    if device == "cpu":
        samples["peak_rss_bytes"] = [stats["peak_rss_bytes"]]
        samples["model_rss_bytes"] = [stats["peak_rss_bytes"] - stats["baseline_rss_bytes"]]
        samples["steady_rss_bytes"] = [stats["current_rss_bytes"] - stats["baseline_rss_bytes"]]
    for key in ("cuda_peak_bytes", "gpu_memory_bytes"):
        if stats.get(key) is not None:
            samples[key] = [stats[key]]
    return samples
