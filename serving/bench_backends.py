"""The hf and onnx backends of `gradprune bench`: two worker processes (dense, pruned) driven A B A B.

Each model lives in its own `serving.bench_worker` process, so each one's peak RSS is its own.
Both workers stay alive for the whole backend run and receive requests in turn, request by
request (see `interleaved_schedule`); only one runs at a time, so each has the whole machine.
"""

from __future__ import annotations

import hashlib
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

from gradprune_deploy.errors import ServingError

if TYPE_CHECKING:
    from .bench_config import BenchConfig

logger = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
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


def run_worker_backend(
    backend: str, checkpoints: dict[str, Path], prompts: list[list[int]], config: BenchConfig, *, onnx_dirs: dict[str, Path] | None = None
) -> dict[str, Any]:
    """hf or onnx: start both workers, run the interleaved schedule, collect per-run samples."""
    from .bench_config import interleaved_schedule, settings_of

    log_dir = Path(tempfile.mkdtemp(prefix=f"gradprune-bench-{backend}-"))
    workers: dict[str, Worker] = {}
    try:
        for label, directory in checkpoints.items():
            args = [
                "--backend",
                backend,
                "--model",
                str(directory),
                "--device",
                config.device,
                "--dtype",
                config.torch_dtype,
                "--threads",
                str(config.threads),
            ]
            if onnx_dirs:
                args += ["--onnx-dir", str(onnx_dirs[label])]
            workers[label] = Worker(label, args, log_dir=log_dir)
        ready = {label: w.wait_ready(config.startup_timeout_s) for label, w in workers.items()}
        rounds = config.warmup + config.runs
        by_run: dict[str, dict[int, list]] = {label: defaultdict(list) for label in workers}
        outputs: dict[str, dict[int, list[int]]] = {label: {} for label in workers}
        from gradprune_deploy.utils import tqdm

        schedule = interleaved_schedule(rounds=rounds, items=len(prompts), models=tuple(workers))
        for round_, item, label in tqdm(schedule, desc=f"bench {backend}", unit="req"):
            time.sleep(SETTLE_S)
            result = workers[label].call({"op": "generate", "prompt_ids": prompts[item], "output_len": config.output_len})
            if result["output_tokens"] != config.output_len:
                raise ServingError(f"{backend} {label} produced {result['output_tokens']} tokens, not --output-len {config.output_len}")
            outputs[label][item] = result.pop("token_ids")
            if round_ >= config.warmup:
                by_run[label][round_].append(result)
        stats = {label: w.call({"op": "stats"}) for label, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(log_dir, ignore_errors=True)  # errors quote the log's last lines: nothing is left in the temp dir
    samples: dict[str, dict[str, list[float]]] = {}
    for label in workers:
        runs = [per_run_metrics(by_run[label][r]) for r in sorted(by_run[label])]
        samples[label] = {k: [run[k] for run in runs] for k in runs[0]}
        s = stats[label]
        if config.device == "cpu":
            samples[label]["peak_rss_bytes"] = [s["peak_rss_bytes"]]
            samples[label]["model_rss_bytes"] = [s["peak_rss_bytes"] - s["baseline_rss_bytes"]]
            samples[label]["steady_rss_bytes"] = [s["current_rss_bytes"] - s["baseline_rss_bytes"]]
        for key in ("cuda_peak_bytes", "gpu_memory_bytes"):
            if s.get(key) is not None:
                samples[label][key] = [s[key]]
    same = sum(outputs["dense"][i] == outputs["pruned"][i] for i in outputs["dense"])
    return {
        "device": config.device,
        "device_name": _device_name(config.device),
        "settings": settings_of(config, backend),
        "samples": samples,
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


def _device_name(device: str) -> str | None:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return None


# -- onnx ---------------------------------------------------------------------------------------


def onnx_cache_dir(checkpoint: Path, dtype: str) -> Path:
    """Where an automatic export of this checkpoint lives: keyed by path, weights' size and mtime."""
    from gradprune_deploy.loading import cache_dir

    stamp = [str(checkpoint.resolve()), dtype] + [
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in sorted(checkpoint.glob("*.safetensors")) + [checkpoint / "config.json"]
    ]
    key = hashlib.sha1("\n".join(stamp).encode()).hexdigest()[:16]
    return cache_dir() / "bench-onnx" / f"{checkpoint.name}-{key}"


def ensure_onnx_export(checkpoint: Path, given: str | None, *, dtype: str = "float32") -> tuple[Path, str]:
    """An ONNX export of `checkpoint`: the one given, the cached one, or a fresh export into the cache."""
    if given:
        path = Path(given).expanduser().resolve()
        if not path.is_dir():
            raise ServingError(
                f"ONNX export {path} not found: check --onnx-dense / --onnx-pruned, or leave them out to export automatically"
            )
        return path, "given"
    out = onnx_cache_dir(checkpoint, dtype)
    if (out / "gradprune_onnx.json").is_file() and (out / "model.onnx").is_file():
        return out, "cached"
    from exporters.onnx import export_onnx

    logger.info("exporting %s to ONNX (%s) in %s", checkpoint, dtype, out)
    export_onnx(checkpoint, out, dtype=dtype, overwrite=True)
    return out, "exported"


def run_onnx(checkpoints: dict[str, Path], prompts: list[list[int]], config: BenchConfig) -> dict[str, Any]:
    given = {"dense": config.onnx_dense, "pruned": config.onnx_pruned}
    exports = {label: ensure_onnx_export(directory, given[label], dtype=config.onnx_dtype) for label, directory in checkpoints.items()}
    result = run_worker_backend("onnx", checkpoints, prompts, config, onnx_dirs={k: v[0] for k, v in exports.items()})
    result["onnx_exports"] = {label: {"path": str(path), "origin": origin} for label, (path, origin) in exports.items()}
    return result
