"""The accuracy study's arm plan and report arithmetic (examples/accuracy_study.py, study_report.py),
on synthetic records: no model is trained here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
accuracy_study = pytest.importorskip("accuracy_study")
study_report = pytest.importorskip("study_report")


def test_arm_plan_full_and_cpu():
    full = accuracy_study.arms(accuracy_study.CUTS, accuracy_study.SCORERS)
    names = [a["arm"] for a in full]
    assert len(names) == len(set(names)) == 1 + 3 * (6 + 1) + 2
    assert {a["merge"] for a in full if a["scorer"] == "igia" and "nomerge" not in a["arm"]} == {True}
    assert not any(a["merge"] for a in full if a["scorer"] not in (None, "igia"))
    cpu = accuracy_study.arms(accuracy_study.CUTS, accuracy_study.SCORERS, accuracy_study.CPU_SCORERS_AT_ALL_CUTS)
    assert len(cpu) == 18
    assert {a["cut"] for a in cpu if a["scorer"] in ("random", "gradmap", "taylor")} == {0.3}
    assert set(accuracy_study.PRIORITY) <= {a["arm"] for a in cpu}


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def test_report_targets_and_cost_arithmetic(tmp_path):
    out = tmp_path / "study"
    records, accuracy = [], {"dense": 0.80, "igia@0.3": 0.795, "block-influence@0.3": 0.70, "last-n@0.3": 0.75,
                             "igia-nomerge@0.3": 0.78}
    for task in ("sst2", "fin_headlines"):
        for arm, acc in accuracy.items():
            records.append({"task": task, "arm": arm, "scorer": None if arm == "dense" else arm.split("@")[0].replace("-nomerge", ""),
                            "cut": 0.0 if arm == "dense" else 0.3, "accuracy": acc, "test_rows": 100,
                            "seconds": 100.0 if arm == "dense" else 60.0, "peak_rss_mb": 1000.0, "params": 10,
                            "layers_dropped": None if arm == "dense" else [1, 2]})
        _write(out / task / "dense" / "dense.json", {"params": 10, "finetune": {"seconds": 90.0, "steps": 100}})
        _write(out / task / "dense" / "eval_x_test_choice.json",
               {"confusion": {"a": {"a": 60, "b": 10}, "b": {"a": 10, "b": 20}}})
        _write(out / task / "igia@0.3" / "gradprune.json",
               {"probe": {"seconds": 10.0, "optimizer_steps": 10, "igia_callback_seconds": 0.1},
                "finetune": {"seconds": 50.0, "steps": 100}})
        if task == "sst2":  # an arm one task lacks gets no mean: a partial mean is not comparable
            records.append({"task": task, "arm": "random@0.3", "scorer": "random", "cut": 0.3, "accuracy": 0.9,
                            "test_rows": 100, "seconds": 60.0, "peak_rss_mb": None, "params": 10, "layers_dropped": [3, 4]})
        records.append({"task": task, "arm": "kendall", "probe_steps": 4, "epoch_steps": 40, "tau": 0.5, "p_value": 0.01})
    report = tmp_path / "docs" / "results.md"
    summary = study_report.write_report(records, report, out, command="cmd", preset="cpu", presets={}, seconds=60)
    text = report.read_text()
    assert summary["mean_accuracy"]["random@0.3"] is None
    assert summary["compress_vs_dense_time"] == pytest.approx(0.6)
    # Per step: 1% of a 1 s probe step + a 0.5 s pruned step, over a 0.9 s dense step.
    assert summary["compress_vs_dense_time_at_1pct_probe"] == pytest.approx(0.51 / 0.9)
    assert summary["probe_overhead"] == pytest.approx(0.1 / 9.9)
    assert "GradPruner 79.5 vs dense 80.0 (Δ -0.5 points; target ≥ −1.0): met" in text
    assert "GradPruner − block-influence +9.5, − last-n +4.5 points (target ≥ +3): met" in text
    assert "| 70.0 |" in text  # majority label share from the saved confusion matrix
    assert (tmp_path / "docs" / "results_accuracy_vs_cut.png").stat().st_size > 0
