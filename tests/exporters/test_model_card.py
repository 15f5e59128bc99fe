"""The generated model card, offline, for a checkpoint made by the real `gradprune compress`.

Metadata parses back as the Hub reads it; the body shows what the manifest records (merges, data,
the held-out quality ledger, parameter counts) and degrades to the weights alone without one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from exporters.card_artefacts import RUN_SNIPPETS
from exporters.hub import build_model_card
from exporters.model_card import redact
from exporters.onnx import OnnxExportConfig, export_onnx
from gradprune_deploy.artefacts import with_artefact
from gradprune_deploy.checkpoint import inspect_checkpoint
from gradprune_deploy.errors import GradPruneError, ModelLoadError
from gradprune_deploy.formatting import fmt
from gradprune_deploy.manifest import SCHEMA_VERSION, ArtefactRecord, Manifest
from gradprune_deploy.utils import is_available
from tests.conftest import SHARED_DATA
from tests.exporters.conftest import edit_manifest


@pytest.fixture
def ckpt(tmp_path, compressed_dir):
    out = tmp_path / "ckpt"
    shutil.copytree(compressed_dir, out)
    return out


@pytest.fixture
def plain_ckpt(tmp_path, tiny_llama_dir):
    out = tmp_path / "plain"
    shutil.copytree(tiny_llama_dir, out)
    return out


def _reparse(card: ModelCard) -> ModelCard:
    return ModelCard(str(card))  # what ModelCard.load does with a downloaded README.md


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def test_card_without_manifest(plain_ckpt):
    card = _reparse(build_model_card(plain_ckpt, repo_id="me/plain"))
    info = inspect_checkpoint(plain_ckpt)
    assert info.manifest is None
    assert card.data.base_model is None and card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "transformers" and "gradprune" in card.data.tags
    assert "no `gradprune.json`" in card.text
    assert "| decoder layers | ? | 6 |" in card.text
    assert f"| parameters | ? | {_params(info.num_parameters)} |" in card.text
    assert "How it was made" not in card.text and "Evaluation" not in card.text and "Held-out quality" not in card.text


def test_card_of_a_real_compress_output(ckpt):
    m = Manifest.read(ckpt)
    info = inspect_checkpoint(ckpt)
    assert isinstance(info.manifest, Manifest) and info.manifest == m
    card = _reparse(build_model_card(ckpt, repo_id="me/pruned"))
    text = card.text

    # What was removed, and what the one merged layer went into (--merge-layers 1 of 2 dropped).
    assert len(m.layers_dropped) == 2 and len(m.merge.targets) == 1 and m.merge.enabled
    assert f"with 2 of {m.num_layers_before} decoder layers removed" in text
    assert f"Layers dropped (original indices): {', '.join(map(str, m.layers_dropped))}" in text
    [(src, dst)] = m.merge.targets.items()
    assert f"- Layer {src} was merged into kept layer {dst} (top 20% by IGIA, same sign) before it was removed" in text
    [unmerged] = [d for d in m.layers_dropped if str(d) not in m.merge.targets]
    assert f"- Layer {unmerged} was removed outright, without a merge (`--merge-layers 1`)" in text
    assert f"The merge added {m.merge.merged_entries_total:,} weights" in text and m.merge.merged_entries_total > 0
    for layer in m.layers_dropped:
        assert f"| {layer} | {m.layer_scores[layer]:.4g} | dropped |" in text
    assert "![Layer importance" in text  # compress wrote the plot

    # Parameter counts: the manifest's, which match the weights actually saved.
    assert m.params_after == info.num_parameters < m.params_before
    assert f"| decoder layers | {m.num_layers_before} | {m.num_layers_after} |" in text
    assert f"| parameters | {_params(m.params_before)} | {_params(m.params_after)} |" in text
    assert f"Parameters removed: {100 * (1 - m.params_after / m.params_before):.1f}% ({m.params_before:,} → {m.params_after:,})." in text

    # Data: a local folder is named by its folder name, never by a path of this machine.
    assert card.data.datasets is None and card.data.base_model is None
    assert f"Trained on `sst2` (a local dataset), split `train`: {m.data.examples} rows" in text
    assert f"Validation: {m.data.validation_rows} held-out rows" in text
    assert str(SHARED_DATA) not in str(card) and m.base_model not in str(card)
    assert f"`{Path(m.base_model).name}` with 2 of" in text  # the local base model, by its folder name

    # The held-out quality ledger: a row per stage, the checkpoint's own row marked, and model-index results.
    assert [p.stage for p in m.quality.points] == ["dense", "pruned", "recovered"] and not m.quality.warning
    for p in m.quality.points:
        marked = f"**{p.stage}** (this checkpoint)" if p.stage == "recovered" else p.stage
        assert (
            f"| {marked} | " in text
            and f"| {p.loss:.4f} | {p.perplexity:.2f} | {100 * p.accuracy:.1f}% ± {100 * p.accuracy_se:.1f} | {p.rows} |" in text
        )
    assert m.quality.verdict in text and "WARNING" not in text
    recovered = m.quality.point("recovered")
    results = {r.metric_type: r for r in card.data.eval_results}
    assert card.data.model_name == "pruned" and card.data.metrics == ["accuracy", "loss"]
    assert results["loss"].metric_value == pytest.approx(recovered.loss) and results["loss"].dataset_name == "sst2"
    assert results["accuracy"].metric_value == pytest.approx(recovered.accuracy)

    # How it was made.
    assert "fine-tuned" in card.data.tags
    assert f"- Recovery fine-tune: LoRA, merged into the weights, cross-entropy, {m.finetune.steps} steps" in text
    assert "[`gradprune.json`](gradprune.json)" in text


def test_hub_ids_become_metadata(ckpt):
    """What compress records for a bundled base model and a Hub dataset (neither can run offline here)."""
    m = edit_manifest(ckpt, base_model="bundled:SmolLM2-135M-Instruct", data__source="stanfordnlp/sst2")
    assert m.hub_base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = _reparse(build_model_card(ckpt, repo_id="me/pruned"))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["stanfordnlp/sst2"]
    assert {(r.dataset_type, r.metric_type) for r in card.data.eval_results} == {
        ("stanfordnlp/sst2", "loss"),
        ("stanfordnlp/sst2", "accuracy"),
    }
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) with 2" in card.text
    assert "Trained on [stanfordnlp/sst2](https://huggingface.co/datasets/stanfordnlp/sst2)" in card.text

    edit_manifest(ckpt, data__source="bundled:gsm8k")
    card = _reparse(build_model_card(ckpt, repo_id="me/pruned"))
    assert card.data.datasets == ["openai/gsm8k"] and "Trained on GSM8K (Cobbe et al. 2021" in card.text
    assert {r.dataset_name for r in card.data.eval_results} == {"GSM8K"}


def test_quality_warning_is_loud(ckpt):
    verdict = "recovered vs dense: loss 2.000 → 4.100 (+105%)"
    edit_manifest(ckpt, quality__warning=True, quality__verdict=verdict)
    text = _reparse(build_model_card(ckpt, repo_id="me/bad")).text
    top = text.split("## What was removed")[0]
    assert f"> **WARNING: {verdict}** See [Held-out quality](#held-out-quality)" in top
    assert f"**WARNING: {verdict}**" in text.split("## Held-out quality")[1]


def test_distillation_and_no_finetune(ckpt, tmp_path):
    """What compress records for --distill --teacher DIR, and for --finetune none (the pruned model is the checkpoint)."""
    teacher = {"teacher": str(tmp_path / "teachers" / "dense-ft"), "alpha": 0.5, "temperature": 2.0, "top_k": None}
    edit_manifest(ckpt, finetune__objective="distill", finetune__distill=teacher)
    card = _reparse(build_model_card(ckpt, repo_id="me/kd"))
    assert "logit distillation from `dense-ft` mixed with cross-entropy (alpha 0.5, temperature 2.0)" in card.text
    assert "distillation" in card.data.tags and str(tmp_path) not in card.text

    m = edit_manifest(ckpt, finetune__mode="none", finetune__objective="ce", finetune__distill=None)
    card = _reparse(build_model_card(ckpt, repo_id="me/raw"))
    assert "- Recovery fine-tune: none" in card.text and "fine-tuned" not in card.data.tags
    assert "| **pruned** (this checkpoint) |" in card.text
    pruned = m.quality.point("pruned")
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["loss"] == pytest.approx(pruned.loss)


def test_eval_files_and_bench_json(ckpt):
    (ckpt / "eval_sst2.json").write_text(
        json.dumps({"metric": "accuracy", "value": 0.81, "data": "../shared/data/sst2/test.jsonl", "n": 872})
    )
    (ckpt / "eval_broken.json").write_text("{not json")
    (ckpt / "bench").mkdir()
    (ckpt / "bench" / "report.json").write_text(json.dumps({"tokens_per_s_dense": 10.5, "tokens_per_s_pruned": 14.25, "runs": [1, 2]}))
    (ckpt / "bench" / "tpot.png").write_bytes(b"\x89PNG")
    card = _reparse(build_model_card(ckpt, repo_id="me/evald"))
    assert "| sst2 | accuracy | 0.81 | 872 |" in card.text
    assert 0.81 in [r.metric_value for r in card.data.eval_results if r.metric_name == "accuracy"]
    assert "| tokens_per_s_pruned | 14.25 |" in card.text and "runs" not in card.text
    assert "![tpot](bench/tpot.png)" in card.text


def test_token_like_strings_are_redacted(ckpt):
    edit_manifest(ckpt, command="HF_TOKEN=hf_abcdefghijklmnopqrstuv gradprune compress --token secretvalue")
    text = str(build_model_card(ckpt, repo_id="me/x"))
    assert "hf_abcdefghijklmnopqrstuv" not in text and "secretvalue" not in text
    assert redact("use hf_0123456789abcdef here", "mine") == "use hf_*** here"


# gradprune.json exactly as gradprune-deploy 0.1 (schema 1) wrote it: the flat dict literal of the
# old pipeline.py, for `compress --drop-layers 2` on a 6-layer model (per-linear merge stats cut).
SCHEMA_1 = {
    "schema_version": 1,
    "tool": "gradprune-deploy",
    "method": "GradPruner (ICLR 2026)",
    "base_model": "bundled:SmolLM2-135M-Instruct",
    "base_model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "architecture": "LlamaForCausalLM",
    "model_type": "llama",
    "data": {
        "source": "bundled:gsm8k",
        "split": "train",
        "examples": 32,
        "tokenized": 24,
        "max_length": 64,
        "chat_template": True,
        "loss": "completion tokens only",
    },
    "scorer": "igia",
    "layer_scores": [0.0465, 0.1304, 0.0557, 0.0260, 0.0306, 0.0159],
    "removal_order": [5, 3, 4, 0, 2, 1],
    "budget": {"drop_ratio": None, "drop_layers": 2, "target_params": None, "protect_first": 0, "protect_last": 0},
    "num_layers_before": 6,
    "num_layers_after": 4,
    "layers_dropped": [3, 5],
    "layers_kept": [0, 1, 2, 4],
    "params_before": 3367744,
    "params_after": 3293760,
    "params_per_layer": [36992] * 6,
    "probe": {
        "probe_steps": 8,
        "zero_gradient_steps": 2,
        "optimizer_steps": 10,
        "seconds": 53.4,
        "seconds_per_step": 5.34,
        "igia_callback_seconds": 6.1,
        "stored_factor_numbers": 393216,
        "gradient_clipping": "off during the probe",
        "planned_finetune_steps": 4,
        "probe_fraction": 0.01,
    },
    "merge": {
        "enabled": True,
        "keep_top_p": 0.2,
        "targets": {"3": 2, "5": 4},
        "merged_entries_total": 7401,
        "per_layer": {
            "3": {"into": 2, "merged_entries": 3701, "entries": 36864, "linears": {}},
            "5": {"into": 4, "merged_entries": 3700, "entries": 36864, "linears": {}},
        },
    },
    "finetune": {
        "mode": "lora",
        "steps": 4,
        "learning_rate": 0.0002,
        "seconds": 3.1,
        "train_loss": 10.77,
        "first_logged_loss": 10.80,
        "last_logged_loss": 10.72,
        "batch_size": 4,
        "grad_accum": 1,
        "epochs": 1.0,
        "max_steps": 4,
        "warmup_ratio": 0.03,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "seed": 0,
        "gradient_checkpointing": False,
    },
    "seed": 0,
    "world_size": 1,
    "command": "gradprune compress --drop-layers 2 --max-examples 32 --max-length 64 --batch-size 4 --max-steps 4",
    "config": {
        "out": "tiny-pruned",
        "model": "bundled:SmolLM2-135M-Instruct",
        "data": "bundled:gsm8k",
        "split": "train",
        "max_examples": 32,
        "max_length": 64,
        "scorer": "igia",
        "drop_ratio": None,
        "drop_layers": 2,
        "target_params": None,
        "protect_first": 0,
        "protect_last": 0,
        "probe_steps": None,
        "probe_fraction": 0.01,
        "probe_min_steps": 8,
        "scorer_batches": 8,
        "merge": True,
        "keep_top_p": 0.2,
        "finetune": "lora",
        "epochs": 1.0,
        "max_steps": 4,
        "batch_size": 4,
        "grad_accum": 1,
        "learning_rate": None,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "warmup_ratio": 0.03,
        "gradient_checkpointing": False,
        "seed": 0,
        "dtype": "float32",
        "trust_remote_code": False,
        "allow_pickle": False,
        "overwrite": False,
        "plot": True,
    },
    "timings": {
        "load_seconds": 0.49,
        "score_seconds": 54.3,
        "merge_seconds": 0.16,
        "surgery_seconds": 0.01,
        "finetune_seconds": 3.3,
        "total_seconds": 58.5,
    },
    "versions": {
        "python": "3.11.7",
        "gradprune-deploy": "0.1.0",
        "torch": "2.13.0+cpu",
        "transformers": "5.19.0",
        "peft": "0.21.2",
        "accelerate": "1.15.0",
    },
}


def test_schema_1_manifest_still_reads(ckpt):
    (ckpt / "gradprune.json").write_text(json.dumps(SCHEMA_1, indent=2))
    m = inspect_checkpoint(ckpt).manifest
    assert m.schema_version == SCHEMA_VERSION and m.quality is None
    assert m.scoring["probe_steps"] == 8 and m.merge.targets == {"3": 2, "5": 4} and m.merge.layers_requested == "all"
    assert m.finetune.mode == "lora" and m.finetune.settings["lora_r"] == 8
    card = _reparse(build_model_card(ckpt, repo_id="me/old"))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    text = card.text
    assert "- Layer 3 was merged into kept layer 2 (top 20% by IGIA, same sign) before it was removed" in text
    assert "- Layer 5 was merged into kept layer 4 (top 20% by IGIA, same sign) before it was removed" in text
    assert "removed outright" not in text and "Held-out quality" not in text
    assert "| parameters | 3.4M | 3.3M |" in text and "Trained on GSM8K" in text
    assert "accumulated over 8 LoRA probe steps" in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            json.dumps({**SCHEMA_1, "schema_version": SCHEMA_VERSION + 1}),
            rf"schema_version {SCHEMA_VERSION + 1} is newer than this gradprune-deploy reads "
            rf"\({SCHEMA_VERSION}\): upgrade gradprune-deploy",
        ),
        ("{not json", r"is not valid JSON .*: the manifest is corrupt"),
        (json.dumps({"schema_version": SCHEMA_VERSION, "merged_into": {"3": 2}}), r"unknown field\(s\) merged_into"),
    ],
)
def test_unreadable_manifest_is_one_clear_error(ckpt, content, message):
    (ckpt / "gradprune.json").write_text(content)
    info = inspect_checkpoint(ckpt)  # the weights are still exportable (ONNX, vLLM never read the manifest)
    with pytest.raises(GradPruneError, match=message) as exc:
        _ = info.manifest
    assert "\n" not in str(exc.value) and str(ckpt.resolve() / "gradprune.json") in str(exc.value)
    with pytest.raises(GradPruneError, match=message):  # a card is never built on a guess
        build_model_card(ckpt, repo_id="me/x")


def test_card_refuses_a_broken_checkpoint(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    n = config["num_hidden_layers"]
    (ckpt / "config.json").write_text(json.dumps({**config, "num_hidden_layers": n - 1}))
    with pytest.raises(ModelLoadError, match=rf"num_hidden_layers={n - 1} but the weights disagree \(unexpected layer\(s\) \[{n - 1}\]\)"):
        build_model_card(ckpt, repo_id="me/x")


@pytest.mark.skipif(not is_available("onnxruntime") or not is_available("onnxscript"), reason="needs the onnx extra")
def test_card_lists_the_exported_artefacts(ckpt, tmp_path):
    """A real `export onnx` record, carried into the checkpoint's manifest as a Hub upload with the artefact
    would carry it: the card lists its size, validation and ledger point against the checkpoint's own."""
    export = tmp_path / "onnx-float32"
    export_onnx(OnnxExportConfig(str(ckpt), out=str(export), new_tokens=2))
    (record,) = Manifest.read(export).artefacts
    with_artefact(Manifest.read(ckpt), record).write(ckpt)
    text = build_model_card(ckpt, repo_id="me/tiny").text
    section = text.split("## Quantised and exported versions", 1)[1].split("\n## ", 1)[0]
    final = Manifest.read(ckpt).final_quality
    row = next(line for line in section.splitlines() if line.startswith("| **onnx-float32**"))
    assert f"{record.size_bytes / 2**20:,.1f} MiB" in row and "`onnx-float32/model.onnx`" in row
    assert "100.0% greedy tokens equal" in row and f"max \\|Δ logits\\| {record.validation['max_abs_logit_diff']:.3g}" in row
    assert f"{record.quality.loss:.4f} ({record.quality.loss / final.loss - 1:+.1%})" in row
    assert f"loss {final.loss:.4f}" in section and 'OnnxCausalLM("onnx-float32")' in section
    assert "| onnx-float32 | this checkpoint exported to ONNX, float32 |" in text  # its ledger point joins the ledger table
    assert str(tmp_path) not in text  # the export's local path never reaches the card


def test_gguf_run_snippet():
    """The GGUF snippet (for the gguf exporter's records): llama.cpp, then Ollama through a Modelfile."""
    record = ArtefactRecord(stage="gguf-q8_0", format="gguf", quantization="q8_0", files=["tiny-q8_0.gguf"])
    snippet = RUN_SNIPPETS["gguf"]("gguf", record)
    assert "llama-cli -m gguf/tiny-q8_0.gguf" in snippet and "FROM ./gguf/tiny-q8_0.gguf" in snippet
    assert "ollama create gguf-q8-0 -f Modelfile" in snippet


def test_card_shows_what_the_model_answers_at_every_stage(ckpt):
    """The ledger's greedy answers (recorded by the real compress) reach the card: one row per stage with the
    degeneration measures, and the recorded answers side by side."""
    m = Manifest.read(ckpt)
    card = build_model_card(ckpt, repo_id="me/tiny").text
    assert "## What it answers" in card
    for p in m.quality.points:
        g = p.generation
        assert g is not None and g.rows == min(16, m.quality.rows)
        assert f"| {p.stage} | {fmt(g.repeated_4gram_rate)} | " in card
    first = m.quality.points[0].generation.examples[0]["answer"].replace("|", "\\|").replace("\n", "⏎")[:240]
    assert first in card
