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
`--preset gpu` runs every arm on all three tasks, `--seed N [M ...]` reruns arms with other seeds, and `--powered` runs
the defaults comparison (powered.py: K in {0, 1} x rank in {8, 16} and PrunedLoRA 16 -> 8, block-influence's cut
beside them, three seeds, one thread).
For each arm: test accuracy ± SE (from the counts k of n), each test row's outcome (paired.per_row_record: the
report compares arms row by row, exact McNemar and a paired bootstrap), test completion loss, the checkpoint's held-out ledger
(validation rows sliced from the training file, never trained on), wall time per phase from
gradprune.json, the process's peak RSS, parameters. Compress cost = probe/scoring + surgery +
recovery seconds over the dense fine-tune's seconds, beside the pruned/dense step-time ratio.

Each arm is a subprocess; checkpoints go under OUT (runs/, not committed), and the records append to --results,
by default docs/study-records/results-<preset>.jsonl (committed, so every number in the report can be traced to a
record; smoke: OUT/results.jsonl), and a rerun resumes. The report (--report, docs/study.md by default) is
rewritten after every arm; ends with one JSON line.

    .venv/bin/python scripts/study/quality_study.py --out runs/quality-study          # CPU preset
    .venv/bin/python scripts/study/quality_study.py --out runs/powered --powered      # the defaults comparison
    .venv/bin/python scripts/study/quality_study.py --out runs/smoke --preset smoke   # minutes
"""

from __future__ import annotations

import argparse
import json
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
from gradprune_deploy.evaluation.evaluate import evaluate_model
from gradprune_deploy.loading import load_model_and_tokenizer
from gradprune_deploy.utils import peak_rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parent))  # study_report lives beside this script
from paired import binomial_se, per_row_record  # noqa: E402
from powered import POWERED_ARMS, POWERED_REPORT, POWERED_RESULTS, POWERED_SEEDS, POWERED_TASKS, estimate_line, powered_paths  # noqa: E402
from study_arms import ARMS, CPU_ARMS, DEFAULT_TASKS, PRESETS, TASK_MIN_LENGTH  # noqa: E402
from study_report import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
GRADPRUNE = str(Path(sys.executable).parent / "gradprune")
NUM_LAYERS = 30  # SmolLM2-135M


def run_measured(cmd: list[str]) -> dict:
    """Run a subprocess (in this process's environment: --threads sets OMP_NUM_THREADS there); its wall seconds,
    peak RSS (polled every 0.1 s) and stdout."""
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


def choice_worker(checkpoint: str, data: str, limit: int) -> None:
    """`gradprune eval --metric choice --limit N`'s code path (evaluate_model on the test split, float32), printing the
    summary with each row's outcome: the CLI's own result keeps only the totals."""
    examples = read_examples(data, split="test", limit=limit)
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    if torch.cuda.is_available():
        model.to("cuda")
    summary, rows = evaluate_model(model.eval(), tokenizer, examples, metric="choice", batch_size=8)
    per_row = per_row_record(
        [ex.id or ex.prompt for ex in examples],
        [row["pred"] == row["gold"] for row in rows],
        [ex.choices.index(row["pred"]) for ex, row in zip(examples, rows)],
    )
    print(json.dumps({"value": summary["value"], "n": len(examples), "per_row": per_row}))


def phase_seconds(timings: dict) -> dict:
    """Pure: the compress phases the cost ratio counts, from gradprune.json's timings (each phase has `<phase>_seconds`
    and, since the scale work, `<phase>_peak_mb`: only the seconds are summed). Scoring = every scorer's own seconds
    (auto judges several), else the phase's."""
    seconds = {k: v for k, v in timings.items() if k.endswith("_seconds")}
    score = sum(v for k, v in seconds.items() if k.startswith("score_") and k != "score_seconds") or seconds.get("score_seconds", 0)
    surgery = seconds.get("surgery_seconds", 0)
    total = score + surgery + seconds.get("compensate_seconds", 0) + seconds.get("finetune_seconds", 0)
    return {"score_seconds": score, "surgery_seconds": surgery, "compress_seconds": total}


def checkpoint_dir(out: Path, task: str, arm: str, seed: int) -> Path:
    """Where an arm's checkpoint goes: seed 0 keeps the plain names (earlier records); another seed gets its own
    checkpoints, teacher included."""
    return out / task / (arm if seed == 0 else f"{arm}-seed{seed}")


def run_arm(arm: dict, task: str, out: Path, preset: tuple, seed: int) -> dict:
    rows, steps, test_rows, max_length = preset
    max_length = max(max_length, TASK_MIN_LENGTH.get(task, 0)) if preset != PRESETS["smoke"] else max_length
    ckpt, train_file = checkpoint_dir(out, task, arm["arm"], seed), SHARED / task / "train.jsonl"
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
            "--finetune",  # the recovery every arm without its own used (plain LoRA, the default): pinned so that the
            "lora",  # records keep their meaning if the default changes; an arm's --finetune in extra comes later and wins
            "-q",
            *(
                ["--scorer", "auto", "--auto-candidates", *arm["judge"], "--finetune", "none"]
                if "judge" in arm
                else ["--scorer", arm["scorer"]]
            ),
            *(a.replace("{dense}", str(checkpoint_dir(out, task, "dense", seed))) for a in arm.get("extra", [])),
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
    choice = last_json(run_measured([sys.executable, __file__, "--choice-worker", str(ckpt), str(SHARED / task), str(test_rows)])["stdout"])
    loss_cmd = [GRADPRUNE, "eval", str(ckpt), "--data", str(SHARED / task), "--metric", "loss", "--limit", str(test_rows)]
    loss = last_json(run_measured([*loss_cmd, "--batch-size", "8", "-q"])["stdout"])
    n, per_row = choice["n"], choice["per_row"]
    correct = per_row["correct"].count("1")
    record.update(
        accuracy=correct / n,
        correct=correct,
        accuracy_se=binomial_se(correct, n),
        test_rows=n,
        per_row=per_row,
        test_loss=loss["value"],
    )
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
        record.update(
            params=m["params_after"],
            layers_dropped=m["layers_dropped"],
            merge_targets=m["merge"]["targets"],
            finetune_seconds=m["finetune"]["seconds"],
            finetune_steps=m["finetune"]["steps"],
            **phase_seconds(m["timings"]),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quality-study", help="where the checkpoints go (runs/ is not committed)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--tasks", nargs="+", default=None, help="default: the preset's (DEFAULT_TASKS)")
    parser.add_argument("--arms", nargs="+", default=None, help="only these arms (names in ARMS; default: CPU_ARMS on cpu, all otherwise)")
    parser.add_argument("--seed", type=int, nargs="+", default=None, help="seeds to run, each into its own checkpoints (default 0)")
    parser.add_argument(
        "--powered",
        action="store_true",
        help=f"the defaults comparison (powered.py): its arms on {' and '.join(POWERED_TASKS)}, seeds "
        f"{' '.join(map(str, POWERED_SEEDS))}, cpu preset, one thread; records {POWERED_RESULTS}, report {POWERED_REPORT} "
        "(--preset gpu: its own records and report beside them); --tasks, --seed and --arms narrow it to a part of the grid",
    )
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every arm (default: inherited; --powered: 1)")
    parser.add_argument(
        "--results",
        default=None,
        help="the records, JSON lines (default docs/study-records/results-PRESET.jsonl; smoke: OUT/results.jsonl)",
    )
    parser.add_argument("--report", default=None, help=f"default docs/study.md (--powered: {POWERED_REPORT})")
    parser.add_argument("--report-only", action="store_true", help="rewrite --report from --results and run nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the runs still to do (and --powered's time estimate); run nothing")
    parser.add_argument(
        "--drop-weights",
        action="store_true",
        help="delete an arm's *.safetensors once it is scored, keeping gradprune.json (--powered: on; its 48 checkpoints "
        "would take ~25 GB)",
    )
    return parser


def resolve_powered(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--powered: the grid of powered.py; --tasks / --seed / --arms narrow it to a part (one process per core, or a
    GPU call's time limit), never beyond it. cpu: one thread per arm; gpu: records and report of their own."""
    if args.preset not in ("cpu", "gpu"):
        parser.error("--powered runs at the cpu or the gpu preset: drop --preset smoke")
    grid = {"--tasks": (args.tasks, POWERED_TASKS), "--seed": (args.seed, POWERED_SEEDS), "--arms": (args.arms, POWERED_ARMS)}
    for flag, (given, full) in grid.items():
        outside = sorted(map(str, set(given or []) - set(full)))
        if outside:
            parser.error(f"--powered runs a fixed grid (powered.py): its {flag} are {' '.join(map(str, full))}; drop {', '.join(outside)}")
    # the grid's order, whatever order the part was given in
    args.tasks, args.seed, args.arms = ([x for x in full if not given or x in given] for given, full in grid.values())
    if args.preset == "cpu":
        args.threads = 1 if args.threads is None else args.threads
    args.drop_weights = True


def resolve_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments with --powered's grid and the defaults that depend on the preset filled in."""
    args = parser.parse_args()
    if args.powered:
        resolve_powered(parser, args)
    names = {a["arm"] for a in ARMS}
    unknown = sorted(set(args.arms or []) - names)
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}: choose from {', '.join(sorted(names))}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    teachers = [a["arm"] for a in ARMS if a["arm"] in (args.arms or []) and "{dense}" in a.get("extra", [])]
    if args.drop_weights and teachers:
        parser.error(f"--drop-weights deletes the dense checkpoint that {', '.join(teachers)} distil(s) from: drop one of them")
    args.seed = args.seed or [0]
    if args.results is None:
        committed = ROOT / (powered_paths(args.preset)[0] if args.powered else f"docs/study-records/results-{args.preset}.jsonl")
        args.results = str(Path(args.out) / "results.jsonl" if args.preset == "smoke" else committed)
    args.report = args.report or str(ROOT / (powered_paths(args.preset)[1] if args.powered else "docs/study.md"))
    preset = f" --preset {args.preset}" if args.preset != "cpu" or not args.powered else ""
    args.command = f"--out {args.out}{' --powered' if args.powered else ''}{preset}"
    return args


def run_worker(argv: list[str]) -> None:
    """The subprocesses an arm starts: --dense-worker (the dense fine-tune) and --choice-worker (per-row accuracy)."""
    os.environ.setdefault("GRADPRUNE_DISABLE_PROGRESS_BARS", "1")
    if argv[0] == "--choice-worker":
        checkpoint, data, limit = argv[1:4]
        choice_worker(checkpoint, data, int(limit))
        return
    out, train_file, rows, steps, max_length, seed = argv[1:7]
    dense_worker(out, train_file, int(rows), int(steps), int(max_length), int(seed))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--dense-worker", "--choice-worker"):
        run_worker(sys.argv[1:])
        return
    parser = build_parser()
    args = resolve_args(parser)
    results_path = Path(args.results)
    report = {"preset": PRESETS[args.preset], "preset_name": args.preset, "command": args.command}
    if args.report_only:
        if not results_path.is_file():
            parser.error(f"--report-only: no {results_path}; run the study first or give the --results it wrote to")
        results = read_results(results_path)
        write_report(results, Path(args.report), **report)
        print(json.dumps({"report": args.report, "arms": len(results)}))
        return
    if args.threads is not None:  # every arm's processes inherit it (torch reads it at start-up)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    out = Path(args.out)
    done = {(r["task"], r["arm"], r.get("seed", 0)) for r in read_results(results_path)}
    wanted = args.arms or (CPU_ARMS if args.preset == "cpu" else [a["arm"] for a in ARMS])
    tasks = args.tasks or DEFAULT_TASKS[args.preset]
    # seed by seed: an interrupted grid has whole seeds (each arm beside the dense run of its seed)
    todo = [(arm, task, seed) for seed in args.seed for arm in ARMS for task in tasks if arm["arm"] in wanted]
    todo = [(arm, task, seed) for arm, task, seed in todo if (task, arm["arm"], seed) not in done]
    if args.powered and args.preset == "cpu":  # the estimate is from CPU seconds
        print(estimate_line([(task, arm["arm"], seed) for arm, task, seed in todo]), flush=True)
    if args.dry_run:
        runs = [[task, arm["arm"], seed] for arm, task, seed in todo]
        print(json.dumps({"results": str(results_path), "threads": args.threads, "drop_weights": args.drop_weights, "runs": runs}))
        return
    out.mkdir(parents=True, exist_ok=True)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    failed = run_plan(todo, args, report)
    summary = {"results": str(results_path), "arms": len(read_results(results_path)), "failed": failed}
    print(json.dumps({**summary, "minutes_this_run": round((time.perf_counter() - started) / 60, 1)}))
    if failed:
        sys.exit(1)


def run_plan(todo: list[tuple[dict, str, int]], args: argparse.Namespace, report: dict) -> list[str]:
    """Run each (arm, task, seed), appending its record and rewriting the report after each; the failed runs."""
    out, results_path = Path(args.out), Path(args.results)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"  # recorded beside every timing
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    failed = []
    for arm, task, seed in todo:
        print(f"[{time.strftime('%H:%M:%S')}] {task} {arm['arm']} seed {seed}", flush=True)
        try:
            record = run_arm(arm, task, out, PRESETS[args.preset], seed)
        except RuntimeError as exc:  # one arm's failure must not cost the others; no record, so a rerun retries it
            print(f"FAILED {task} {arm['arm']} seed {seed}: {exc}", file=sys.stderr, flush=True)
            failed.append(f"{task}/{arm['arm']}/seed{seed}")
            continue
        record.update(preset=args.preset, seed=seed, threads=threads, device=device)
        with results_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if args.drop_weights:  # the record holds what the study needs; the weights are ~0.5 GB per arm
            for weights in checkpoint_dir(out, task, arm["arm"], seed).glob("*.safetensors"):
                weights.unlink()
        write_report(read_results(results_path), Path(args.report), **report)
    return failed


if __name__ == "__main__":
    main()
