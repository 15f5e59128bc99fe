"""The quality study: does a GradPruner checkpoint keep its accuracy, and what does it cost?

Per task (sst2, fin_headlines, pubmedqa from ../shared/data) with SmolLM2-135M-Instruct, every arm gets
the same recovery budget as the dense LoRA fine-tune (`--steps` optimizer steps of batch 8 on the
same training rows) and is scored on the same test rows by choice log-likelihood:
- dense: LoRA fine-tune of the unpruned model (the reference), zero-shot accuracy beside it;
- GradPruner (igia) at 20/30/40% of layers removed, merging K=1 dropped layer (the default);
- baselines: block-influence, last-n, ppl, gblm, gradmap, taylor, random, and `--scorer auto`;
- ablations: merge K (0, 1, 2, 3, all), the merge criterion (igia, gblm), keep-top-p, the probe floor;
  recovery variants: distillation (two teachers, alpha, T, equal wall time), PrunedLoRA, compensation,
  full fine-tuning.
The cpu preset runs CPU_ARMS on sst2 and fin_headlines (~2.3 h here); `--arms`/`--tasks` pick others,
`--preset gpu` runs every arm on all three tasks, `--seed N` reruns arms with another seed.
For each arm: test accuracy ± SE, test completion loss, the checkpoint's held-out ledger
(validation rows sliced from the training file, never trained on), wall time per phase from
gradprune.json, the process's peak RSS, parameters. Compress cost = probe/scoring + surgery +
recovery seconds over the dense fine-tune's seconds, beside the pruned/dense step-time ratio.

Each arm is a subprocess; results append to OUT/results.jsonl and a rerun resumes. The report
(docs/results.md's study section by default) is rewritten after every arm; ends with one JSON line.

    .venv/bin/python scripts/study/quality_study.py --out runs/quality-study          # CPU preset
    .venv/bin/python scripts/study/quality_study.py --out runs/smoke --preset smoke   # minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from gradprune_deploy.compress.finetune import TrainSettings, recovery_finetune
from gradprune_deploy.compress.ledger import split_slice
from gradprune_deploy.data import read_examples, tokenize_examples
from gradprune_deploy.loading import load_model_and_tokenizer
from gradprune_deploy.utils import peak_rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parent))  # study_report lives beside this script
from study_report import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
GRADPRUNE = str(Path(sys.executable).parent / "gradprune")
NUM_LAYERS = 30  # SmolLM2-135M

# (training rows read from train.jsonl incl. the 10% validation slice, optimizer steps, test rows, max tokens)
# gpu: the full preset (every training row up to 4000, 500 steps, the whole test split) for a GPU machine.
PRESETS = {"cpu": (900, 100, 200, 128), "gpu": (4000, 500, 1000, 256), "smoke": (48, 4, 16, 96)}
# pubmedqa's prompts (abstract + question) run to ~360 tokens (90th percentile ~500): 128 would drop them.
TASK_MIN_LENGTH = {"pubmedqa": 512}
# What a run without --tasks/--arms does. cpu: the arms behind the quality targets on the two short-prompt tasks;
# their sst2 runs took 68 min in all here, and the fin_headlines arms that ran alone took 0.7-1.2x their sst2
# counterparts, so ~2.3 h (2.5 h at 1.2x). pubmedqa's 512-token arms take ~7x longer, and at this preset its dense fine-tune does
# not beat the majority label (54.0%, majority 54.0%). gpu: every arm on every task.
DEFAULT_TASKS = {"cpu": ["sst2", "fin_headlines"], "gpu": ["sst2", "fin_headlines", "pubmedqa"], "smoke": ["sst2"]}
CPU_ARMS = ["dense", "igia@20%", "block-influence@20%", "igia@30%", "block-influence@30%", "last-n@30%", "ppl@30%", "igia@40%"]
# Arms in priority order: an interrupted study has the targets' arms first.
ARMS = [
    {"arm": "dense"},
    {"arm": "igia@20%", "scorer": "igia", "drop": 6},
    {"arm": "igia@30%", "scorer": "igia", "drop": 9},
    {"arm": "block-influence@30%", "scorer": "block-influence", "drop": 9},
    # the teacher that knows the task: this study's dense LoRA fine-tune ({dense} = OUT/<task>/dense)
    {"arm": "igia-kd-ft@20%", "scorer": "igia", "drop": 6, "extra": ["--distill", "--teacher", "{dense}"]},
    {"arm": "igia-K2@20%", "scorer": "igia", "drop": 6, "extra": ["--merge-layers", "2"]},
    # a 2-step probe floor (later flags win over the pinned 8): cost vs quality of the merge
    {"arm": "igia-probe2@20%", "scorer": "igia", "drop": 6, "extra": ["--probe-min-steps", "2"]},
    {"arm": "last-n@30%", "scorer": "last-n", "drop": 9},
    # ablations at 20%, where the pruned model still works: merge K and distillation at equal steps
    {"arm": "igia-K0@20%", "scorer": "igia", "drop": 6, "extra": ["--merge-layers", "none"]},
    {"arm": "igia-kd@20%", "scorer": "igia", "drop": 6, "extra": ["--distill"]},
    {"arm": "block-influence@20%", "scorer": "block-influence", "drop": 6},
    # what `--scorer auto` sees of each scorer's cut (raw and after a 10-step heal, no recovery), to
    # check its criterion against the arms' post-recovery accuracy
    {"arm": "judge@30%", "judge": ["igia", "block-influence", "last-n", "ppl"], "drop": 9},
    {"arm": "judge@20%", "judge": ["igia", "block-influence"], "drop": 6},
    {"arm": "ppl@30%", "scorer": "ppl", "drop": 9},
    # the other seed papers' methods on GradPruner's cut
    {"arm": "igia-prunedlora@20%", "scorer": "igia", "drop": 6, "extra": ["--finetune", "prunedlora"]},
    {"arm": "igia-compensate@20%", "scorer": "igia", "drop": 6, "extra": ["--compensate"]},
    {"arm": "igia@40%", "scorer": "igia", "drop": 12},
    {"arm": "igia-kd@30%", "scorer": "igia", "drop": 9, "extra": ["--distill"]},
    {"arm": "igia-K0@30%", "scorer": "igia", "drop": 9, "extra": ["--merge-layers", "none"]},
    {"arm": "igia-K2@30%", "scorer": "igia", "drop": 9, "extra": ["--merge-layers", "2"]},
    # the paper's sparsity range (keep 10-50% of the merged layer's entries; default 20%) and K = 3
    {"arm": "igia-p10@20%", "scorer": "igia", "drop": 6, "extra": ["--keep-top-p", "0.1"]},
    {"arm": "igia-p50@20%", "scorer": "igia", "drop": 6, "extra": ["--keep-top-p", "0.5"]},
    {"arm": "igia-K3@20%", "scorer": "igia", "drop": 6, "extra": ["--merge-layers", "3"]},
    # distillation tuning with the fine-tuned teacher (the default arm: alpha 0.5, T 1): KL-heavy mix, a softer
    # temperature, and equal wall time (68 steps ~ 100 CE steps at the measured 1.46x step cost)
    {"arm": "igia-kd-ft-wall@20%", "scorer": "igia", "drop": 6, "extra": ["--distill", "--teacher", "{dense}", "--max-steps", "68"]},
    {"arm": "igia-kd-ft-a09@20%", "scorer": "igia", "drop": 6, "extra": ["--distill", "--teacher", "{dense}", "--distill-alpha", "0.9"]},
    {"arm": "igia-kd-ft-T2@20%", "scorer": "igia", "drop": 6, "extra": ["--distill", "--teacher", "{dense}", "--distill-temperature", "2"]},
    # full fine-tuning as the recovery (same steps; its own default learning rate)
    {"arm": "igia-full@20%", "scorer": "igia", "drop": 6, "extra": ["--finetune", "full"]},
    # the remaining layer scorers at 20% (the cut where the pruned model still works), and auto's pick
    {"arm": "gblm@20%", "scorer": "gblm", "drop": 6},
    {"arm": "random@20%", "scorer": "random", "drop": 6},
    {"arm": "gradmap@20%", "scorer": "gradmap", "drop": 6},
    {"arm": "taylor@20%", "scorer": "taylor", "drop": 6},
    {"arm": "auto@20%", "scorer": "auto", "drop": 6},
    # the merge: GBLM-Pruner's metric ranks the merged entries; and every dropped layer merged
    {"arm": "igia-gblm-merge@20%", "scorer": "igia", "drop": 6, "extra": ["--merge-criterion", "gblm"]},
    {"arm": "igia-Kall@20%", "scorer": "igia", "drop": 6, "extra": ["--merge-layers", "all"]},
    {"arm": "block-influence@40%", "scorer": "block-influence", "drop": 12},
    # PrunedLoRA at the authors' pace within 100 steps: 16 -> 8 is 2 components every 10 steps, done by step 40
    {"arm": "igia-prunedlora16@20%", "scorer": "igia", "drop": 6, "extra": ["--finetune", "prunedlora", "--prunedlora-start-rank", "16"]},
    {"arm": "igia-compensate@30%", "scorer": "igia", "drop": 9, "extra": ["--compensate"]},
    {"arm": "igia-prunedlora16@30%", "scorer": "igia", "drop": 9, "extra": ["--finetune", "prunedlora", "--prunedlora-start-rank", "16"]},
    # the control for PrunedLoRA 16 -> 8: plain LoRA at rank 16 (alpha/rank as at rank 8; the probe runs at rank 16 too)
    {"arm": "igia-lora16@20%", "scorer": "igia", "drop": 6, "extra": ["--lora-r", "16", "--lora-alpha", "32"]},
]


def run_measured(cmd: list[str]) -> dict:
    """Run a subprocess; its wall seconds, peak RSS (polled every 0.1 s) and stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    with ThreadPoolExecutor(2) as pool:
        out_f, err_f = pool.submit(proc.stdout.read), pool.submit(proc.stderr.read)
        while proc.poll() is None:
            peak = max(peak, peak_rss_mb(proc.pid) or 0.0)
            time.sleep(0.1)
        stdout, stderr = out_f.result(), err_f.result()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak, 1), "stdout": stdout}


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def dense_worker(out: str, train_file: str, rows: int, steps: int, max_length: int, seed: int) -> None:
    """The dense reference: the same LoRA fine-tune (rows, steps, settings) without any pruning."""
    examples = read_examples(train_file, limit=rows)
    train_idx, _ = split_slice(len(examples), fraction=0.1, max_rows=128, seed=seed)  # as compress holds out
    model, tokenizer = load_model_and_tokenizer("bundled:SmolLM2-135M-Instruct")
    features = tokenize_examples([examples[i] for i in train_idx], tokenizer, max_length=max_length)
    settings = TrainSettings(batch_size=8, max_steps=steps, seed=seed)
    model, stats = recovery_finetune(model, features, tokenizer, settings, mode="lora")
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    (Path(out) / "dense.json").write_text(json.dumps({"finetune": stats, "params": params}))


def run_arm(arm: dict, task: str, out: Path, preset: tuple, seed: int) -> dict:
    rows, steps, test_rows, max_length = preset
    max_length = max(max_length, TASK_MIN_LENGTH.get(task, 0)) if preset != PRESETS["smoke"] else max_length
    # seed 0 keeps the plain names (earlier records); another seed gets its own checkpoints, teacher included
    suffix = "" if seed == 0 else f"-seed{seed}"
    ckpt, train_file = out / task / f"{arm['arm']}{suffix}", SHARED / task / "train.jsonl"
    if arm["arm"] == "dense":
        cmd = [sys.executable, __file__, "--dense-worker", str(ckpt), str(train_file), str(rows), str(steps), str(max_length), str(seed)]
    else:
        cmd = [
            GRADPRUNE,
            "compress",
            "--out",
            str(ckpt),
            "--overwrite",
            "--data",
            str(train_file),
            "--max-examples",
            str(rows),
            "--max-steps",
            str(steps),
            "--batch-size",
            "8",
            "--max-length",
            str(max_length),
            "--seed",
            str(seed),
            "--drop-layers",
            str(arm["drop"]),
            "--probe-min-steps",  # the floor every arm of this study used (the default)
            "8",
            "-q",
            *(
                ["--scorer", "auto", "--auto-candidates", *arm["judge"], "--finetune", "none"]
                if "judge" in arm
                else ["--scorer", arm["scorer"]]
            ),
            *(a.replace("{dense}", str(out / task / f"dense{suffix}")) for a in arm.get("extra", [])),
        ]
    measured = run_measured(cmd)
    record = {
        "task": task,
        **{k: v for k, v in arm.items() if k != "extra"},
        "extra": arm.get("extra", []),
        "seconds": measured["seconds"],
        "peak_rss_mb": measured["peak_rss_mb"],
    }
    if "judge" in arm:  # no recovery, nothing to test: the proposals are the result
        m = json.loads((ckpt / "gradprune.json").read_text())
        record["proposals"] = m["proposals"]
        return record
    evals = {}
    for metric in ("choice", "loss"):
        evals[metric] = last_json(
            run_measured(
                [
                    GRADPRUNE,
                    "eval",
                    str(ckpt),
                    "--data",
                    str(SHARED / task),
                    "--metric",
                    metric,
                    "--limit",
                    str(test_rows),
                    "--batch-size",
                    "8",
                    "-q",
                ]
            )["stdout"]
        )
    n = evals["choice"]["n"]
    acc = evals["choice"]["value"]
    record.update(accuracy=acc, accuracy_se=math.sqrt(acc * (1 - acc) / n), test_rows=n, test_loss=evals["loss"]["value"])
    if arm["arm"] == "dense":
        dense = json.loads((ckpt / "dense.json").read_text())
        record.update(
            params=dense["params"],
            finetune_seconds=dense["finetune"]["seconds"],
            finetune_steps=steps,
            compress_seconds=dense["finetune"]["seconds"],
        )
        zero = last_json(
            run_measured(
                [
                    GRADPRUNE,
                    "eval",
                    "bundled:SmolLM2-135M-Instruct",
                    "--data",
                    str(SHARED / task),
                    "--metric",
                    "choice",
                    "--limit",
                    str(test_rows),
                    "--batch-size",
                    "8",
                    "-q",
                ]
            )["stdout"]
        )
        record["zero_shot_accuracy"] = zero["value"]
        record["majority_share"] = max(c / n for c in _label_counts(SHARED / task, test_rows).values())
    else:
        m = json.loads((ckpt / "gradprune.json").read_text())
        t = m["timings"]
        score_s = sum(v for k, v in t.items() if k.startswith("score_") and k != "score_seconds") or t.get("score_seconds", 0)
        record.update(
            params=m["params_after"],
            layers_dropped=m["layers_dropped"],
            merge_targets=m["merge"]["targets"],
            finetune_seconds=m["finetune"]["seconds"],
            finetune_steps=m["finetune"]["steps"],
            score_seconds=score_s,
            surgery_seconds=t.get("surgery_seconds", 0),
            compress_seconds=score_s + t.get("surgery_seconds", 0) + t.get("compensate_seconds", 0) + t.get("finetune_seconds", 0),
            ledger=m["quality"],
            probe=m["scoring"] if m["scorer"] == "igia" else None,
        )
    return record


def _label_counts(task_dir: Path, limit: int) -> dict:
    counts: dict[str, int] = {}
    with (task_dir / "test.jsonl").open() as fh:
        for i, line in enumerate(fh):
            if i >= limit:
                break
            label = json.loads(line)["completion"]
            counts[label] = counts.get(label, 0) + 1
    return counts


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--dense-worker":
        out, train_file, rows, steps, max_length, seed = sys.argv[2:8]
        os.environ.setdefault("GRADPRUNE_DISABLE_PROGRESS_BARS", "1")
        dense_worker(out, train_file, int(rows), int(steps), int(max_length), int(seed))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quality-study")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--tasks", nargs="+", default=None, help="default: the preset's (DEFAULT_TASKS)")
    parser.add_argument("--arms", nargs="+", default=None, help="only these arms (names in ARMS; default: CPU_ARMS on cpu, all otherwise)")
    parser.add_argument("--seed", type=int, default=0, help="another seed reruns the arms beside seed 0's (own checkpoints)")
    parser.add_argument("--report", default=str(ROOT / "docs" / "study.md"))
    parser.add_argument("--report-only", action="store_true", help="rewrite --report from OUT/results.jsonl and run nothing")
    args = parser.parse_args()
    names = {a["arm"] for a in ARMS}
    unknown = sorted(set(args.arms or []) - names)
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}: choose from {', '.join(sorted(names))}")
    out = Path(args.out)
    results_path = out / "results.jsonl"
    if args.report_only:
        if not results_path.is_file():
            parser.error(f"--report-only: no {results_path}; run the study first or give the --out it wrote to")
        results = read_results(results_path)
        write_report(results, Path(args.report), preset=PRESETS[args.preset], preset_name=args.preset, out_dir=args.out)
        print(json.dumps({"report": args.report, "arms": len(results)}))
        return
    out.mkdir(parents=True, exist_ok=True)
    done = {(r["task"], r["arm"], r.get("seed", 0)) for r in read_results(results_path)}
    wanted = args.arms or (CPU_ARMS if args.preset == "cpu" else sorted(names))
    tasks = args.tasks or DEFAULT_TASKS[args.preset]
    plan = [(arm, task) for arm in ARMS for task in tasks if arm["arm"] in wanted]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"  # recorded beside every timing
    started, failed = time.perf_counter(), []
    for arm, task in plan:
        if (task, arm["arm"], args.seed) in done:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {task} {arm['arm']} seed {args.seed}", flush=True)
        try:
            record = run_arm(arm, task, out, PRESETS[args.preset], args.seed)
        except RuntimeError as exc:  # one arm's failure must not cost the others; no record, so a rerun retries it
            print(f"FAILED {task} {arm['arm']}: {exc}", file=sys.stderr, flush=True)
            failed.append(f"{task}/{arm['arm']}")
            continue
        record.update(preset=args.preset, seed=args.seed, threads=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())), device=device)
        with results_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        write_report(read_results(results_path), Path(args.report), preset=PRESETS[args.preset], preset_name=args.preset, out_dir=args.out)
    print(
        json.dumps(
            {
                "results": str(results_path),
                "arms": len(read_results(results_path)),
                "minutes_this_run": round((time.perf_counter() - started) / 60, 1),
                "failed": failed,
            }
        )
    )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
