"""The generated model card, offline: metadata parses back, body degrades without a manifest."""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import ModelCard

from exporters.checkpoint import inspect_checkpoint
from exporters.hub import build_model_card
from exporters.model_card import redact
from gradprune_deploy.errors import ModelLoadError
from tests.exporters.conftest import write_manifest


@pytest.fixture
def ckpt(tmp_path, tiny_llama_dir):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, out)
    return out


def _reparse(card: ModelCard) -> ModelCard:
    return ModelCard(str(card))  # what ModelCard.load does with a downloaded README.md


def test_card_without_manifest(ckpt):
    card = _reparse(build_model_card(ckpt, repo_id="me/plain"))
    info = inspect_checkpoint(ckpt)
    assert card.data.base_model is None and card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "transformers" and "gradprune" in card.data.tags
    assert "no `gradprune.json`" in card.text
    assert "| decoder layers | ? | 6 |" in card.text
    assert f"| parameters | ? | {info.num_parameters / 1e6:.1f}M |" in card.text
    assert "How it was made" not in card.text and "Evaluation" not in card.text


def test_card_with_full_manifest(ckpt):
    write_manifest(ckpt, data={"train": "someone/sst2-prompts"}, merged_into={"3": 2, "5": 4})
    (ckpt / "eval_sst2.json").write_text(json.dumps({"metric": "accuracy", "value": 0.81, "data": "../shared/data/sst2/test.jsonl"}))
    (ckpt / "eval_broken.json").write_text("{not json")
    card = _reparse(build_model_card(ckpt, repo_id="me/pruned"))

    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["someone/sst2-prompts"]
    assert card.data.model_name == "pruned" and card.data.eval_results[0].metric_value == 0.81
    assert "fine-tuned" in card.data.tags
    text = card.text
    assert "with 2 of 8 decoder layers removed" in text
    assert "| 3 | 0.05 | dropped |" in text and "| 4 | 0.6 | kept as 3 |" in text
    assert "Layer 3 was merged into kept layer 2" in text
    assert "| parameters | 3.3M | 3.2M |" in text and "Parameters removed: 3.0%." in text
    assert "| sst2 | accuracy | 0.81 |" in text
    assert '"method": "lora"' in text and "gradprune.json" in text
    assert "![Layer importance" not in text  # no plot file, no broken image


def test_local_paths_never_become_hub_metadata(ckpt, tmp_path):
    write_manifest(ckpt, base_model=str(tmp_path / "some-local-model"), data="../shared/data/pubmedqa/train.jsonl")
    card = _reparse(build_model_card(ckpt, repo_id="me/local"))
    assert card.data.base_model is None and card.data.datasets is None
    assert "some-local-model" in card.text  # still said in the body


def test_partial_manifest_and_bench_json(ckpt):
    (ckpt / "gradprune.json").write_text(json.dumps({"layers_dropped": [1]}))
    (ckpt / "bench").mkdir()
    (ckpt / "bench" / "report.json").write_text(json.dumps({"tokens_per_s_dense": 10.5, "tokens_per_s_pruned": 14.25, "runs": [1, 2]}))
    (ckpt / "bench" / "tpot.png").write_bytes(b"\x89PNG")
    text = _reparse(build_model_card(ckpt, repo_id="me/partial")).text
    assert "Layers dropped (original indices): 1" in text
    assert "| tokens_per_s_pruned | 14.25 |" in text and "runs" not in text
    assert "![tpot](bench/tpot.png)" in text


def test_token_like_strings_are_redacted(ckpt):
    write_manifest(ckpt, command="HF_TOKEN=hf_abcdefghijklmnopqrstuv gradprune compress --token secretvalue")
    text = str(build_model_card(ckpt, repo_id="me/x"))
    assert "hf_abcdefghijklmnopqrstuv" not in text and "secretvalue" not in text
    assert redact("use hf_0123456789abcdef here", "mine") == "use hf_*** here"


def test_card_refuses_a_broken_checkpoint(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    with pytest.raises(ModelLoadError, match=r"num_hidden_layers=5 but the weights disagree \(unexpected layer\(s\) \[5\]\)"):
        build_model_card(ckpt, repo_id="me/x")
