"""`gradprune bench`'s settings: the BenchConfig schema (CLI, YAML, API). `--backend`'s choices are the
names in the backend registry (serving/backends/), plus "all".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gradprune_deploy.bundled import DEFAULT_DATA
from gradprune_deploy.config_schema import validate_fields
from gradprune_deploy.errors import ConfigError

from .backends import BACKENDS

DEFAULT_PROMPTS = DEFAULT_DATA
BACKEND_CHOICES = (*BACKENDS, "all")


@dataclass
class BenchConfig:
    """Benchmark a pruned checkpoint against its dense original on hf, onnxruntime and vLLM.

    Examples:
      gradprune bench --dense DENSE --pruned PRUNED --backend hf
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
    input_len: int = field(default=128, metadata={"help": "prompt length in tokens (every prompt is cut to exactly this)"})
    output_len: int = field(default=64, metadata={"help": "tokens generated per request (greedy, EOS ignored)"})
    num_prompts: int = field(default=8, metadata={"help": "prompts per run at concurrency 1"})
    runs: int = field(default=3, metadata={"help": "measured runs per model (min/median/max are over these)"})
    warmup: int = field(default=1, metadata={"help": "unrecorded warm-up runs per model before the measured ones"})
    concurrency: int = field(default=16, metadata={"help": "concurrent clients for the vLLM throughput run"})
    num_requests: int = field(default=200, metadata={"help": "requests per vLLM run at --concurrency"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "weights dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16"}
    )
    out: str | None = field(
        default=None, metadata={"help": "report directory (default: PRUNED/bench, where the Hub model card picks it up)"}
    )
    tolerance: float = field(default=0.05, metadata={"help": "allowed |measured − ideal| for the time-per-output-token ratio check"})
    max_model_len: int = field(default=2048, metadata={"help": "vLLM --max-model-len"})
    kv_cache_gib: int = field(
        default=2,
        metadata={
            "help": "vLLM KV-cache size in whole GiB, the same for both models (CPU: VLLM_CPU_KVCACHE_SPACE; CUDA: --kv-cache-memory-bytes)"
        },
    )
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "vLLM: GPUs each model's layers are split across (tensor parallel; checked against the visible GPUs)"}
    )
    pipeline_parallel_size: int = field(
        default=1, metadata={"help": "vLLM: pipeline stages per model, one GPU group each (GPUs used = tensor x pipeline size)"}
    )
    onnx_dense: str | None = field(default=None, metadata={"help": "an existing ONNX export of --dense (default: export into the cache)"})
    onnx_pruned: str | None = field(default=None, metadata={"help": "an existing ONNX export of --pruned (default: export into the cache)"})
    threads: int = field(default=0, metadata={"help": "CPU threads per model (0: all cores); on a shared machine 1 is steadier"})
    startup_timeout_s: int = field(default=900, metadata={"help": "how long a model server or worker may take to start"})
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
        for flag, value, low in (
            ("--input-len", self.input_len, 1),
            ("--output-len", self.output_len, 2),
            ("--num-prompts", self.num_prompts, 1),
            ("--runs", self.runs, 1),
            ("--warmup", self.warmup, 0),
            ("--threads", self.threads, 0),
            ("--concurrency", self.concurrency, 1),
            ("--num-requests", self.num_requests, 1),
            ("--kv-cache-gib", self.kv_cache_gib, 1),
            ("--startup-timeout-s", self.startup_timeout_s, 1),
            ("--tensor-parallel-size", self.tensor_parallel_size, 1),
            ("--pipeline-parallel-size", self.pipeline_parallel_size, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                why = " (time per output token needs a second token)" if flag == "--output-len" else ""
                raise ConfigError(f"{flag} must be an integer ≥ {low}{why}, got {value!r}")
        if self.tolerance <= 0:
            raise ConfigError(f"--tolerance must be positive, got {self.tolerance}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype {self.dtype!r}: choose auto, float32, bfloat16 or float16")
        if self.backend not in BACKEND_CHOICES:
            raise ConfigError(f"--backend {self.backend!r}: choose {', '.join(BACKENDS)} or all")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r}: choose cpu or cuda")

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(BACKENDS) if self.backend == "all" else (self.backend,)

    @property
    def torch_dtype(self) -> str:
        return ("bfloat16" if self.device == "cuda" else "float32") if self.dtype == "auto" else self.dtype
