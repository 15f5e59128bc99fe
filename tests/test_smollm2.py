"""The real thing on CPU: GradPruner on SmolLM2-135M-Instruct with a slice of ../shared/data/sst2."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradprune_deploy.cli import main
from tests.conftest import SHARED_DATA


@pytest.mark.slow
def test_compress_smollm2_drops_12_of_30_and_reloads(tmp_path):
    out = tmp_path / "smollm2-pruned"
    code = main(
        [
            "compress",
            "--data",
            str(SHARED_DATA / "sst2"),
            "--max-examples",
            "256",
            "--out",
            str(out),
            "--drop-layers",
            "12",
            "--max-steps",
            "12",
            "--probe-steps",
            "4",
            "--batch-size",
            "8",
            "-q",
        ]
    )
    assert code == 0
    manifest = json.loads((out / "gradprune.json").read_text())
    assert manifest["num_layers_before"] == 30 and manifest["num_layers_after"] == 18
    assert len(manifest["layers_dropped"]) == 12 and len(manifest["layer_scores"]) == 30
    assert manifest["base_model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert manifest["merge"]["merged_entries_total"] > 0
    # the paper's merge: by default only the highest-scoring dropped layer, into its preceding kept layer
    assert list(manifest["merge"]["per_layer"]) == list(manifest["merge"]["targets"]) and len(manifest["merge"]["targets"]) == 1
    merged = int(next(iter(manifest["merge"]["targets"])))
    assert merged == max(manifest["layers_dropped"], key=lambda i: manifest["layer_scores"][i])
    assert [p["stage"] for p in manifest["quality"]["points"]] == ["dense", "pruned", "recovered"]
    assert manifest["finetune"]["last_logged_loss"] < manifest["finetune"]["first_logged_loss"]
    assert (out / "layer_importance.png").is_file()

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == 18 and len(model.model.layers) == 18
    assert model.num_parameters() == manifest["params_after"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Review: a gorgeous, witty, seductive movie.\nIs the sentiment of this review positive or negative?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    text = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip(), "the pruned model generated nothing"
