"""`gradprune export onnx`: one export per model, checked against PyTorch by the exporter and here again."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, T5Config, T5ForConditionalGeneration

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnxruntime as ort  # noqa: E402

from exporters import onnx as onnx_exporter  # noqa: E402
from exporters.onnx import OnnxExportConfig, export_onnx, present_export_onnx, validate_export  # noqa: E402
from gradprune_deploy.cli import main  # noqa: E402
from gradprune_deploy.errors import ArchitectureError, ExportError, ModelLoadError, OutputExistsError  # noqa: E402
from gradprune_deploy.runtime.onnx_runtime import OnnxCausalLM  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402


def _export(checkpoint, out, **options):
    return export_onnx(OnnxExportConfig(str(checkpoint), out=str(out), **options))


PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog because", "1 2 3"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A 2-layer random Llama with SmolLM2's tokenizer (export time is mostly per layer)."""
    out = tmp_path_factory.mktemp("tiny2")
    tiny_model("llama", num_hidden_layers=2, seed=1).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_export(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    return out, _export(tiny_dir, out, new_tokens=6)


def _torch_model(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return model, tok


def _check_runner_against_torch(export_dir, model_dir, prompts, new_tokens):
    """Independent of the exporter's own validation: ragged batch, per-position logits, greedy tokens."""
    model, tok = _torch_model(model_dir)
    lm = OnnxCausalLM(export_dir)
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=lm.pad_token_id)
    ragged = [tok(p)["input_ids"] for p in prompts]  # lists of different lengths: the runner pads them
    got = lm.generate(ragged, max_new_tokens=new_tokens)
    np.testing.assert_array_equal(got, expected[:, batch["input_ids"].shape[1] :].numpy())
    timings = lm.last_timings
    assert timings.ttft_s > 0 and len(timings.decode_s) == got.shape[1] - 1 and timings.tpot_s > 0
    for prompt in prompts:  # batch of one, no padding: logits at every position
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model(input_ids=ids).logits.numpy()
        diff = np.abs(lm.logits(ids.numpy()) - ref).max()
        assert diff < onnx_exporter.DEFAULT_ATOL["float32"], diff
    return lm


def test_tiny_export_validates(tiny_export):
    out, summary = tiny_export
    v = summary["validation"]
    assert v["greedy_tokens_identical"] and v["greedy_new_tokens"] == 6 and v["prompts"] == 4
    assert 0 < v["max_abs_diff_prefill_logits"] < 1e-4 and 0 < v["max_abs_diff_decode_logits"] < 1e-4
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "config.json", "generation_config.json", "tokenizer.json", "gradprune_onnx.json"} <= names
    meta = json.loads((out / "gradprune_onnx.json").read_text())
    assert meta["validation"] == v and meta["num_layers"] == 2 and meta["dtype"] == "float32"
    assert meta["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "input.past_key_values.layers.1.values" in meta["inputs"] and "output.past_key_values.layers.0.keys" in meta["outputs"]


def test_cli_line_leaves_out_the_graph_names(tiny_export):
    out, summary = tiny_export
    shown = json.loads(present_export_onnx(summary))
    assert "inputs" not in shown and "outputs" not in shown and "inputs" in summary  # the full lists stay in gradprune_onnx.json
    assert shown == {k: v for k, v in json.loads(json.dumps(summary, default=str)).items() if k not in ("inputs", "outputs")}


def test_tiny_runner_matches_torch(tiny_export, tiny_dir):
    lm = _check_runner_against_torch(tiny_export[0], tiny_dir, PROMPTS, new_tokens=5)
    # dynamic batch/length: prefill of a batch of 1 then decode steps, cache grows by one each step
    logits, state = lm.prefill([[5, 6, 7]])
    for step in range(3):
        lm.decode(logits.argmax(-1), state)
        assert state.cache[0].shape == (1, lm.num_kv_heads, 4 + step, lm.head_dim)


def test_validation_catches_a_different_model(tiny_export, tmp_path, tokenizer):
    """The check that guards every export fails, with the numbers, when the graph is not the model."""
    other = tiny_model("llama", num_hidden_layers=2, seed=2)
    with pytest.raises(
        ExportError,
        match=r"max \|Δ logits\| prefill [0-9.e-]+, decode [0-9.e-]+ > atol 0.005; "
        r"greedy tokens differ for prompt",
    ):
        validate_export(tiny_export[0], other, tokenizer, atol=5e-3, new_tokens=4)


def test_failed_validation_writes_nothing(tiny_export, tiny_dir, tmp_path, monkeypatch):
    """A mismatch above tolerance aborts the export and leaves no output (nor temporary) directory.

    The trace is replaced by a copy of the graph already exported from this checkpoint (tracing
    again would cost ~20 s); the validation that runs on it is the real one.
    """

    def copy_graph(model, path, *, opset):
        for name in ("model.onnx", "model.onnx.data"):
            shutil.copy(tiny_export[0] / name, path.parent / name)

    monkeypatch.setattr(onnx_exporter, "_trace_to_onnx", copy_graph)
    out = tmp_path / "strict"
    with pytest.raises(ExportError, match=r"max \|Δ logits\| prefill [0-9.e-]+, decode [0-9.e-]+ > atol 1e-09.*nothing was written"):
        _export(tiny_dir, out, atol=1e-9)
    assert list(tmp_path.iterdir()) == []
    summary = _export(tiny_dir, out)  # the same graph passes at the default tolerance
    assert summary["validation"]["greedy_tokens_identical"] and (out / "model.onnx").is_file()


def test_bad_inputs_fail_before_export(tiny_dir, tiny_export, tmp_path, capsys):
    with pytest.raises(OutputExistsError):
        _export(tiny_dir, tiny_export[0])
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        _export(no_weights, tmp_path / "x")
    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64)).save_pretrained(t5)
    with pytest.raises(ArchitectureError, match="T5ForConditionalGeneration .* is not exportable to ONNX"):
        _export(t5, tmp_path / "x")
    capsys.readouterr()
    assert main(["export", "onnx", str(t5), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: architecture T5ForConditionalGeneration") and "\n" not in err
    assert main(["export", "onnx", str(tiny_dir)]) == 2 and "--out is required" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cuda_provider_needs_the_gpu_extra(tiny_export):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(Exception, match=r"gradprune-deploy\[onnx-gpu\]"):
        OnnxCausalLM(tiny_export[0], provider="cuda")


@pytest.mark.slow
def test_pruned_smollm2_export_through_cli(pruned_smollm2_dir, tmp_path, capsys):
    """The issue's done-when: the pruned SmolLM2 exports, validates and generates PyTorch's tokens."""
    out = tmp_path / "smollm2-onnx"
    assert main(["export", "onnx", str(pruned_smollm2_dir), "--out", str(out), "--new-tokens", "16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    v = summary["validation"]
    print(
        f"\npruned SmolLM2 ONNX: export {summary['export_seconds']} s, max |Δ logits| prefill "
        f"{v['max_abs_diff_prefill_logits']:.3g} decode {v['max_abs_diff_decode_logits']:.3g}"
    )
    assert summary["num_layers"] == 18 and v["greedy_tokens_identical"] and v["greedy_new_tokens"] == 16
    assert max(v["max_abs_diff_prefill_logits"], v["max_abs_diff_decode_logits"]) <= v["atol"]
    chat = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", "Photosynthesis is the process by which"]
    _check_runner_against_torch(out, pruned_smollm2_dir, chat, new_tokens=12)


def test_sliding_window_models_are_refused_before_tracing(tmp_path, tokenizer):
    """Mistral/Gemma3 with sliding-window layers keep a window-trimmed cache the exported graph cannot express."""
    path = tmp_path / "mistral"
    tiny_model("mistral", num_hidden_layers=2).save_pretrained(path)  # sliding_window=8
    tokenizer.save_pretrained(path)
    with pytest.raises(ArchitectureError, match="MistralForCausalLM uses sliding-window attention .* serve it with vLLM"):
        _export(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
