"""`gradprune export gguf`: the real compress output → GGUF → read back by transformers' GGUF loader, the
ledger stage in the copy of gradprune.json, and refusals before any work. setup.sh does not install llama.cpp
(llama-cpp-python ships only as an sdist that compiles llama.cpp), so the read-back every export runs is
transformers'; the llama.cpp round trip at the end runs where llama-cpp-python is installed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from exporters import gguf_validate
from exporters.gguf import GgufExportConfig, export_gguf, write_gguf
from exporters.gguf_layout import GgufTarget, permute_qk
from exporters.gguf_vocab import write_vocabulary
from gradprune_deploy.bundled import MODEL_NAME
from gradprune_deploy.cli import main
from gradprune_deploy.errors import DataError, ExportError
from gradprune_deploy.loading import bundled_gguf_path
from gradprune_deploy.manifest import Manifest
from tests.conftest import SHARED_DATA, tiny_model
from tests.exporters.conftest import edit_manifest


def _cli_export(checkpoint, out, *flags) -> dict:
    assert main(["export", "gguf", str(checkpoint), "--out", str(out), "-q", *flags]) == 0
    return json.loads((Path(out) / "gradprune_gguf.json").read_text())


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    values = {k: f.contents() for k, f in reader.fields.items()}
    return values | {"_tensors": {t.name: t.tensor_type.name for t in reader.tensors}}


@pytest.fixture(scope="module")
def f16_export(compressed_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "f16"
    return out, _cli_export(compressed_dir, out, "--type", "f16")


@pytest.fixture(scope="module")
def q8_export(compressed_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "q8"
    return out, _cli_export(compressed_dir, out, "--type", "q8_0")


def _greedy(model, tokenizer, text: str, n: int = 12) -> list[int]:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_f16_reads_back_as_the_pruned_checkpoint(f16_export, compressed_dir):
    out, record = f16_export
    manifest = Manifest.read(compressed_dir)
    fields = _fields(out / "model-f16.gguf")
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == manifest.num_layers_after == 4
    assert {int(n.split(".")[1]) for n in fields["_tensors"] if n.startswith("blk.")} == {0, 1, 2, 3}
    assert "output.weight" not in fields["_tensors"]  # tied: llama.cpp reuses token_embd
    assert fields["_tensors"]["blk.0.attn_q.weight"] == "F16" and fields["_tensors"]["blk.0.attn_norm.weight"] == "F32"
    assert fields["tokenizer.ggml.pre"] == "smollm" and fields["tokenizer.ggml.model"] == "gpt2"
    # read back by transformers here, independently of the exporter's own check
    source = AutoModelForCausalLM.from_pretrained(compressed_dir, dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="model-f16.gguf")
    assert loaded.config.num_hidden_layers == 4 and loaded.config.num_key_value_heads == source.config.num_key_value_heads
    for text in ("The capital of France is", "1 2 3 4"):
        assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(compressed_dir)(text)["input_ids"]
        assert _greedy(loaded, tokenizer, text) == _greedy(source, tokenizer, text)
    v = record["validation"]
    assert v["greedy_tokens_identical"] and v["greedy_token_agreement"] == 1.0
    assert 0 < v["max_abs_logit_diff"] < gguf_validate.ATOL["f16"]


def test_q8_0_is_quantised_validated_and_in_the_ledger(q8_export, compressed_dir, capsys):
    out, record = q8_export
    types = _fields(out / "model-q8_0.gguf")["_tensors"]
    assert types["token_embd.weight"] == types["blk.3.ffn_down.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    assert record["size_bytes"] == (out / "model-q8_0.gguf").stat().st_size
    assert record["validation"]["max_abs_logit_diff"] < gguf_validate.ATOL["q8_0"]
    assert 0 <= record["validation"]["greedy_token_agreement"] <= 1
    manifest = Manifest.read(out)  # the checkpoint's manifest with the artefact's stage added
    source = Manifest.read(compressed_dir)
    point = manifest.quality.point("gguf-q8_0")
    recovered = source.quality.point("recovered")
    assert point.rows == recovered.rows == source.quality.rows and point.accuracy is not None
    assert abs(point.loss - recovered.loss) < 0.05 * recovered.loss  # q8_0 barely moves the held-out loss
    assert [a.stage for a in manifest.artefacts] == ["gguf-q8_0"] and not source.artefacts
    assert (out / "Modelfile").read_text().splitlines()[1] == "FROM ./model-q8_0.gguf"
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "artefact        gguf-q8_0:" in shown and "  gguf-q8_0 " in shown


def test_checkpoint_without_manifest_exports_q4_0(tiny_llama_dir, tmp_path):
    out = tmp_path / "q4"
    record = _cli_export(tiny_llama_dir, out, "--type", "q4_0")
    types = _fields(out / "model-q4_0.gguf")["_tensors"]
    assert types["blk.0.ffn_up.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    assert record["quality"] is None and record["settings"]["block_count"] == 6
    assert not (out / "gradprune.json").exists()


def test_vocabulary_matches_llama_cpp_converter(smollm2_dir, tokenizer, tmp_path):
    """The bundled SmolLM2 GGUF was written by llama.cpp's own converter: the tokenizer keys written here
    from its (transformers-rebuilt) tokenizer must equal that file's."""
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    write_vocabulary(writer, tokenizer, smollm2_dir, vocab_size=49152, pre="smollm")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    mine, theirs = _fields(path), _fields(bundled_gguf_path(MODEL_NAME))
    keys = [k for k in theirs if k.startswith("tokenizer.") and k != "tokenizer.ggml.add_space_prefix"]
    assert len(keys) == 11 and all(mine[k] == theirs[k] for k in keys), [k for k in keys if mine[k] != theirs[k]]


def test_permutation_is_what_transformers_undoes():
    rng = np.random.default_rng(0)
    for n_head, n_kv in ((4, 4), (4, 2), (9, 3)):
        k = rng.standard_normal((n_kv * 16, 64)).astype(np.float32)
        back = LlamaTensorProcessor()._reverse_permute_weights(permute_qk(k, n_head, n_kv), n_head, n_kv)
        assert np.array_equal(back, k) and not np.array_equal(permute_qk(k, n_head, n_kv), k)


def test_unsupported_checkpoints_are_refused_up_front(tmp_path, tokenizer, capsys):
    """One error line from config.json (or the tokenizer) alone, before any weight is read; nothing written."""
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=49152)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    cases = [(gpt2, "model_type 'gpt2' has no GGUF writer")]
    for name, arch, changes, why in (
        ("mistral", "mistral", {}, "model_type 'mistral' has no GGUF writer"),
        ("rope", "llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "RoPE scaling 'llama3'"),
        ("bias", "llama", {"mlp_bias": True}, "mlp_bias"),
    ):
        tiny_model(arch, num_hidden_layers=2).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **changes}))
        cases.append((tmp_path / name, why))
    capsys.readouterr()  # the saves' progress bars
    for ckpt, why in cases:
        assert main(["export", "gguf", str(ckpt), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "cannot be exported to GGUF" in err[0] and why in err[0], err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_unknown_pre_tokenizer_is_refused(tmp_path, capsys):
    """A byte-level BPE tokenizer llama.cpp has no pre-tokenizer name for (here one trained on the spot)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"])
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    ckpt = tmp_path / "ckpt"
    tiny_model("llama", num_hidden_layers=2, vocab_size=bpe.get_vocab_size()).save_pretrained(ckpt)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(ckpt)
    capsys.readouterr()  # the save's progress bar
    assert main(["export", "gguf", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama.cpp pre-tokenizer is known" in err[0] and not (tmp_path / "out").exists()


def test_existing_output_is_never_clobbered(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["export", "gguf", str(tiny_llama_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
    assert main(["export", "gguf", str(tiny_llama_dir), "--out", str(tmp_path / "x"), "--type", "q4_k"]) == 2
    assert "--type" in capsys.readouterr().err


def test_failed_validation_writes_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(gguf_validate.ATOL, "q8_0", 1e-9)
    with pytest.raises(ExportError, match=r"max \|Δ logits\| .* > atol 1e-09 for q8_0.*nothing was written"):
        export_gguf(GgufExportConfig(str(tiny_llama_dir), out=str(tmp_path / "out")))
    assert list(tmp_path.iterdir()) == []


def test_validation_catches_a_missing_permutation(tmp_path, tokenizer):
    """The same weights written without llama.cpp's Q/K permutation (transformers' loader then un-permutes
    rows that were never permuted, pairing the wrong dimensions for RoPE): validation must refuse it. Random
    attention is near-uniform, where RoPE barely matters, so Q and K are scaled up to make it sharp."""
    model = tiny_model("llama", num_hidden_layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    model.save_pretrained(tmp_path / "sharp")
    tokenizer.save_pretrained(tmp_path / "sharp")
    check = dict(quant="f16", atol=gguf_validate.ATOL["f16"], min_agreement=1.0, new_tokens=8)
    for permute in (True, False):
        path = tmp_path / f"permute-{permute}.gguf"
        write_gguf(path, model, tokenizer, tmp_path / "sharp", target=GgufTarget("llama", permute_qk=permute), pre="smollm", quant="f16")
        if permute:
            assert gguf_validate.validate_gguf(path, model, tokenizer, **check)[0]["greedy_tokens_identical"]
        else:
            with pytest.raises(ExportError, match=r"does not match the checkpoint: max \|Δ logits\|"):
                gguf_validate.validate_gguf(path, model, tokenizer, **check)


def test_ledger_rows_follow_moved_data(compressed_dir, tmp_path):
    moved = tmp_path / "ckpt"
    shutil.copytree(compressed_dir, moved)
    edit_manifest(moved, data__source=str(tmp_path / "gone"), config={**Manifest.read(moved).config, "data": str(tmp_path / "gone")})
    with pytest.raises(DataError, match="--ledger-data"):
        export_gguf(GgufExportConfig(str(moved), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    record = _cli_export(moved, tmp_path / "out", "--ledger-data", str(SHARED_DATA / "sst2"))
    assert record["quality"]["rows"] == Manifest.read(moved).quality.rows


@pytest.mark.slow
def test_llama_cpp_runs_the_export_like_the_checkpoint(f16_export, compressed_dir):
    """llama.cpp itself (llama-cpp-python, an sdist that compiles llama.cpp: not installed by setup.sh, so
    skipped in CI) loads the f16 GGUF with the pruned block count, tokenises the prompts as the checkpoint
    does, and generates the checkpoint's greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out, _ = f16_export
    llm = llama_cpp.Llama(model_path=str(out / "model-f16.gguf"), n_ctx=256, logits_all=True, verbose=False, n_threads=1)
    assert llm.metadata["llama.block_count"] == str(Manifest.read(compressed_dir).num_layers_after)
    model = AutoModelForCausalLM.from_pretrained(compressed_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(compressed_dir)
    for text in gguf_validate.VALIDATION_PROMPTS:
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        tokens = []
        for _ in range(12):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(token)
            llm.eval([token])
        assert tokens == _greedy(model, tokenizer, text), text
