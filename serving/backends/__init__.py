"""The runtimes `gradprune bench` measures, one module each, behind one interface (base.BenchBackend).

    hf.py     transformers, in a worker process per model          (worker.py drives the workers)
    onnx.py   onnxruntime on the ONNX exports, in worker processes
    vllm.py   vLLM's OpenAI server per model, driven by vLLM's own `bench serve` client

To add a backend: a module here with a BenchBackend subclass, and its instance in BACKENDS below
(`--backend`'s choices, the checks, the run and the report all follow from it). A backend that runs
in the worker process also gives serving/bench_worker.py a runner under its name.
"""

from __future__ import annotations

from .base import BenchBackend
from .hf import HfBackend
from .onnx import OnnxBackend
from .vllm import VllmBackend

BACKENDS: dict[str, BenchBackend] = {backend.name: backend for backend in (HfBackend(), OnnxBackend(), VllmBackend())}

__all__ = ["BACKENDS", "BenchBackend"]
