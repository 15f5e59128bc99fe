"""The quality study end to end on its smoke preset: real arms, real records, the report's arithmetic."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "study"))

from study_report import cost, diff_se, targets  # noqa: E402


@pytest.mark.slow
def test_smoke_study_writes_records_and_a_report(tmp_path, smollm2_dir):
    out, report = tmp_path / "study", tmp_path / "study.md"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "study" / "quality_study.py"),
        "--out",
        str(out),
        "--preset",
        "smoke",
        "--tasks",
        "sst2",
        "--arms",
        "dense",
        "igia@20%",
        "--report",
        str(report),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["arm"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(records) == {"dense", "igia@20%"}
    dense, igia = records["dense"], records["igia@20%"]
    assert igia["layers_dropped"] and len(igia["layers_dropped"]) == 6 and len(igia["merge_targets"]) == 1
    assert igia["params"] < dense["params"]
    assert [p["stage"] for p in igia["ledger"]["points"]] == ["dense", "pruned", "recovered"]
    for r in records.values():
        assert r["accuracy_se"] == pytest.approx(math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / r["test_rows"]))
    # the report's numbers are the records' numbers
    text = report.read_text()
    assert f"{100 * igia['accuracy']:.1f} ± {100 * igia['accuracy_se']:.1f}" in text
    lines = targets(records)
    assert any(line.startswith("- igia@20% within 1 point(s) of dense") for line in lines)
    c = cost(igia, dense)
    assert c["ratio"] == pytest.approx(igia["compress_seconds"] / dense["compress_seconds"])
    assert diff_se(igia, dense) == pytest.approx(math.hypot(igia["accuracy_se"], dense["accuracy_se"]))
    # a rerun resumes: nothing left to do
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["arms"] == 2
