"""scripts/study/dense_control.py on a real compress run of a tiny model: the dense control trains on exactly the
run's training rows with its settings, and its ledger point is what `gradprune eval` measures on the held-out rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradprune_deploy.cli import main
from gradprune_deploy.compress.ledger import held_out_of
from gradprune_deploy.evaluation.evaluate import EvalConfig, evaluate
from gradprune_deploy.manifest import Manifest
from tests.conftest import SHARED_DATA

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "study" / "dense_control.py"


def test_the_dense_control_trains_the_runs_rows_with_its_settings(tiny_llama_dir, tmp_path):
    run, control = tmp_path / "run", tmp_path / "control"
    args = ["compress", "--model", str(tiny_llama_dir), "--data", str(SHARED_DATA / "sst2" / "train.jsonl"), "--max-examples", "40"]
    args += ["--validation-fraction", "0.25", "--max-length", "64", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "3"]
    args += ["--probe-steps", "2", "--drop-layers", "2", "--ledger-generate", "3", "--ledger-new-tokens", "6", "-q"]
    assert main([*args, "--out", str(run)]) == 0
    proc = subprocess.run([sys.executable, str(SCRIPT), str(run), str(control)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((control / "control.json").read_text())
    manifest = Manifest.read(run)
    assert record["train_rows"] == manifest.data.tokenized == 25 and manifest.data.examples == 30  # 5 prompts over 64 tokens
    assert record["finetune"]["steps"] == manifest.finetune.steps == 3
    assert record["finetune"]["settings"] == manifest.finetune.settings  # batch 4 x 2, rank, lr, seed: the run's own
    point = record["point"]
    assert point["rows"] == manifest.quality.rows == 10 and point["generation"]["rows"] == 3
    # the control's ledger point is an independent evaluation of the written checkpoint on the run's held-out rows
    held = tmp_path / "held.jsonl"
    rows = held_out_of(manifest).validation
    held.write_text("".join(json.dumps({"prompt": ex.prompt, "completion": ex.completion}) + "\n" for ex in rows))
    loss = evaluate(EvalConfig(str(control), data=str(held), metric="loss", save=False))
    assert point["loss"] == pytest.approx(loss["value"], rel=1e-4)
    assert "| dense fine-tuned (the control) |" in proc.stdout and "| recovered |" in proc.stdout
    # never over an existing directory
    again = subprocess.run([sys.executable, str(SCRIPT), str(run), str(control)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "exists: give a new directory" in again.stderr
