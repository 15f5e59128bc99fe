"""The outside check: lm-evaluation-harness and `gradprune eval` agree on choice accuracy (same prompts, same tokens)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_lm_eval_and_gradprune_eval_agree_on_the_real_model(smollm2_dir):
    pytest.importorskip("lm_eval", reason="the `study` extra (lm-eval) is not installed")
    cmd = [sys.executable, str(ROOT / "scripts" / "study" / "lm_eval_crosscheck.py"), "--data", str(SHARED_DATA / "sst2" / "test.jsonl")]
    cmd += ["--limit", "8", "--variants", "matched", str(smollm2_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (entry,) = json.loads(proc.stdout.strip().splitlines()[-1]).values()
    assert abs(entry["diff_points"]) <= 0.5
    audit = entry["token_audit_matched"]
    assert audit["requests"] == 16 and audit["mismatched"] == 0  # lm-eval scored exactly gradprune's completion tokens
