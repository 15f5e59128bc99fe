"""What a llama.cpp GGUF of a checkpoint holds, as pure functions: which architectures can be written,
the hyperparameter keys, the tensor names, llama's Q/K permutation and each tensor's type.

These mirror llama.cpp's own converter (`convert_hf_to_gguf.py`, `conversion/base.py` and
`conversion/llama.py`), so llama.cpp, Ollama and transformers' GGUF loader read the file as one of theirs:

- `general.architecture` is `llama` (Llama-family checkpoints, SmolLM2 among them); `{arch}.block_count` is
  the checkpoint's layer count, i.e. the pruned one. Only what the export can validate is written: Mistral
  (llama.cpp writes it as llama) is refused because transformers' GGUF loader turns a llama file whose
  name holds "mistral" into a model type gguf-py does not know, and Qwen2 because no Qwen2 tokenizer is
  available offline to check its read-back.
- tensor names come from gguf-py's TensorNameMap (`model.layers.3.self_attn.q_proj` → `blk.3.attn_q`);
  a tied LM head is not written (llama.cpp reuses `token_embd`, as the converter does).
- llama.cpp's llama graph applies RoPE to interleaved pairs, Hugging Face's to the two halves of each
  head: the converter permutes the rows of Q and K (`LlamaModel.permute`), and transformers' GGUF
  loader undoes it.
- norms and 1-D tensors stay float32; other weights take the requested type. q4_0 keeps the token
  embedding / LM head at q8_0: llama-quantize keeps that matrix at higher precision too (q6_K, which
  gguf-py cannot write; the bundled SmolLM2 Q4_1 GGUF stores it as q8_0), since every logit goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

# model_type → (GGUF architecture, whether Q/K rows are permuted for llama.cpp's RoPE layout)
ARCHITECTURES = {"llama": ("llama", True)}
QUANT_TYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
_SUPPORTED_TEXT = "Llama-architecture checkpoints such as SmolLM2"


@dataclass(frozen=True)
class GgufTarget:
    """The GGUF a config becomes: llama.cpp architecture name and whether Q/K are permuted."""

    arch: str
    permute_qk: bool


def _rope_type(config: dict) -> str:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope.get("rope_type") or rope.get("type") or "default"


def unsupported_reason(config: dict) -> str | None:
    """Why a config.json cannot be written as a GGUF here, or None. Each refusal is something llama.cpp's
    graph or transformers' GGUF read-back (the export's validation) would not reproduce."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        return f"model_type {model_type!r} has no GGUF writer here (supported: {_SUPPORTED_TEXT})"
    if config.get("quantization_config"):
        return "the checkpoint is already quantised (quantization_config): export its float checkpoint"
    if config.get("hidden_act", "silu") != "silu":
        return f"hidden_act {config.get('hidden_act')!r}: llama.cpp's {model_type} graph uses silu"
    sliding = config.get("use_sliding_window", True) and config.get("sliding_window") is not None
    layer_types = set(config.get("layer_types") or ["full_attention"])
    if sliding or layer_types != {"full_attention"}:
        return (
            f"sliding-window attention (sliding_window={config.get('sliding_window')}, layer types {sorted(layer_types)}): "
            "its GGUF graph and transformers' GGUF loader would attend to the whole context"
        )
    if _rope_type(config) != "default":
        return f"RoPE scaling {_rope_type(config)!r}: transformers' GGUF loader does not read it back, so the export cannot be validated"
    if config.get("attention_bias") or config.get("mlp_bias"):
        return (
            "attention_bias / mlp_bias (e.g. from --compensate): transformers' GGUF loader rebuilds the model "
            "without biases, so the export cannot be validated"
        )
    return None


def target_for(config: dict) -> GgufTarget:
    arch, permute = ARCHITECTURES[config["model_type"]]
    return GgufTarget(arch, permute)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hyperparameters(writer: gguf.GGUFWriter, config, *, file_type: gguf.LlamaFileType) -> None:
    """The `{arch}.*` keys llama.cpp reads, from a transformers config (TextModel.set_gguf_parameters)."""
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if writer.arch == "llama":  # LlamaModel.set_gguf_parameters; transformers reads it back as head_dim
        writer.add_rope_dimension_count(head_dim(config))
    if getattr(config, "head_dim", None) is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def gguf_tensor_name(hf_name: str, name_map: gguf.TensorNameMap) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`; None for a tensor GGUF has no name for."""
    base, dot, suffix = hf_name.rpartition(".")
    mapped = name_map.get_name(base) if suffix in ("weight", "bias") else None
    return f"{mapped}{dot}{suffix}" if mapped else None


def permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: rows of each head from [half 1 | half 2] (Hugging Face's RoPE) to
    interleaved pairs (llama.cpp's). K uses the KV head count."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def tensor_type(gguf_name: str, ndim: int, quant: str) -> gguf.GGMLQuantizationType:
    """The type a tensor is stored as (prepare_tensors in the converter): see the module docstring."""
    if ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    qtype = QUANT_TYPES[quant][0]
    if qtype == gguf.GGMLQuantizationType.Q4_0 and gguf_name.split(".")[0] in ("token_embd", "output"):
        return gguf.GGMLQuantizationType.Q8_0
    return qtype


def encode_tensor(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(bytes to store, their type). A row whose length is not a multiple of the block size cannot be
    block-quantised: it falls back to f16, as in the converter."""
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def gguf_tensors(named_tensors, config, target: GgufTarget, *, quant: str):
    """Yield (GGUF name, stored array, type) for every parameter of the model (a float32 numpy array each).
    A tied LM head is skipped (named_parameters yields the shared tensor once, as the embedding)."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[target.arch.upper()], config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for hf_name, data in named_tensors:
        name = gguf_tensor_name(hf_name, name_map)
        if name is None:
            raise ValueError(f"tensor {hf_name} has no GGUF name for {target.arch}")
        if target.permute_qk and ".attn_q." in name:
            data = permute_qk(data, n_head, n_head)
        elif target.permute_qk and ".attn_k." in name:
            data = permute_qk(data, n_head, n_kv)
        stored, qtype = encode_tensor(data, tensor_type(name, data.ndim, quant))
        yield name, stored, qtype
