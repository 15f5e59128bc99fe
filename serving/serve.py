"""`gradprune serve`: check a checkpoint, start vLLM's OpenAI-compatible server on it, stop it on Ctrl-C/SIGTERM.

The launcher itself (start, health wait, process-group shutdown) is gradprune_deploy.runtime.vllm_server,
which `gradprune eval --backend vllm` and the benchmarks use too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gradprune_deploy.checkpoint import inspect_checkpoint
from gradprune_deploy.config_schema import Range, validate_fields
from gradprune_deploy.data import dir_has_chat_template
from gradprune_deploy.errors import ConfigError
from gradprune_deploy.runtime.vllm_server import (
    check_bind,
    check_max_model_len,
    check_parallel_sizes,
    check_vllm_compatible,
    start_server,
    startup_failure,
)
from gradprune_deploy.utils import check_apart_from_inputs, resolve_path
from gradprune_deploy.verify import verify_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Check a checkpoint is servable, start vLLM's OpenAI-compatible server, stop it on Ctrl-C/SIGTERM."""

    checkpoint: str = field(metadata={"positional": True, "help": "checkpoint directory to serve"})
    port: int = field(default=8000, metadata={"help": "port to listen on", "range": (1, 65535)})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0 exposes it to the network)"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": "vLLM --dtype"})
    max_model_len: int = field(default=2048, metadata={"help": "longest prompt + completion, in tokens", "range": (16, None)})
    kv_cache_gib: int = field(default=2, metadata={"help": "KV cache GiB on CPU builds (VLLM_CPU_KVCACHE_SPACE)", "range": (1, None)})
    tensor_parallel_size: int = field(
        default=1,
        metadata={
            "help": "GPUs the model's layers are split across (vLLM tensor parallel; checked against the visible GPUs)",
            "range": (1, None),
        },
    )
    pipeline_parallel_size: int = field(
        default=1,
        metadata={
            "help": "pipeline stages, one GPU group each (vLLM pipeline parallel; GPUs used = tensor x pipeline size)",
            "range": (1, None),
        },
    )
    served_model_name: str | None = field(default=None, metadata={"help": "model name in API requests (default: directory name)"})
    startup_timeout_s: float = field(
        default=600.0, metadata={"help": "give up if /health has not answered by then", "range": Range(0, None, low_inclusive=False)}
    )
    log_file: str | None = field(default=None, metadata={"help": "server log (default: a file in the temp directory)"})

    def __post_init__(self):
        validate_fields(self)  # types and ranges (metadata["range"]), as for the CLI and a YAML recipe
        if not self.host.strip():
            raise ConfigError("--host is empty: give an address to bind, e.g. 127.0.0.1")


def check_log_file(log_file: str, checkpoint: str) -> None:
    """--log-file is appended to: never a file of the checkpoint (the weights would grow a log), never a
    directory, and in a writable directory."""
    log = resolve_path(log_file, "--log-file")
    check_apart_from_inputs(log, {"checkpoint": checkpoint}, flag="--log-file")
    if log.exists() and not log.is_file():
        raise ConfigError(f"--log-file {log} exists and is not a regular file: choose a file path")
    if not log.parent.is_dir() or not os.access(log.parent, os.W_OK):
        raise ConfigError(f"--log-file {log_file}: {log.parent} is not a writable directory")


def usage_examples(base_url: str, model: str, *, chat: bool) -> str:
    """A ready-to-paste curl command and OpenAI-client snippet for a running server."""
    if chat:
        body = {"model": model, "messages": [{"role": "user", "content": "What is layer pruning?"}], "max_tokens": 64, "temperature": 0}
        call = (
            f'client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "What is layer pruning?"}}], '
            "max_tokens=64).choices[0].message.content"
        )
    else:
        body = {"model": model, "prompt": "Layer pruning is", "max_tokens": 64, "temperature": 0}
        call = f'client.completions.create(model="{model}", prompt="Layer pruning is", max_tokens=64).choices[0].text'
    route = "chat/completions" if chat else "completions"
    return (
        f"curl {base_url}/v1/{route} -H 'Content-Type: application/json' -d '{json.dumps(body)}'\n\n"
        f'python -c \'from openai import OpenAI; client = OpenAI(base_url="{base_url}/v1", api_key="none"); '
        f"print({call})'"
    )


def serve(config: ServeConfig) -> str:
    """`gradprune serve`: runs until Ctrl-C or SIGTERM, then stops the server and its children."""
    # Everything that reads files, devices or sockets first: a bad input never waits for vLLM to import.
    check_parallel_sizes(config.tensor_parallel_size, config.pipeline_parallel_size)
    inspect_checkpoint(config.checkpoint)
    check_max_model_len(config.checkpoint, config.max_model_len)
    check_bind(config.host, config.port)  # an unknown --host and a port in use are told apart
    if config.log_file:
        check_log_file(config.log_file, config.checkpoint)
    verify_checkpoint(config.checkpoint)  # every file whole, every tensor finite, the tokenizer loadable
    report = check_vllm_compatible(config.checkpoint)
    logger.info("%s: %s, %s layers, %s", report["checkpoint"], report["architecture"], report["num_hidden_layers"], report["dtype"])

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with start_server(
            config.checkpoint,
            host=config.host,
            port=config.port,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            kv_cache_gib=config.kv_cache_gib,
            tensor_parallel_size=config.tensor_parallel_size,
            pipeline_parallel_size=config.pipeline_parallel_size,
            startup_timeout_s=config.startup_timeout_s,
            log_path=config.log_file,
            served_model_name=config.served_model_name,
            check=False,
        ) as server:
            examples = usage_examples(server.base_url, server.model, chat=dir_has_chat_template(Path(config.checkpoint)))
            print(
                f"vLLM is serving {server.model} at {server.base_url}/v1 (ready after {server.started_s:.0f} s; "
                f"log: {server.log_path})\n\n{examples}\n\nCtrl-C or SIGTERM stops it.",
                flush=True,
            )
            while server.process.poll() is None:
                time.sleep(1.0)
            raise startup_failure(server, f"the vLLM server exited with status {server.process.returncode} while serving")
    except KeyboardInterrupt:
        return "vLLM server stopped"
    finally:
        signal.signal(signal.SIGTERM, previous)
