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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gradprune_deploy.cli_args import validate_fields
from gradprune_deploy.errors import ConfigError, MissingDependencyError, ServingError
from gradprune_deploy.utils import is_available

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
        try:
            import psutil
        except ImportError:
            return [self.pid]
        try:
            root = psutil.Process(self.pid)
            return [self.pid] + [child.pid for child in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


def port_in_use(host: str, port: int) -> bool:
    """True if something listens on (host, port). SO_REUSEADDR as uvicorn sets it, so TIME_WAIT is free."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def _startup_failure(server: VllmServer, what: str) -> ServingError:
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
            raise _startup_failure(server, f"the vLLM server exited with status {code} during start-up")
        if _healthy(server.base_url):
            server.started_s = time.monotonic() - start
            return
        if time.monotonic() - start > timeout_s:
            raise _startup_failure(
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
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except ImportError:
        return Path(f"/proc/{pid}").exists()
    except Exception:  # noqa: BLE001 - NoSuchProcess and friends
        return False


def server_command(
    model_dir: Path, *, served_model_name: str, host: str, port: int, dtype: str, max_model_len: int, extra_args: Sequence[str] = ()
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
        *extra_args,
    ]


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


@contextlib.contextmanager
def start_server(
    model_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    dtype: str = "auto",
    max_model_len: int = 2048,
    kv_cache_gib: int = 2,
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
        from exporters.vllm import vllm_install_hint

        raise MissingDependencyError(vllm_install_hint())
    if check:
        from exporters.vllm import check_vllm_compatible

        check_vllm_compatible(model_dir)
    model_dir = Path(model_dir).expanduser().resolve()
    check_max_model_len(model_dir, max_model_len)
    if port is None:
        port = _free_port(host)
    elif port_in_use(host, port):
        raise ServingError(f"port {port} on {host} is in use: pass another --port (or stop what listens there)")
    name = served_model_name or model_dir.name
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"gradprune-vllm-{port}-", suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    cmd = server_command(
        model_dir, served_model_name=name, host=host, port=port, dtype=dtype, max_model_len=max_model_len, extra_args=extra_args
    )
    logger.info("starting vLLM: %s (log: %s)", " ".join(cmd), log_path)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_server_env(int(kv_cache_gib)),
            start_new_session=True,
            preexec_fn=_die_with_parent_preexec(),
        )
    url_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    server = VllmServer(process, f"http://{url_host}:{port}", name, log_path)
    try:
        _wait_healthy(server, startup_timeout_s)
        logger.info("vLLM server healthy at %s after %.0f s (pid %d)", server.base_url, server.started_s, server.pid)
        yield server
    finally:
        stop_server(server)


# ── CLI ───────────────────────────────────────────────────────────────────────
@dataclass
class ServeConfig:
    """Check a checkpoint is servable, start vLLM's OpenAI-compatible server, stop it on Ctrl-C/SIGTERM."""

    checkpoint: str = field(metadata={"positional": True, "help": "checkpoint directory to serve"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0 exposes it to the network)"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": "vLLM --dtype"})
    max_model_len: int = field(default=2048, metadata={"help": "longest prompt + completion, in tokens"})
    kv_cache_gib: int = field(default=2, metadata={"help": "KV cache GiB on CPU builds (VLLM_CPU_KVCACHE_SPACE)"})
    served_model_name: str | None = field(default=None, metadata={"help": "model name in API requests (default: directory name)"})
    startup_timeout_s: float = field(default=600.0, metadata={"help": "give up if /health has not answered by then"})
    log_file: str | None = field(default=None, metadata={"help": "server log (default: a file in the temp directory)"})

    def __post_init__(self):
        validate_fields(self)
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.max_model_len < 16:
            raise ConfigError(f"--max-model-len must be at least 16, got {self.max_model_len}")
        if self.kv_cache_gib < 1:
            raise ConfigError(f"--kv-cache-gib must be a whole number of GiB, at least 1, got {self.kv_cache_gib}")
        if not self.startup_timeout_s > 0:
            raise ConfigError(f"--startup-timeout-s must be positive, got {self.startup_timeout_s}")
        if not self.host.strip():
            raise ConfigError("--host is empty: give an address to bind, e.g. 127.0.0.1")


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


def serve_from_config(config: ServeConfig) -> str:
    """`gradprune serve`: runs until Ctrl-C or SIGTERM, then stops the server and its children."""
    from exporters.checkpoint import inspect_checkpoint
    from exporters.vllm import check_vllm_compatible
    from gradprune_deploy.data import dir_has_chat_template

    # Everything that reads files or sockets first: a bad input never waits for vLLM to import.
    inspect_checkpoint(config.checkpoint)
    check_max_model_len(config.checkpoint, config.max_model_len)
    if port_in_use(config.host, config.port):
        raise ServingError(f"port {config.port} on {config.host} is in use: pass another --port (or stop what listens there)")
    if config.log_file:
        log_dir = Path(config.log_file).expanduser().resolve().parent
        if not log_dir.is_dir() or not os.access(log_dir, os.W_OK):
            raise ConfigError(f"--log-file {config.log_file}: {log_dir} is not a writable directory")
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
            raise _startup_failure(server, f"the vLLM server exited with status {server.process.returncode} while serving")
    except KeyboardInterrupt:
        return "vLLM server stopped"
    finally:
        signal.signal(signal.SIGTERM, previous)
