"""`gradprune export onnx --quantize int4|int8`: the real quantiser on a tiny random Llama, the quantised
graph run by OnnxCausalLM, its numbers against the float checkpoint, and its ledger stage on a checkpoint
made by the real `compress`.

Where a test only needs the float graph of `tiny_dir`, the trace is replaced by a copy of the graph
already exported from that same checkpoint (tracing again costs ~15 s); quantisation, validation and the
ledger that run on it are the real ones.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from exporters import onnx as onnx_exporter  # noqa: E402
from exporters.onnx import VALIDATION_PROMPTS, OnnxExportConfig, export_onnx  # noqa: E402
from exporters.onnx_validate import THRESHOLDS, compare_with_torch, counted_steps, prefix_agreement  # noqa: E402
from gradprune_deploy.cli import main  # noqa: E402
from gradprune_deploy.errors import ConfigError  # noqa: E402
from gradprune_deploy.manifest import Manifest  # noqa: E402
from gradprune_deploy.runtime.onnx_runtime import OnnxCausalLM  # noqa: E402
from tests.exporters.conftest import edit_manifest  # noqa: E402
from tests.exporters.test_onnx import tiny_dir, tiny_export  # noqa: E402,F401 - shared fixtures


@pytest.fixture
def reuse_trace(tiny_export, monkeypatch):  # noqa: F811
    """Exports of `tiny_dir` copy its already-traced float graph instead of tracing again."""

    def copy_graph(model, path, *, opset):
        for name in ("model.onnx", "model.onnx.data"):
            shutil.copy(tiny_export[0] / name, path.parent / name)

    monkeypatch.setattr(onnx_exporter, "_trace_to_onnx", copy_graph)


def _ops(path) -> dict[str, int]:
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


@pytest.mark.parametrize(("quantize", "lm_head"), [("int4", None), ("int8", None), ("int4", "float32")])
def test_quantized_export_generates_and_records_its_numbers(quantize, lm_head, tiny_dir, tiny_export, reuse_trace, tmp_path):  # noqa: F811
    out = tmp_path / quantize
    summary = export_onnx(OnnxExportConfig(str(tiny_dir), out=str(out), quantize=quantize, lm_head=lm_head, new_tokens=6))
    q, v = summary["quantization"], summary["validation"]
    assert q["type"] == quantize and q["bits"] == int(quantize[3]) and q["block_size"] == 32
    assert q["quantizer"] == ("hqq" if quantize == "int4" else "rtn") and q["lm_head"] == (lm_head or "int8")
    # every weight MatMul (7 per layer, and the lm_head unless kept float32) is MatMulNBits, the lm_head at its
    # own bits; only the two attention MatMuls per layer (and a float32 lm_head) stay MatMul
    ops = _ops(out)
    head_float = lm_head == "float32"
    assert ops["MatMulNBits"] == q["matmuls_quantized"] == 2 * 7 + (0 if head_float else 1)
    assert ops.get("MatMul", 0) == 2 * 2 + head_float
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    head = next(n for n in graph.node if n.output[0] == "logits")
    assert set(bits.values()) == ({int(quantize[3])} if head_float or quantize == "int8" else {4, 8})
    assert head.op_type == ("MatMul" if head_float else "MatMulNBits")
    assert ("GatherBlockQuantized" in ops) == (quantize == "int4") == q["embedding_quantized"]
    assert summary["float_validation"]["greedy_tokens_identical"]  # the float graph was checked before quantising
    # the recorded numbers are the run's: measured again here, they are the same
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    lm = OnnxCausalLM(out)
    again = compare_with_torch(lm, model, AutoTokenizer.from_pretrained(tiny_dir), prompts=VALIDATION_PROMPTS, new_tokens=6)
    assert {k: v[k] for k in again} == again
    assert (v["max_abs_logit_diff_allowed"], v["min_agreement"]) == THRESHOLDS[quantize]
    assert 0 < v["max_abs_logit_diff"] <= THRESHOLDS[quantize][0] and v["greedy_token_agreement"] >= THRESHOLDS[quantize][1]
    meta = json.loads((out / "gradprune_onnx.json").read_text())
    assert meta["validation"] == json.loads(json.dumps(v)) and meta["quantization"] == q
    model_opset = next(o.version for o in onnx.load(str(out / "model.onnx"), load_external_data=False).opset_import if o.domain == "")
    assert meta["opset"] == q["opset"] == model_opset == (21 if quantize == "int4" else 20)  # int4 tables need opset 21
    # the KV-cache I/O and its dtype are the float graph's: the same runner generates with it
    float_lm = OnnxCausalLM(tiny_export[0])
    assert lm._past_names == float_lm._past_names and lm.cache_dtype == float_lm.cache_dtype == np.float32
    tokens = lm.generate([[5, 6, 7], [8, 9]], max_new_tokens=5, eos_token_id=None)
    assert tokens.shape == (2, 5)
    # int4 (embedding table included) is far smaller than the float graph; int8 keeps the tied table float32
    # for the Gather beside the lm_head's int8 copy, which on this vocabulary-heavy toy outweighs the layers' saving
    float_bytes = sum(p.stat().st_size for p in tiny_export[0].glob("model.onnx*"))
    assert summary["artefact"]["size_bytes"] == sum(p.stat().st_size for p in out.glob("model.onnx*"))
    assert summary["artefact"]["size_bytes"] < (0.5 * float_bytes if quantize == "int4" and not head_float else 1.5 * float_bytes)
    # a plain HF checkpoint gets no ledger stage and no gradprune.json
    assert summary["artefact"]["stage"] == f"onnx-{quantize}" and summary["artefact"]["quality"] is None
    assert not (out / "gradprune.json").exists()


def test_failed_threshold_fails_the_export(tiny_dir, reuse_trace, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "strict"
    assert main(["export", "onnx", str(tiny_dir), "--out", str(out), "--quantize", "int4", "--atol", "1e-6"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the int4 ONNX graph is too far from the float checkpoint: max |Δ logits|") and "\n" not in err
    assert "nothing was written" in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(quantize="int4", dtype="float16"), "--quantize int4 quantises the float32 graph's weights: use --dtype float32"),
        (dict(quantize="int4", block_size=48), "--block-size 48: MatMulNBits needs a power of two"),
        (dict(block_size=64), "--block-size only applies to a quantised export"),
        (dict(quantizer="hqq"), "--quantizer only applies to a quantised export"),
        (dict(lm_head="int4"), "--lm-head only applies to a quantised export"),
        (dict(quantize="int8", quantizer="hqq"), "use --quantizer rtn for int8"),
        (dict(quantize="int8", min_agreement=1.5), "--min-agreement must be in"),
    ],
)
def test_impossible_combinations_are_refused_up_front(options, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("(", r"\(")):
        OnnxExportConfig("ckpt", out=str(tmp_path / "x"), **options)


def test_ledger_data_needs_a_ledger(tiny_dir, tmp_path, capsys):  # noqa: F811
    code = main(["export", "onnx", str(tiny_dir), "--out", str(tmp_path / "x"), "--quantize", "int8", "--ledger-data", str(tmp_path)])
    assert code == 2 and "has no quality ledger" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_agreement_helpers():
    tokens = np.array([[5, 2, 9, 9], [5, 6, 7, 8]])
    assert counted_steps(tokens, 2).tolist() == [[True, True, False, False], [True] * 4]
    assert prefix_agreement(np.array([[1, 2, 3], [1, 9, 3]]), np.array([[1, 2, 3], [1, 2, 3]])) == 4 / 6


# ── on a checkpoint made by the real `compress`: its ledger rows, its stage, inspect ──────────────────────


@pytest.fixture(scope="module")
def compressed_exports(compressed_dir, tmp_path_factory):
    """The compressed checkpoint exported float32 (traced once) and int4 (from that same trace)."""
    root = tmp_path_factory.mktemp("compressed-onnx")
    float_summary = export_onnx(OnnxExportConfig(str(compressed_dir), out=str(root / "float32"), new_tokens=4))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            onnx_exporter,
            "_trace_to_onnx",
            lambda model, path, *, opset: [shutil.copy(root / "float32" / n, path.parent / n) for n in ("model.onnx", "model.onnx.data")],
        )
        int4_summary = export_onnx(OnnxExportConfig(str(compressed_dir), out=str(root / "int4"), quantize="int4", new_tokens=4))
    return root, float_summary, int4_summary


def test_ledger_stage_of_each_export(compressed_dir, compressed_exports, capsys):
    root, float_summary, int4_summary = compressed_exports
    source = Manifest.read(compressed_dir)
    recovered = source.final_quality
    for name, summary in (("float32", float_summary), ("int4", int4_summary)):
        manifest = Manifest.read(root / name)
        stage = f"onnx-{name}"
        (record,) = manifest.artefacts
        point = manifest.quality.point(stage)
        assert record.stage == stage and record.quality == point and summary["artefact"]["stage"] == stage
        assert point.rows == recovered.rows == source.quality.rows and point.tokens == recovered.tokens
        assert math.isfinite(point.loss) and point.accuracy is not None
        assert record.size_bytes == sum((root / name / f).stat().st_size for f in record.files)
        assert record.validation["greedy_token_agreement"] == summary["validation"]["greedy_token_agreement"] if name == "int4" else 1.0
        # the checkpoint's own points are kept as they were
        assert [p for p in manifest.quality.points if p.stage != stage] == source.quality.points
    float_point = Manifest.read(root / "float32").quality.point("onnx-float32")
    int4_point = Manifest.read(root / "int4").quality.point("onnx-int4")
    # the float graph is the checkpoint: the same loss to float rounding; int4 close to it
    assert float_point.loss == pytest.approx(recovered.loss, abs=1e-3) and float_point.accuracy == recovered.accuracy
    assert int4_point.loss == pytest.approx(recovered.loss, rel=0.05)
    assert Manifest.read(compressed_dir).artefacts == []  # the input checkpoint is never modified
    assert main(["inspect", str(root / "int4")]) == 0
    shown = capsys.readouterr().out
    point = Manifest.read(root / "int4").quality.point("onnx-int4")
    assert "artefact        onnx-int4:" in shown  # the artefact's line, and its row in the ledger table:
    assert any(line.split()[:2] == ["onnx-int4", f"{point.loss:.3f}"] for line in shown.splitlines()), shown


def test_moved_ledger_data_is_named_before_the_export(compressed_dir, compressed_exports, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "moved"
    shutil.copytree(compressed_dir, ckpt)
    config = Manifest.read(ckpt).config
    edit_manifest(ckpt, config={**config, "data": str(tmp_path / "gone")}, data__source=str(tmp_path / "gone"))
    assert main(["export", "onnx", str(ckpt), "--out", str(tmp_path / "x"), "--quantize", "int4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "give --ledger-data PATH" in err and "\n" not in err and not (tmp_path / "x").exists()
    # --no-ledger exports it all the same: its record, without a ledger point (the trace is the one already made)
    float_graph = compressed_exports[0] / "float32"
    monkeypatch.setattr(
        onnx_exporter,
        "_trace_to_onnx",
        lambda model, path, *, opset: [shutil.copy(float_graph / n, path.parent / n) for n in ("model.onnx", "model.onnx.data")],
    )
    assert main(["export", "onnx", str(ckpt), "--out", str(tmp_path / "x"), "--quantize", "int8", "--no-ledger"]) == 0
    (record,) = Manifest.read(tmp_path / "x").artefacts
    assert record.stage == "onnx-int8" and record.quality is None and record.validation["greedy_token_agreement"] >= 0.95
    assert "onnx-int8" not in [p.stage for p in Manifest.read(tmp_path / "x").quality.points]
