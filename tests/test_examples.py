"""The examples run as a user runs them (real SmolLM2, real data, a small budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradprune_deploy.manifest import Manifest
from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--max-examples",
    "24",
    "--max-steps",
    "2",
    "--probe-steps",
    "2",
    "--heal-steps",
    "1",
    "--validation-rows",
    "4",
    "--max-length",
    "192",
]


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_reports_quality(tmp_path, smollm2_dir):
    out = tmp_path / "quickstart"
    env = {
        **os.environ,
        "OUT": str(out),
        "BENCH_PROMPTS": "1",
        "BENCH_RUNS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "quickstart.sh"), *SMALL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = Manifest.read(out)
    assert m.num_layers_before == 30 and m.num_layers_after == 24
    assert [p.stage for p in m.quality.points] == ["dense", "pruned", "recovered"]
    assert "held-out quality" in proc.stdout and "recovered" in proc.stdout
    assert "speed-up" in proc.stdout


@pytest.mark.slow
def test_python_api_example(tmp_path, smollm2_dir):
    out = tmp_path / "api"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "python_api.py"),
            "--out",
            str(out),
            "--data",
            str(SHARED_DATA / "sst2"),
            "--steps",
            "2",
            "--rows",
            "24",
            "--test-rows",
            "8",
            "--drop-layers",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy of the pruned model on 8 rows" in proc.stdout
    assert Manifest.read(out).num_layers_after == 27
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 27
