"""The scale benchmark end to end on its smoke rung (a 10-layer random Llama): every measurement runs,
the ratios come out of the real records, and a rerun resumes instead of measuring again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "scale" / "scale_bench.py"


def _run(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--rungs", "tiny-llama", "--steps", "2", "--cuts", "0.4", "--threads", "1"]
    proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_scale_bench_smoke_rung_measures_and_resumes(tmp_path):
    summary = _run(tmp_path)
    assert summary["rows"] == 1
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    keys = [r["key"] for r in records]
    assert keys == ["tiny-llama/build", "tiny-llama/dense", "tiny-llama/infer@0", "tiny-llama/compress@0.4", "tiny-llama/infer@0.4"]
    assert not [r for r in records if "error" in r]
    row = json.loads((tmp_path / "scale.json").read_text())["rows"][0]
    build, comp = records[0], records[3]
    assert row["layers_dropped"] == 4  # 40% of 10 layers
    assert row["ideal"] == pytest.approx(comp["params_after"] / build["params"]) and row["ideal"] < 1
    infer_dense, infer_pruned = records[2], records[4]
    assert row["weight_ratio"] == pytest.approx(infer_pruned["weight_bytes"] / infer_dense["weight_bytes"])
    for key in ("recovery_time", "recovery_memory", "compress_time", "compress_memory", "infer_time", "infer_memory"):
        assert row[key] > 0
    for stage in ("probe", "surgery", "finetune", "save"):  # per-stage time and peak memory from the manifest
        assert comp["timings"][f"{stage}_seconds"] >= 0 and comp["timings"][f"{stage}_peak_mb"] > 0
    assert (tmp_path / "scale.md").read_text().count("| tiny-llama |") == 1 and (tmp_path / "scale.png").is_file()
    _run(tmp_path)  # resumes: nothing is measured again
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(records)
