"""Surgery per architecture: pruned logits == the original with those layers skipped; save →
from_pretrained → identical logits, no missing/unexpected keys; config and KV-cache indices."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

from gradprune_deploy.compress.surgery import drop_layers, find_layer_stack, prune_config_dict
from gradprune_deploy.errors import ArchitectureError, ConfigError
from tests.conftest import ARCHITECTURES, tiny_model

DROP = [1, 2, 4]


class SkipLayer(nn.Module):
    """Stands in for a removed decoder layer: returns its input hidden states unchanged."""

    def __init__(self, original):
        super().__init__()
        self.attention_type = getattr(original, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _skipping(model, drop):
    _, layers = find_layer_stack(model)
    for i in drop:
        layers[i] = SkipLayer(layers[i])
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pruned_equals_skipped_and_reloads_identically(arch, tmp_path):
    original = tiny_model(arch, seed=5, vocab_size=512)
    skipped = _skipping(copy.deepcopy(original), DROP)
    pruned = drop_layers(copy.deepcopy(original), DROP)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ref = skipped(ids, use_cache=False).logits
        out = pruned(ids, use_cache=False).logits
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert not torch.allclose(out, original(ids).logits, atol=1e-3)  # the cut really changes the model

    assert pruned.config.num_hidden_layers == 3
    _, layers = find_layer_stack(pruned)
    for new_idx, layer in enumerate(layers):
        assert all(m.layer_idx == new_idx for m in layer.modules() if hasattr(m, "layer_idx"))
    if getattr(original.config, "layer_types", None):
        assert pruned.config.layer_types == [original.config.layer_types[i] for i in (0, 3, 5)]

    pruned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_hidden_layers"] == 3
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids, use_cache=False).logits, out)
        # KV cache indices are consistent: cached greedy decoding == uncached
        greedy_cached = reloaded.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, use_cache=True)
        greedy_plain = reloaded.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(greedy_cached, greedy_plain)


def test_prune_config_dict_rewrites_every_per_layer_field():
    config = {
        "num_hidden_layers": 6,
        "layer_types": list("abcdef"),
        "no_rope_layers": [1, 0, 1, 0, 1, 0],
        "max_window_layers": 3,
        "mlp_only_layers": [0, 2, 5],
        "eos_token_id": [1, 2, 3, 4, 5, 6],
        "hidden_size": 8,
    }
    out = prune_config_dict(config, [0, 2, 5])
    assert out["num_hidden_layers"] == 3
    assert out["layer_types"] == ["a", "c", "f"] and out["no_rope_layers"] == [1, 1, 0]
    assert out["max_window_layers"] == 2 and out["mlp_only_layers"] == [0, 1, 2]
    assert out["eos_token_id"] == [1, 2, 3, 4, 5, 6] and out["hidden_size"] == 8  # not per-layer
    assert config["num_hidden_layers"] == 6  # pure
    with pytest.raises(ConfigError):
        prune_config_dict(config, [])


def test_no_layer_stack_is_a_clear_error():
    class NotALM(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 4})()
            self.blocks_of_something = nn.Sequential(nn.Linear(2, 2))

    with pytest.raises(ArchitectureError, match="no list of 4 decoder layers"):
        find_layer_stack(NotALM())
