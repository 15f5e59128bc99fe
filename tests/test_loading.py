import json
import shutil

import pytest
import torch

from gradprune_deploy.errors import ModelLoadError
from gradprune_deploy.loading import load_model_and_tokenizer, resolve_source


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
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_source("acme/tiny-llama").path == snapshot.resolve()
    model, _ = load_model_and_tokenizer("acme/tiny-llama")
    reference, _ = load_model_and_tokenizer(tiny_llama_dir)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids).logits, reference(ids).logits)
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
        resolve_source("acme/not-downloaded")


def test_pickled_weights_refused_unless_allowed(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

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
