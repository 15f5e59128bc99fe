"""`gradprune bench --backend onnx` on a tiny pair: automatic export into the cache, then the same
interleaved worker measurement as hf, over the exported prefill/decode graph."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import serving.backends.onnx as onnx_backend  # noqa: E402
from gradprune_deploy.errors import ConfigError  # noqa: E402
from serving.backends.onnx import ensure_onnx_export  # noqa: E402
from serving.bench import BenchConfig, bench  # noqa: E402
from serving.ideal import onnx_arm_ideals  # noqa: E402
from serving.report import arm_metrics  # noqa: E402
from tests.serving.test_bench import tiny_pair  # noqa: E402,F401 - the shared fixture


def _tiny_bench(pair, tmp_path, monkeypatch, **options) -> dict:
    """The onnx backend's report of a real bench on the tiny pair (8 prompt tokens, 4 new), exports cached in tmp_path."""
    monkeypatch.setattr(onnx_backend, "cache_dir", lambda: tmp_path / "cache")
    dense, pruned = pair
    config = BenchConfig(
        dense=str(dense),
        pruned=str(pruned),
        backend="onnx",
        input_len=8,
        output_len=4,
        num_prompts=2,
        threads=1,
        out=str(tmp_path / "report"),
        plot=False,
        **options,
    )
    return bench(config)["backends"]["onnx"]


@pytest.mark.slow
def test_onnx_bench_exports_once_and_reports(tiny_pair, tmp_path, monkeypatch):  # noqa: F811
    dense, _ = tiny_pair
    onnx = _tiny_bench(tiny_pair, tmp_path, monkeypatch, runs=2, warmup=1)
    assert {e["origin"] for e in onnx["onnx_exports"].values()} == {"exported"}
    assert onnx["settings"]["dtype"] == "float32"
    assert {"ttft_s", "tpot_s", "e2e_s", "output_tok_s", "peak_rss_bytes", "model_rss_bytes"} <= set(onnx["metrics"])
    tpot = onnx["metrics"]["tpot_s"]
    assert tpot["dense"]["n"] == tpot["pruned"]["n"] == 2 and tpot["ratio"] > 0
    # no torch in an onnx worker: its baseline is onnxruntime alone, far below a torch process
    assert onnx["memory"]["dense"]["baseline_rss_bytes"] < 200 * 2**20
    # a second bench reuses the cached exports
    assert ensure_onnx_export(dense, None)[1] == "cached"
    assert (tmp_path / "report" / "report.md").is_file()


@pytest.mark.slow
def test_onnx_bench_quantized_arm(tiny_pair, tmp_path, monkeypatch):  # noqa: F811
    """--onnx-quantize int4: a third arm (the pruned checkpoint, int4) beside the float32 pair, each against dense."""
    onnx = _tiny_bench(tiny_pair, tmp_path, monkeypatch, runs=1, warmup=0, onnx_quantize="int4")
    assert set(onnx["onnx_exports"]) == {"dense", "pruned", "pruned-int4"} and onnx["settings"]["onnx_quantize"] == "int4"
    quantized = onnx["onnx_exports"]["pruned-int4"]["path"]
    assert json.loads((Path(quantized) / "gradprune_onnx.json").read_text())["quantization"]["type"] == "int4"
    arms = onnx["arms"]
    assert set(arms) == {"pruned", "pruned-int4"}
    for metrics in arms.values():
        assert {"ttft_s", "tpot_s", "peak_rss_bytes", "file_size_bytes"} <= set(metrics)
        size = metrics["file_size_bytes"]
        assert size["ratio"] == size["arm"]["median"] / size["dense"]["median"] and size["ideal_name"] == "onnx_weight_bytes"
        # the ideal is the graphs' weight bytes; a file also holds the graph itself (~0.3 MiB here, beside a
        # 4 MiB int4 toy), so the two agree to 10% — counting an int4 weight as a byte would be off 2×
        assert size["ratio"] == pytest.approx(size["ideal"], rel=0.10)
    assert arms["pruned-int4"]["file_size_bytes"]["ratio"] < 0.5 * arms["pruned"]["file_size_bytes"]["ratio"]
    costs = onnx["onnx_graph_costs"]
    assert costs["pruned-int4"]["decode_bytes_per_token"] < costs["pruned-int4"]["weight_bytes"]  # the int4 table: one row a token
    assert costs["dense"]["decode_bytes_per_token"] == costs["dense"]["weight_bytes"]  # tied float32: the lm_head reads it all
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| metric | dense | pruned | pruned-int4 |" in markdown and "model file size" in markdown


def test_quantized_arm_needs_float32_and_the_onnx_backend():
    with pytest.raises(ConfigError, match="--onnx-quantize int4 quantises the float32 graph"):
        onnx_backend.OnnxBackend().check_environment(
            BenchConfig(dense="d", pruned="p", backend="onnx", onnx_quantize="int4", dtype="float16")
        )
    with pytest.raises(ConfigError, match="--onnx-quantize int8 adds an arm to the onnx backend: add --backend onnx"):
        onnx_backend.OnnxBackend().check_inputs(BenchConfig(dense="d", pruned="p", backend="hf", onnx_quantize="int8"))
    with pytest.raises(ConfigError, match="--onnx-quantized is the export for the --onnx-quantize arm"):
        onnx_backend.OnnxBackend().check_inputs(BenchConfig(dense="d", pruned="p", backend="onnx", onnx_quantized="q"))
    with pytest.raises(ConfigError, match="--onnx-quantized /nonexistent: no model.onnx there"):
        onnx_backend.OnnxBackend().check_inputs(
            BenchConfig(dense="d", pruned="p", backend="onnx", onnx_quantize="int4", onnx_quantized="/nonexistent")
        )


def test_arm_ideals_from_graph_bytes():
    costs = {
        "dense": {"weight_bytes": 1000.0, "decode_bytes_per_token": 1000.0},
        "pruned": {"weight_bytes": 700.0, "decode_bytes_per_token": 700.0},
        "pruned-int4": {"weight_bytes": 200.0, "decode_bytes_per_token": 150.0},
    }
    ideals = onnx_arm_ideals(costs, prefill_flops_ratio=0.68)
    assert ideals["pruned-int4"]["tpot_s"] == ("onnx_decode_bytes", 0.15) and ideals["pruned"]["file_size_bytes"][1] == 0.7
    assert ideals["pruned-int4"]["ttft_s"] == ideals["pruned"]["ttft_s"] == ("prefill_flops", 0.68)
    samples = {
        "dense": {"tpot_s": [2.0, 2.2, 2.1], "file_size_bytes": [1000]},
        "pruned": {"tpot_s": [1.5], "file_size_bytes": [700]},
        "pruned-int4": {"tpot_s": [0.42], "file_size_bytes": [210]},
    }
    arms = arm_metrics(samples, ideals)
    assert arms["pruned-int4"]["tpot_s"]["ratio"] == pytest.approx(0.2) and arms["pruned-int4"]["tpot_s"]["delta"] == pytest.approx(0.05)
    assert arms["pruned"]["file_size_bytes"]["ratio"] == pytest.approx(0.7) and "ttft_s" not in arms["pruned"]
