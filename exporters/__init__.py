"""Checkpoint → somewhere else: the Hugging Face Hub (hub.py), ONNX (onnx.py), vLLM (vllm.py).

Every exporter starts from a compressed checkpoint directory (a standard Hugging Face directory
plus `gradprune.json`) and checks its result against that checkpoint.
"""
