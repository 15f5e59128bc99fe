import json
import shutil

import huggingface_hub.constants as constants
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from gradprune_deploy.checkpoint import inspect_checkpoint
from gradprune_deploy.errors import ModelLoadError
from gradprune_deploy.loading import check_weights_cover_model, load_model_and_tokenizer, resolve_source
from tests.conftest import ARCHITECTURES, tiny_model


def test_local_dir_loads(tiny_llama_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_llama_dir)
    assert model.config.num_hidden_layers == 6 and tokenizer.pad_token is not None


def test_cached_hub_id_resolves_offline(tiny_llama_dir, tmp_path, monkeypatch):
    """A Hub id already in the local cache loads with no network (local_files_only)."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_llama_dir, snapshot)
    (tmp_path / "hub" / "models--acme--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_source("acme/tiny-llama").path == snapshot.resolve()
    model, _ = load_model_and_tokenizer("acme/tiny-llama")
    reference, _ = load_model_and_tokenizer(tiny_llama_dir)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids).logits, reference(ids).logits)
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
        resolve_source("acme/not-downloaded")


def test_pickled_weights_refused_unless_allowed(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickled checkpoint
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        resolve_source(tmp_path)
    assert resolve_source(tmp_path, allow_pickle=True).path == tmp_path.resolve()


def test_corrupt_and_incomplete_checkpoints(tmp_path, tiny_llama_dir):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        resolve_source(tmp_path)
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights"):
        resolve_source(tmp_path)


def test_remote_code_needs_the_flag(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "acme-lm", "auto_map": {"AutoConfig": "m.C"}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model_and_tokenizer(tmp_path)


def _save(model, path, *, drop=(), add=None):
    model.save_pretrained(path)
    sd = {k: v for k, v in load_file(path / "model.safetensors").items() if not any(d in k for d in drop)}
    sd.update(add or {})
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_weights_must_cover_the_model(tmp_path):
    """transformers fills gaps with random values and only warns: refuse, naming the keys and the count."""
    check_weights_cover_model(_save(tiny_model("llama", num_hidden_layers=2), tmp_path / "ok"))  # tied lm_head absent: fine
    with pytest.raises(ModelLoadError, match=r"9 missing \(model\.layers\.1\.input_layernorm\.weight, .*, \.\.\.\)"):
        check_weights_cover_model(_save(tiny_model("llama", num_hidden_layers=2), tmp_path / "a", drop=[".layers.1."]))
    with pytest.raises(ModelLoadError, match=r"1 unexpected \(extra\.weight\)"):
        check_weights_cover_model(_save(tiny_model("llama", num_hidden_layers=2), tmp_path / "b", add={"extra.weight": torch.zeros(2)}))
    with pytest.raises(ModelLoadError, match=r"1 with the wrong shape \(model\.norm\.weight \[3\] in the file vs \[64\]"):
        check_weights_cover_model(_save(tiny_model("llama", num_hidden_layers=2), tmp_path / "c", add={"model.norm.weight": torch.ones(3)}))


def test_base_model_checkpoint_without_lm_head(tmp_path):
    """Tied: the bare base model (keys without `model.`) is complete. Untied: no LM head is refused."""
    tied = tiny_model("llama", num_hidden_layers=2)
    tied.model.save_pretrained(tmp_path / "tied")
    check_weights_cover_model(tmp_path / "tied")
    untied = tiny_model("llama", num_hidden_layers=2)
    untied.config.tie_word_embeddings = False
    untied.model.save_pretrained(tmp_path / "untied")
    with pytest.raises(ModelLoadError, match="no LM head"):
        check_weights_cover_model(tmp_path / "untied")
    with pytest.raises(ModelLoadError, match="lm_head.weight"):
        load_model_and_tokenizer(tmp_path / "untied")  # refused before transformers invents a head


def test_every_architecture_and_smollm2_are_complete(tmp_path, smollm2_dir):
    for arch in ARCHITECTURES:
        tiny_model(arch, num_hidden_layers=2, vocab_size=256).save_pretrained(tmp_path / arch)
        check_weights_cover_model(tmp_path / arch)
    check_weights_cover_model(smollm2_dir)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("config.json", b'{"model_type": "llama\xff"}', "config.json is not UTF-8 text"),
        ("config.json", b"[1, 2, 3]", "config.json: expected a JSON object, got a list"),
        ("config.json", b"[" * 100_000, "config.json is nested too deeply|config.json is not valid JSON"),
        ("tokenizer.json", b'{"version": "1.0", "trunc', "tokenizer.json is not valid JSON"),
        ("tokenizer_config.json", b'"a string"', "tokenizer_config.json: expected a JSON object, got a str"),
        ("generation_config.json", b"\xff\xfe", "generation_config.json is not UTF-8 text"),
    ],
)
def test_malformed_json_files_are_one_line_naming_the_file(tmp_path, tiny_llama_dir, name, content, message):
    """Every JSON file transformers or vLLM would parse is checked first: a broken one is a ModelLoadError
    naming it, before anything loads (once a UnicodeDecodeError or AttributeError traceback)."""
    ckpt = shutil.copytree(tiny_llama_dir, tmp_path / "ckpt")
    (ckpt / name).write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        resolve_source(ckpt)
    with pytest.raises(ModelLoadError, match=message):
        inspect_checkpoint(ckpt)  # the exporters' and serve's reader
