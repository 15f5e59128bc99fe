"""`gradprune bench`'s settings: the BenchConfig schema (CLI, YAML, API). `--backend`'s choices are the
names in the backend registry (serving/backends/), plus "all".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from gradprune_deploy.bundled import DEFAULT_DATA
from gradprune_deploy.config_schema import Range, validate_fields
from gradprune_deploy.errors import ConfigError

from .backends import BACKENDS

DEFAULT_PROMPTS = DEFAULT_DATA
BACKEND_CHOICES = (*BACKENDS, "all")


@dataclass
class BenchConfig:
    """Benchmark a pruned checkpoint against its dense original on hf, onnxruntime and vLLM.

    Examples:
      gradprune bench --dense DENSE --pruned PRUNED --backend hf
      gradprune bench --dense DENSE --pruned PRUNED --backend onnx --onnx-quantize int4
      gradprune bench --dense DENSE --pruned PRUNED --backend vllm --concurrency 16 --num-requests 200
      gradprune bench --dense DENSE --pruned PRUNED --backend vllm --device cuda --tensor-parallel-size 2
    """

    dense: str = field(default=None, metadata={"help": "the dense (original) checkpoint directory, or bundled:SmolLM2-135M-Instruct"})
    pruned: str = field(default=None, metadata={"help": "the pruned checkpoint directory (the report goes to PRUNED/bench unless --out)"})
    backend: Literal[BACKEND_CHOICES] = field(default="all", metadata={"help": "runtime(s) to measure"})
    device: Literal["cpu", "cuda"] = field(default="cpu", metadata={"help": "where the models run"})
    prompts: str = field(
        default=DEFAULT_PROMPTS,
        metadata={"help": "prompt text source: .jsonl/.csv with a prompt column, a folder of splits, or bundled:gsm8k"},
    )
    input_len: int = field(
        default=128, metadata={"help": "prompt length in tokens (every prompt is cut to exactly this)", "range": (1, None)}
    )
    output_len: int = field(
        default=64,
        metadata={
            "help": "tokens generated per request (greedy, EOS ignored)",
            "range": Range(2, None, why="time per output token needs a second token"),
        },
    )
    num_prompts: int = field(default=8, metadata={"help": "prompts per run at concurrency 1", "range": (1, None)})
    runs: int = field(default=3, metadata={"help": "measured runs per model (min/median/max are over these)", "range": (1, None)})
    warmup: int = field(default=1, metadata={"help": "unrecorded warm-up runs per model before the measured ones", "range": (0, None)})
    concurrency: int = field(default=16, metadata={"help": "concurrent clients for the vLLM throughput run", "range": (1, None)})
    num_requests: int = field(default=200, metadata={"help": "requests per vLLM run at --concurrency", "range": (1, None)})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "weights dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16"}
    )
    out: str | None = field(
        default=None, metadata={"help": "report directory (default: PRUNED/bench, where the Hub model card picks it up)"}
    )
    tolerance: float = field(
        default=0.05,
        metadata={
            "help": "allowed |measured − ideal| for the time-per-output-token ratio check",
            "range": Range(0, None, low_inclusive=False),
        },
    )
    max_model_len: int = field(default=2048, metadata={"help": "vLLM --max-model-len", "range": (16, None)})
    kv_cache_gib: int = field(
        default=2,
        metadata={
            "help": "vLLM KV-cache size in whole GiB, the same for both models "
            "(CPU: VLLM_CPU_KVCACHE_SPACE; CUDA: --kv-cache-memory-bytes)",
            "range": (1, None),
        },
    )
    tensor_parallel_size: int = field(
        default=1,
        metadata={
            "help": "vLLM: GPUs each model's layers are split across (tensor parallel; checked against the visible GPUs)",
            "range": (1, None),
        },
    )
    pipeline_parallel_size: int = field(
        default=1,
        metadata={"help": "vLLM: pipeline stages per model, one GPU group each (GPUs used = tensor x pipeline size)", "range": (1, None)},
    )
    onnx_dense: str | None = field(default=None, metadata={"help": "an existing ONNX export of --dense (default: export into the cache)"})
    onnx_pruned: str | None = field(default=None, metadata={"help": "an existing ONNX export of --pruned (default: export into the cache)"})
    onnx_quantize: Literal["none", "int4", "int8"] = field(
        default="none",
        metadata={"help": "--backend onnx: also measure --pruned weight-quantised (exported into the cache) beside the float32 pair"},
    )
    onnx_quantized: str | None = field(
        default=None,
        metadata={"help": "an existing `export onnx --quantize` of --pruned for the --onnx-quantize arm (default: export into the cache)"},
    )
    threads: int = field(
        default=0, metadata={"help": "CPU threads per model (0: all cores); on a shared machine 1 is steadier", "range": (0, None)}
    )
    startup_timeout_s: int = field(
        default=900, metadata={"help": "how long a model server or worker may take to start", "range": (1, None)}
    )
    plot: bool = field(default=True, metadata={"help": "write benchmark.png"})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "replace a report in --out that is for another pair, or that already holds results for the backends measured now"
        },
    )

    def __post_init__(self):
        validate_fields(self)
        for flag, value in (("--dense", self.dense), ("--pruned", self.pruned)):
            if not value:
                raise ConfigError(f"{flag} is required: give a checkpoint directory")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype {self.dtype!r}: choose auto, float32, bfloat16 or float16")
        if self.backend not in BACKEND_CHOICES:
            raise ConfigError(f"--backend {self.backend!r}: choose {', '.join(BACKENDS)} or all")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r}: choose cpu or cuda")
        cores = os.cpu_count() or 1
        if self.threads > cores:  # OpenMP allocates per thread: --threads 1e9 crashed the worker out of memory
            raise ConfigError(f"--threads {self.threads} is more than the {cores} cores here: pass {cores} or less (0: all cores)")

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(BACKENDS) if self.backend == "all" else (self.backend,)

    @property
    def torch_dtype(self) -> str:
        return ("bfloat16" if self.device == "cuda" else "float32") if self.dtype == "auto" else self.dtype
