"""The runtimes the compression stage and the tools above it share: vLLM's OpenAI server
(vllm_server.py: launch, health wait, shutdown, compatibility check) and greedy generation with
onnxruntime over an ONNX export (onnx_runtime.py). vLLM and onnxruntime are optional extras,
imported where they are used (utils.optional_import)."""
