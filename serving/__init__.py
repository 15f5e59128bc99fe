"""Run and measure exported checkpoints: vLLM's OpenAI server, an onnxruntime runner, benchmarks."""
