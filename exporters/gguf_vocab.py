"""The tokenizer of a GGUF: a byte-level BPE ("gpt2") vocabulary as llama.cpp's converter writes it
(`TextModel._set_vocab_gpt2` / `get_vocab_base` / `get_vocab_base_pre`).

llama.cpp does not run the Hugging Face pre-tokenizer: it picks its own by the name in
`tokenizer.ggml.pre`. The converter finds that name by encoding a fixed text (CHECK_TEXT) and looking
up the SHA-256 of the ids; the same test is run here, against the converter's hashes for the
pre-tokenizers this exporter supports. An unknown tokenizer is refused (a wrong name would make
llama.cpp split text differently from the checkpoint), as the converter refuses it.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import gguf

# convert_hf_to_gguf's `chktxt` (conversion/base.py, get_vocab_base_pre), byte for byte.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
# SHA-256 of str(tokenizer.encode(CHECK_TEXT)) → tokenizer.ggml.pre, from the converter's table. Only the
# tokenizers whose GGUF is checked here: the SmolLM family's. Llama 3's ("llama-bpe",
# 0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5) comes with llama3 RoPE scaling, which
# transformers' GGUF loader does not read back, so those checkpoints are refused before the tokenizer anyway.
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M (SmolLM2 too)
}


def pre_tokenizer_name(tokenizer) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or None when it is not one supported here."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    return PRE_TOKENIZERS.get(digest)


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..vocab_size-1 (get_vocab_base): ids without a token become unused
    `[PAD{i}]` entries; added tokens are CONTROL when special (or `<|...|>`-looking), else USER_DEFINED."""
    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        kind = gguf.TokenType.NORMAL
        if token in added:
            if not decoder[i].normalized:  # llama.cpp assumes added tokens are pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            kind = gguf.TokenType.CONTROL if decoder[i].special or looks_special else gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    return tokens, types


def adds_special(tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) when encoding with special tokens, as the checkpoint's tokenizer does: llama.cpp
    defaults differ by pre-tokenizer, so the GGUF states both explicitly."""
    ids = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id is not None and len(ids) > len(plain) and ids[0] == tokenizer.bos_token_id
    eos = tokenizer.eos_token_id is not None and len(ids) > len(plain) and ids[-1] == tokenizer.eos_token_id
    return bos, eos


def write_vocabulary(writer: gguf.GGUFWriter, tokenizer, checkpoint: Path, *, vocab_size: int, pre: str) -> None:
    """tokenizer.ggml.* : model, pre-tokenizer, tokens, types, merges, special ids, add_bos/eos, chat template."""
    tokens, types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    config = checkpoint / "tokenizer_config.json"
    if config.is_file() and (prefix := json.loads(config.read_text()).get("add_prefix_space")) is not None:
        writer.add_add_space_prefix(prefix)  # LlamaModel.set_vocab
    # merges, bos/eos/unk/pad ids and the chat template, read from the checkpoint's files as the converter does
    special = gguf.SpecialVocab(checkpoint, load_merges=True, n_vocab=vocab_size)
    special.add_special_token["bos"], special.add_special_token["eos"] = adds_special(tokenizer)
    special.add_to_gguf(writer, quiet=True)
