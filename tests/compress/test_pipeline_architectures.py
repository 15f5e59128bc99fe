"""compress() (probe → scores → merge → surgery) on a tiny random model of every supported architecture."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gradprune_deploy.compress.config import CompressConfig
from gradprune_deploy.compress.pipeline import compress
from tests.conftest import ARCHITECTURES, SHARED_DATA, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compress_each_architecture(arch, tokenizer, tmp_path):
    src = tmp_path / "src"
    tiny_model(arch, seed=2).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    compress(
        CompressConfig(
            model=str(src),
            data=str(SHARED_DATA / "sst2"),
            out=str(out),
            drop_layers=2,
            max_examples=24,
            probe_steps=2,
            finetune="none",
            batch_size=4,
            max_length=96,
        )
    )
    manifest = json.loads((out / "gradprune.json").read_text())
    assert manifest["num_layers_after"] == 4 and manifest["merge"]["merged_entries_total"] > 0
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 2]])).logits).all()


@pytest.mark.parametrize("scorer", ["block-influence", "last-n", "random", "gradmap", "taylor"])
def test_compress_with_each_baseline_scorer(scorer, tiny_llama_dir, tmp_path):
    out = tmp_path / scorer
    compress(
        CompressConfig(
            model=str(tiny_llama_dir),
            data=str(SHARED_DATA / "sst2"),
            out=str(out),
            drop_layers=2,
            max_examples=16,
            scorer=scorer,
            scorer_batches=2,
            finetune="none",
            batch_size=4,
            max_length=96,
        )
    )
    manifest = json.loads((out / "gradprune.json").read_text())
    assert manifest["scorer"] == scorer and not manifest["merge"]["enabled"]
    assert len(manifest["layers_dropped"]) == 2 and manifest["scoring"]["batches"] == 2
    order = sorted(range(6), key=lambda i: (manifest["layer_scores"][i], -i))
    assert manifest["layers_dropped"] == sorted(order[:2])  # the two least important were dropped
    if scorer == "last-n":
        assert manifest["layers_dropped"] == [3, 4]  # deepest blocks, final layer kept
