"""`gradprune bench --backend onnx` on a tiny pair: automatic export into the cache, then the same
interleaved worker measurement as hf, over the exported prefill/decode graph."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import serving.backends.onnx as onnx_backend  # noqa: E402
from serving.backends.onnx import ensure_onnx_export  # noqa: E402
from serving.bench import BenchConfig, bench  # noqa: E402
from tests.serving.test_bench import tiny_pair  # noqa: E402,F401 - the shared fixture


@pytest.mark.slow
def test_onnx_bench_exports_once_and_reports(tiny_pair, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(onnx_backend, "cache_dir", lambda: tmp_path / "cache")
    dense, pruned = tiny_pair
    report = bench(
        BenchConfig(
            dense=str(dense),
            pruned=str(pruned),
            backend="onnx",
            input_len=8,
            output_len=4,
            num_prompts=2,
            runs=2,
            warmup=1,
            threads=1,
            out=str(tmp_path / "report"),
            plot=False,
        )
    )
    onnx = report["backends"]["onnx"]
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
