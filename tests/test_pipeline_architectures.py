"""compress() (probe → scores → merge → surgery) on a tiny random model of every supported architecture."""

import json

import pytest
import torch

from gradprune_deploy.config import CompressConfig
from gradprune_deploy.pipeline import compress
from tests.conftest import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compress_each_architecture(arch, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    tiny_model(arch, seed=2).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    compress(CompressConfig(model=str(src), data="../shared/data/sst2", out=str(out), drop_layers=2, max_examples=24,
                            probe_steps=2, finetune="none", batch_size=4, max_length=96))
    manifest = json.loads((out / "gradprune.json").read_text())
    assert manifest["num_layers_after"] == 4 and manifest["merge"]["merged_entries_total"] > 0
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 2]])).logits).all()
