"""The quality study end to end on its smoke preset: real arms, real records, the report's arithmetic."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import kendalltau, spearmanr

from gradprune_deploy.cli import main
from gradprune_deploy.compress.finetune import TrainSettings, run_probe
from gradprune_deploy.data import read_examples, tokenize_examples
from gradprune_deploy.loading import load_model_and_tokenizer
from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "study"))

from paired import binomial_se, counts  # noqa: E402
from paired_tables import compare  # noqa: E402
from quality_study import phase_seconds  # noqa: E402
from ranking_stability import kendall_tau_b, lowest, second_half, stability  # noqa: E402
from rederive_seconds import rederive  # noqa: E402
from study_report import cost, predictors, spearman, targets  # noqa: E402


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
    # an arm without its own --finetune recovers with plain LoRA, as every recorded arm did, whatever compress defaults to
    assert json.loads((out / "sst2" / "igia@20%" / "gradprune.json").read_text())["finetune"]["mode"] == "lora"
    assert [p["stage"] for p in igia["ledger"]["points"]] == ["dense", "pruned", "recovered"]
    for r in records.values():
        # each test row's outcome is kept, the accuracy and its SE come from the counts
        assert r["per_row"]["n"] == r["test_rows"] == 16 and len(r["per_row"]["correct"]) == 16 and len(r["per_row"]["predicted"]) == 16
        assert counts(r) == (r["correct"], 16) and r["accuracy"] == r["correct"] / 16
        assert r["accuracy_se"] == pytest.approx(math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / 16)) == binomial_se(r["correct"], 16)
    assert dense["per_row"]["ids_sha256"] == igia["per_row"]["ids_sha256"]  # the same rows: a paired comparison
    # the choice worker agrees with `gradprune eval --metric choice` on the same checkpoint and rows
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "gradprune"), "eval", str(out / "sst2" / "igia@20%"), "--data", str(SHARED_DATA / "sst2"),
         "--metric", "choice", "--limit", "16", "--no-save", "-q"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert json.loads(cli.stdout.strip().splitlines()[-1])["value"] == igia["accuracy"]
    # the report's numbers are the records' numbers
    text = report.read_text()
    assert f"{100 * igia['accuracy']:.1f} ± {100 * igia['accuracy_se']:.1f}" in text
    lines = targets(records)
    assert any(line.startswith("- igia@20% within 1 point(s) of dense") for line in lines)
    c = cost(igia, dense)
    assert c["ratio"] == pytest.approx(igia["compress_seconds"] / dense["compress_seconds"])
    paired = compare(igia, dense)
    assert paired["paired"] and paired["delta"] == pytest.approx(100 * (igia["accuracy"] - dense["accuracy"]))
    assert f"{paired['delta']:+.1f} ± {paired['se']:.1f} (p {paired['p']:.2g})" in text
    # a rerun resumes: nothing left to do
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["arms"] == 2
    # another seed: its own checkpoints and records beside seed 0's, and a seed table at the end of the report
    seeded = subprocess.run([*cmd, "--seed", "1"], capture_output=True, text=True, timeout=1800)
    assert seeded.returncode == 0, seeded.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["arm"], r["seed"]) for r in rows) == [("dense", 0), ("dense", 1), ("igia@20%", 0), ("igia@20%", 1)]
    assert (out / "sst2" / "igia@20%-seed1" / "gradprune.json").is_file() and (out / "sst2" / "dense-seed1").is_dir()
    text = report.read_text()
    seed_rows = [line for line in text.splitlines() if line.startswith("| sst2 | dense |")]
    mean = (100 * rows[0]["accuracy"] + 100 * next(r for r in rows if r["arm"] == "dense" and r["seed"] == 1)["accuracy"]) / 2
    assert "## Seeds" in text and len(seed_rows) == 1 and f"| {mean:.1f} ± " in seed_rows[0]
    assert "## Paired tests vs dense, every seed" in text and "| sst2 | igia@20% | 1 |" in text
    assert all(r["device"] == "cpu" for r in rows) and "shared 2-core CPU" in text
    # --report-only rewrites the report from the records alone (how the GPU run's parts are merged): the same text
    rewritten = tmp_path / "again.md"
    only = subprocess.run([*cmd, "--seed", "1", "--report-only", "--report", str(rewritten)], capture_output=True, text=True)
    assert only.returncode == 0, only.stderr[-3000:]
    assert rewritten.read_text() == text
    missing = subprocess.run(
        [*cmd[:2], "--out", str(tmp_path / "none"), "--preset", "smoke", "--report-only"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "--report-only: no " in missing.stderr and not (tmp_path / "none").exists()


def test_spearman_matches_scipy_with_and_without_ties():
    rng = __import__("random").Random(0)
    for n in (3, 5, 9):
        x = [rng.random() for _ in range(n)]
        y = [rng.choice([0.1, 0.2, 0.3]) for _ in range(n)]  # ties
        assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert spearman([1.0, 2.0], [2.0, 1.0]) is None
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None


def test_predictors_read_the_ledger_and_the_judge_proposals():
    def arm(name, pruned, recovered, accuracy):
        points = [{"stage": s, "loss": v} for s, v in (("dense", 2.0), ("pruned", pruned), ("recovered", recovered))]
        return {"arm": name, "accuracy": accuracy, "test_rows": 200, "ledger": {"points": points}}

    records = [arm("igia@30%", 19.0, 0.24, 0.55), arm("block-influence@30%", 4.7, 0.20, 0.66), arm("last-n@30%", 17.0, 0.22, 0.60)]
    records.append({**arm("igia-kd@30%", 19.0, 0.5, 0.90), "extra": ["--distill"]})  # a different recovery: left out
    judge = {
        "arm": "judge@30%",
        "judge": ["igia", "block-influence"],
        "drop": 9,
        "proposals": [
            {"scorer": "igia", "dropped": [20, 21], "raw": {"loss": 19.0}, "healed": {"loss": 3.5}},
            {"scorer": "block-influence", "dropped": [3, 4], "raw": {"loss": 4.7}, "healed": None},
        ],
    }
    text = "\n".join(predictors([*records, judge]))
    assert "over 3 pruned arms with the same CE recovery: Spearman ρ(loss, −accuracy) = +1.00" in text
    assert "| igia | [20, 21] | 19.00 | 3.50 | 55.0 ± 3.5 |" in text  # SE from the counts, 110 of 200
    assert "| block-influence | [3, 4] | 4.70 | – | 66.0 ± 3.3 |" in text


def test_kendall_tau_and_dropped_overlap_against_scipy_and_by_hand():
    rng = __import__("random").Random(1)
    for _ in range(5):
        x = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(12)]
        y = [rng.random() for _ in range(12)]
        assert kendall_tau_b(x, y) == pytest.approx(kendalltau(x, y).statistic)
    assert lowest([3.0, 1.0, 1.0, 2.0], 2) == {1, 2} and lowest([1.0, 5.0, 1.0], 1) == {2}  # ties: the deeper layer
    rows = stability({1: [4.0, 3.0, 2.0, 1.0], 4: [1.0, 2.0, 3.0, 4.0]}, (2,))
    assert rows[0]["kendall_tau"] == pytest.approx(-1.0) and rows[0]["dropped_overlap"] == {"2": 0.0}
    assert rows[1]["kendall_tau"] == pytest.approx(1.0) and rows[1]["dropped"] == {"2": [0, 1]}
    assert rows[0]["kendall_tau_second_half"] is None  # no snapshot at half the run
    # the second half alone: final minus the snapshot at half the steps, a ranking no early step enters
    snaps = {1: [1.0, 2.0, 3.0], 2: [2.0, 3.0, 4.0], 4: [9.0, 4.0, 5.0]}
    assert second_half(snaps) == (2, [7.0, 1.0, 1.0])
    rows = stability(snaps, (1,))
    assert rows[0]["kendall_tau_second_half"] == pytest.approx(kendalltau([1.0, 2.0, 3.0], [7.0, 1.0, 1.0]).statistic)


def test_probe_snapshots_are_the_scores_after_that_many_informative_steps(tiny_llama_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir))
    features = tokenize_examples(read_examples(str(SHARED_DATA / "sst2" / "train.jsonl"), limit=24), tokenizer, max_length=64)
    s = TrainSettings(batch_size=4, max_steps=12, sampling="sequential", seed=0)
    short, _ = run_probe(model, features, tokenizer, s, probe_steps=2, keep_factors=False)
    long, _ = run_probe(model, features, tokenizer, s, probe_steps=4, keep_factors=False, snapshot_steps=(2, 4))
    assert sorted(long.snapshots) == [2, 4]
    assert long.snapshots[2] == pytest.approx(short.scores().tolist(), rel=1e-6)  # the same run, stopped earlier
    assert long.snapshots[4] == pytest.approx(long.scores().tolist())


def test_powered_runs_exactly_the_defaults_grid_on_one_thread(tmp_path):
    """--powered's plan (without running it): the grid's arms x tasks x seeds 0-2, one thread, a time estimate."""
    script = str(ROOT / "scripts" / "study" / "quality_study.py")
    results = tmp_path / "powered.jsonl"
    base = [sys.executable, script, "--out", str(tmp_path / "runs"), "--powered", "--results", str(results)]
    proc = subprocess.run([*base, "--dry-run"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    estimate, plan = proc.stdout.strip().splitlines()[-2], json.loads(proc.stdout.strip().splitlines()[-1])
    assert estimate.startswith("48 runs to do: ~4.5 h of compress")
    assert plan["threads"] == 1 and plan["drop_weights"] and plan["results"] == str(results) and not (tmp_path / "runs").exists()
    arms = {
        "dense",
        "igia-K0@20%",
        "igia@20%",
        "igia-K0-lora16@20%",
        "igia-lora16@20%",
        "igia-prunedlora16@20%",
        "igia-K0-prunedlora16@20%",
        "block-influence@20%",
    }
    assert {tuple(run) for run in plan["runs"]} == {(t, a, s) for t in ("sst2", "fin_headlines") for a in arms for s in (0, 1, 2)}
    assert [run[2] for run in plan["runs"]] == sorted(run[2] for run in plan["runs"])  # seed by seed
    # resumable: a run in the records is not planned again
    results.write_text(json.dumps({"task": "sst2", "arm": "dense", "seed": 0, "accuracy": 0.86}) + "\n")
    again = json.loads(subprocess.run([*base, "--dry-run"], capture_output=True, text=True, timeout=300).stdout.strip().splitlines()[-1])
    assert len(again["runs"]) == 47 and ["sst2", "dense", 0] not in again["runs"]
    # the grid is fixed
    bad = subprocess.run([*base, "--arms", "dense", "igia-K2@20%", "--dry-run"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--powered runs a fixed grid (powered.py): its --arms are dense " in bad.stderr
    assert bad.stderr.rstrip().endswith("drop igia-K2@20%")
    # one task of the grid per process (a core each), nothing outside it
    part = subprocess.run([*base, "--tasks", "sst2", "--seed", "2", "1", "--dry-run"], capture_output=True, text=True, timeout=300)
    runs = json.loads(part.stdout.strip().splitlines()[-1])["runs"]
    assert {(run[0], run[2]) for run in runs} == {("sst2", 1), ("sst2", 2)} and len(runs) == 2 * len(arms)
    bad = subprocess.run([*base, "--tasks", "pubmedqa", "--dry-run"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "its --tasks are sst2 fin_headlines; drop pubmedqa" in bad.stderr
    # the gpu preset: the same grid, its own records and report, threads inherited
    gpu = subprocess.run([*base[:-2], "--preset", "gpu", "--arms", "dense", "--dry-run"], capture_output=True, text=True, timeout=300)
    plan = json.loads(gpu.stdout.strip().splitlines()[-1])
    assert plan["results"].endswith("docs/study-records/powered-gpu.jsonl") and plan["threads"] is None and plan["drop_weights"]
    assert len(plan["runs"]) == 6 and not gpu.stdout.startswith("6 runs to do")


def test_phase_seconds_sum_seconds_only_and_fit_inside_the_wall_time(tiny_llama_dir, tmp_path):
    """From a real gradprune.json (timings carry `<phase>_peak_mb` beside `<phase>_seconds`): the cost ratio's phases
    are seconds only, so they fit inside the run's total; rederive_seconds repairs a record that summed megabytes."""
    out = tmp_path / "study" / "sst2" / "igia@20%"
    args = ["compress", "--model", str(tiny_llama_dir), "--data", str(SHARED_DATA / "sst2" / "train.jsonl"), "--max-examples", "40"]
    assert main([*args, "--max-length", "64", "--max-steps", "2", "--probe-steps", "2", "--drop-layers", "1", "--out", str(out), "-q"]) == 0
    timings = json.loads((out / "gradprune.json").read_text())["timings"]
    assert any(k.endswith("_peak_mb") and k.startswith("score_") for k in timings)
    fields = phase_seconds(timings)
    per_scorer = [v for k, v in timings.items() if k.startswith("score_") and k.endswith("_seconds") and k != "score_seconds"]
    assert per_scorer and fields["score_seconds"] == pytest.approx(sum(per_scorer))
    assert fields["compress_seconds"] == pytest.approx(fields["score_seconds"] + timings["surgery_seconds"] + timings["finetune_seconds"])
    assert fields["compress_seconds"] <= timings["total_seconds"]
    old = {"task": "sst2", "arm": "igia@20%", "seed": 0, "score_seconds": 4000.0, "surgery_seconds": 0.1, "compress_seconds": 4100.0}
    records = [old, {"task": "sst2", "arm": "dense", "seed": 0, "compress_seconds": 9.0}]
    assert rederive(records, tmp_path / "study") == 1
    assert records[0]["compress_seconds"] == pytest.approx(fields["compress_seconds"]) and records[1]["compress_seconds"] == 9.0
