"""One model in its own process, driven over JSON lines, so its peak memory is its own.

`python -m serving.bench_worker --backend hf|onnx --model DIR [--onnx-dir DIR] --device cpu|cuda --dtype float32`

The benchmark keeps a dense and a pruned worker alive side by side and sends them requests in
turn (A B A B …); an in-process measurement would mix the two models' memory.

Protocol: the worker prints `{"event": "ready", ...}` once its model is loaded, then answers one
JSON line per request line on stdin:

- `{"op": "generate", "prompt_ids": [...], "output_len": M}` → greedy decoding of exactly M tokens
  (EOS ignored, like vLLM's `ignore_eos`): `{"ttft_s", "tpot_s", "e2e_s", "output_tokens", "token_ids"}`.
  TTFT = prefill + first token; TPOT = (e2e − TTFT) / (M − 1), vLLM's definition.
- `{"op": "stats"}` → `{"peak_rss_bytes", "baseline_rss_bytes", "current_rss_bytes", ...}`: the
  process's high-water RSS (VmHWM, exact, no sampling, loading included), its RSS after
  imports before the model was loaded, and its RSS now (after the runs: the steady state); on
  CUDA also `cuda_peak_bytes` (hf: torch.cuda.max_memory_allocated) or `gpu_memory_bytes` (onnx:
  the process's GPU memory as NVML / nvidia-smi reports it).
- `{"op": "exit"}`.

Errors come back as `{"error": "..."}`. Everything else the libraries print goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from gradprune_deploy.runtime.onnx_runtime import OnnxCausalLM
from gradprune_deploy.utils import optional_import, process_memory


def current_rss_bytes() -> int:
    return process_memory()["rss_bytes"]


def peak_rss_bytes() -> int:
    """This process's own high-water RSS (VmHWM); ru_maxrss only where /proc has none."""
    memory = process_memory()
    return memory["peak_rss_bytes"] if memory else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gpu_memory_of_pid(pid: int) -> int | None:
    """GPU memory used by one process (NVML if installed, else nvidia-smi); None if unknown."""
    try:
        import pynvml  # noqa: PLC0415 - optional (not a dependency): nvidia-smi below otherwise

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory)
    except Exception:  # noqa: BLE001 - NVML missing or unsupported: fall back to nvidia-smi
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except Exception:  # noqa: BLE001
        return None
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            return int(float(fields[1]) * 2**20)  # MiB
    return None


class HfRunner:
    """transformers on CPU or CUDA: prefill then one forward per token with a DynamicCache."""

    @staticmethod
    def import_runtime(threads: int) -> None:
        import torch  # noqa: PLC0415 - only the hf worker loads torch: the onnx worker's baseline RSS is onnxruntime's alone
        import transformers  # noqa: F401, PLC0415 - its import is part of the runtime's footprint, not the model's

        if threads:
            torch.set_num_threads(threads)

    def __init__(self, args: argparse.Namespace):
        import torch  # noqa: PLC0415 - see import_runtime
        from transformers import AutoModelForCausalLM  # noqa: PLC0415 - see import_runtime

        model_dir, device, dtype = args.model, args.device, args.dtype
        self.torch = torch
        self.device = device
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def generate(self, prompt_ids: list[int], output_len: int) -> dict:
        torch = self.torch
        from transformers import DynamicCache  # noqa: PLC0415 - see import_runtime

        ids = torch.tensor([prompt_ids], device=self.device)
        tokens = []
        with torch.inference_mode():
            self._sync()
            start = time.perf_counter()
            out = self.model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))  # .item() waits for the device
            first = time.perf_counter()
            for _ in range(output_len - 1):
                out = self.model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(token))
            end = time.perf_counter()
        return _timing(start, first, end, tokens)

    def stats(self) -> dict:
        if self.device == "cuda":
            return {"cuda_peak_bytes": int(self.torch.cuda.max_memory_allocated())}
        return {}


class OnnxRunner:
    """The exported graph through gradprune_deploy.runtime.onnx_runtime.OnnxCausalLM (prefill, then one decode per token)."""

    @staticmethod
    def import_runtime(threads: int) -> None:
        optional_import("onnxruntime", "onnx")  # no torch in this process: onnxruntime serves alone

    def __init__(self, args: argparse.Namespace):
        self.device = args.device
        self.lm = OnnxCausalLM(args.onnx_dir, provider=args.device, intra_op_threads=args.threads or None)

    def generate(self, prompt_ids: list[int], output_len: int) -> dict:
        ids = np.asarray([prompt_ids], dtype=np.int64)
        start = time.perf_counter()
        logits, state = self.lm.prefill(ids)
        token = logits.argmax(axis=-1)
        tokens = [int(token[0])]
        first = time.perf_counter()
        for _ in range(output_len - 1):
            token = self.lm.decode(token, state).argmax(axis=-1)
            tokens.append(int(token[0]))
        end = time.perf_counter()
        return _timing(start, first, end, tokens)

    def stats(self) -> dict:
        if self.device == "cuda":
            used = gpu_memory_of_pid(os.getpid())
            return {"gpu_memory_bytes": used} if used is not None else {}
        return {}


def _timing(start: float, first: float, end: float, tokens: list[int]) -> dict:
    n = len(tokens)
    return {
        "ttft_s": first - start,
        "tpot_s": (end - first) / (n - 1) if n > 1 else 0.0,
        "e2e_s": end - start,
        "output_tokens": n,
        "token_ids": tokens,
    }


# The in-process runner of each worker-based backend (serving/backends/), by its --backend name.
RUNNERS = {"hf": HfRunner, "onnx": OnnxRunner}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(RUNNERS), required=True)
    parser.add_argument("--model", required=True, help="checkpoint directory (hf)")
    parser.add_argument("--onnx-dir", help="exported ONNX directory (onnx)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: the runtime's default, all cores)")
    return parser.parse_args(argv)


def _answer(runner, request: dict, baseline: int) -> dict:
    """The reply to one request line (None for "exit")."""
    if request["op"] == "generate":
        return runner.generate(request["prompt_ids"], request["output_len"])
    if request["op"] == "stats":
        return {
            "peak_rss_bytes": peak_rss_bytes(),
            "baseline_rss_bytes": baseline,
            "current_rss_bytes": current_rss_bytes(),
            **runner.stats(),
        }
    if request["op"] == "exit":
        return {"event": "bye"}
    return {"error": f"unknown op {request['op']!r}"}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)

    # stdout is the protocol channel: keep a private copy, send everything else to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        channel.write(json.dumps(obj) + "\n")

    try:
        # Import the runtime first: its own footprint is the baseline, not the model's memory.
        runner_cls = RUNNERS[args.backend]
        runner_cls.import_runtime(args.threads)
        baseline = current_rss_bytes()
        start = time.perf_counter()
        runner = runner_cls(args)
        send({"event": "ready", "pid": os.getpid(), "baseline_rss_bytes": baseline, "load_s": time.perf_counter() - start})
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises a ServingError
        send({"error": f"{type(exc).__name__}: {exc}"})
        return 1

    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            send(_answer(runner, request, baseline))
        except Exception as exc:  # noqa: BLE001
            send({"error": f"{type(exc).__name__}: {exc}"})
        if request.get("op") == "exit":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
