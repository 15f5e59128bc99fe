"""The accuracy study (issue 5): GradPruner vs other layer scorers vs the dense fine-tuned model,
on the three tasks in ../shared/data, with SmolLM2-135M-Instruct.

What it measures, per task (pubmedqa, fin_headlines, sst2):
- dense LoRA fine-tune (the upper bound) and, for every scorer (igia = GradPruner, block-influence,
  last-n, random, gradmap, taylor) at every cut (20/30/40% of layers), `gradprune compress` with the
  same recovery fine-tune budget; igia also without the same-sign merge, and with keep-top-p 10/50%
  at the 30% cut;
- for every arm: test accuracy by choice log-likelihood (`gradprune eval --metric choice`), wall time
  and peak RSS of the fine-tune/compress process (that subprocess's own VmHWM), parameters;
- Kendall τ between the IGIA layer ranking after the probe (~1% of the epoch, at least
  --probe-min-steps) and after the whole first epoch;
- the probe's overhead: IGIA callback seconds / probe seconds (from each gradprune.json).

Every arm is a subprocess, so timings and memory are per arm; results are appended to
OUT/results.jsonl and the study resumes where it stopped. It writes the tables and plots to
--report (docs/results.md by default) and ends with one JSON line.

    .venv/bin/python examples/accuracy_study.py --out runs/study            # CPU preset (measured: 147.5 min on 2 cores)
    .venv/bin/python examples/accuracy_study.py --out runs/study --preset full   # full splits (GPU)
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
GRADPRUNE = str(Path(sys.executable).parent / "gradprune")
TASKS = ("pubmedqa", "fin_headlines", "sst2")
SCORERS = ("igia", "block-influence", "last-n", "random", "gradmap", "taylor")
CUTS = (0.2, 0.3, 0.4)

# Fixed, documented subsets: (train rows, test rows, max tokens, batch size) per task. The first
# rows of each file are taken (the files are already shuffled). The CPU preset was sized for the
# issue's 2-hour budget on 2 cores (~75-150 s per arm, so not every scorer at every cut; see
# CPU_SCORERS_AT_ALL_CUTS); measured, with evaluation, it took 147.5 min (docs/results.md).
PRESETS = {
    "cpu": {"sst2": (96, 150, 128, 8), "fin_headlines": (96, 150, 128, 8), "pubmedqa": (32, 50, 448, 4)},
    "full": {"sst2": (None, None, 128, 16), "fin_headlines": (None, None, 128, 16), "pubmedqa": (None, None, 768, 8)},
    "smoke": {"sst2": (32, 24, 96, 8)},
}
# On the CPU preset the scorers outside the targets (random, gradmap, taylor) run at the
# 30% cut only; `--all-cuts` (and the full preset) runs every scorer at every cut.
CPU_SCORERS_AT_ALL_CUTS = ("igia", "block-influence", "last-n")
# Arms are run in this order across all tasks, so an interrupted study still has the targets' arms.
PRIORITY = ("dense", "igia@0.3", "block-influence@0.3", "last-n@0.3", "igia-nomerge@0.3")


def peak_rss_mb(pid: int):
    """The process's own peak resident set (VmHWM), or None once it has exited.

    Not rusage's ru_maxrss: Linux carries that across fork and exec, so a child of a large parent
    would report the parent's peak. VmHWM belongs to the exec'd image alone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_measured(cmd: list[str]) -> dict:
    """Run a subprocess; return its wall seconds and its own peak RSS (VmHWM, polled every 0.1 s;
    the high-water mark only grows, so the last reading misses at most the final 0.1 s)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    with ThreadPoolExecutor(2) as reader:  # drain both pipes while polling, so the child never blocks on them
        stdout_f, stderr_f = reader.submit(proc.stdout.read), reader.submit(proc.stderr.read)
        while proc.poll() is None:
            peak = max(peak, peak_rss_mb(proc.pid) or 0.0)
            time.sleep(0.1)
        stdout, stderr = stdout_f.result(), stderr_f.result()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak, 1), "stdout": stdout}


def arms(cuts=CUTS, scorers=SCORERS, all_cuts_for=SCORERS) -> list[dict]:
    """The study's arms; scorers not in `all_cuts_for` run at the 30% cut only (when it is a cut)."""
    out = [{"arm": "dense", "scorer": None, "cut": 0.0, "merge": False, "keep_top_p": None}]
    for cut in cuts:
        for scorer in scorers:
            if scorer not in all_cuts_for and cut != 0.3 and 0.3 in cuts:
                continue
            out.append({"arm": f"{scorer}@{cut}", "scorer": scorer, "cut": cut, "merge": scorer == "igia", "keep_top_p": 0.2 if scorer == "igia" else None})
        if "igia" in scorers:
            out.append({"arm": f"igia-nomerge@{cut}", "scorer": "igia", "cut": cut, "merge": False, "keep_top_p": None})
    if "igia" in scorers and 0.3 in cuts:
        for p in (0.1, 0.5):
            out.append({"arm": f"igia-p{p}@0.3", "scorer": "igia", "cut": 0.3, "merge": True, "keep_top_p": p})
    return out


def common_args(data: Path, train_rows, max_length, batch_size, epochs, seed) -> list[str]:
    args = ["--data", str(data), "--max-length", str(max_length), "--batch-size", str(batch_size),
            "--epochs", str(epochs), "--seed", str(seed), "-q"]
    return args + (["--max-examples", str(train_rows)] if train_rows else [])


def run_arm(arm: dict, task: str, preset: tuple, out: Path, args) -> dict:
    train_rows, test_rows, max_length, batch_size = preset
    ckpt, data = out / task / arm["arm"], SHARED / task
    base = common_args(data, train_rows, max_length, batch_size, args.epochs, args.seed)
    if arm["scorer"] is None:
        cmd = [sys.executable, __file__, "--dense-worker", str(ckpt), *base]
    else:
        cmd = [GRADPRUNE, "compress", "--out", str(ckpt), "--overwrite", "--drop-ratio", str(arm["cut"]),
               "--scorer", arm["scorer"], "--merge" if arm["merge"] else "--no-merge", *base]
        if arm["keep_top_p"]:
            cmd += ["--keep-top-p", str(arm["keep_top_p"])]
        cmd += ["--probe-min-steps", str(args.probe_min_steps)]
    measured = run_measured(cmd)
    eval_cmd = [GRADPRUNE, "eval", str(ckpt), "--data", str(data), "--metric", "choice", "--batch-size", "8", "-q"]
    evaluation = json.loads(run_measured(eval_cmd + (["--limit", str(test_rows)] if test_rows else []))["stdout"].strip().splitlines()[-1])
    record = {"task": task, **arm, "accuracy": evaluation["value"], "test_rows": evaluation["n"],
              "seconds": measured["seconds"], "peak_rss_mb": measured["peak_rss_mb"]}
    manifest_path = ckpt / "gradprune.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        record.update(params=manifest["params_after"], layers_dropped=manifest["layers_dropped"])
    else:
        record["params"] = json.loads((ckpt / "dense.json").read_text())["params"]
    return record


def study_settings(args) -> dict:
    """What the report states beside the preset: the knobs every arm shares."""
    return {"seed": args.seed, "epochs": args.epochs, "probe min steps": args.probe_min_steps}


def dense_worker(argv: list[str]) -> None:
    """Fine-tune the dense model with the same LoRA recipe as the recovery fine-tune; save it."""
    import torch  # noqa: F401

    from gradprune_deploy.config import CompressConfig
    from gradprune_deploy.data import read_examples, tokenize_examples
    from gradprune_deploy.finetune import recovery_finetune
    from gradprune_deploy.loading import load_model_and_tokenizer
    from gradprune_deploy.pipeline import _train_settings
    from gradprune_deploy.surgery import count_parameters

    parser = argparse.ArgumentParser()
    parser.add_argument("--dense-worker")
    for flag in ("--data", "--max-length", "--batch-size", "--epochs", "--seed", "--max-examples"):
        parser.add_argument(flag)
    parser.add_argument("-q", action="store_true")
    a = parser.parse_args(argv)
    config = CompressConfig(out=a.dense_worker, data=a.data, max_length=int(a.max_length), batch_size=int(a.batch_size),
                            epochs=float(a.epochs), seed=int(a.seed), max_examples=int(a.max_examples) if a.max_examples else None)
    model, tokenizer = load_model_and_tokenizer(config.model)
    features = tokenize_examples(read_examples(config.data, limit=config.max_examples), tokenizer, max_length=config.max_length)
    model, stats = recovery_finetune(model, features, tokenizer, _train_settings(config), mode="lora")
    out = Path(a.dense_worker)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "dense.json").write_text(json.dumps({"params": count_parameters(model), "finetune": stats}, default=str))


def kendall_tau(task: str, preset: tuple, args) -> dict:
    """τ between the IGIA ranking after the probe (~1% of the epoch) and after the whole epoch."""
    from scipy.stats import kendalltau

    from gradprune_deploy.config import CompressConfig
    from gradprune_deploy.data import read_examples, tokenize_examples
    from gradprune_deploy.finetune import planned_steps, run_probe
    from gradprune_deploy.loading import load_model_and_tokenizer
    from gradprune_deploy.pipeline import _train_settings, probe_length

    train_rows, _, max_length, batch_size = preset
    config = CompressConfig(out="unused", data=str(SHARED / task), max_length=max_length, batch_size=batch_size,
                            epochs=args.epochs, seed=args.seed, probe_min_steps=args.probe_min_steps, max_examples=train_rows)
    settings = _train_settings(config)
    model, tokenizer = load_model_and_tokenizer(config.model)
    features = tokenize_examples(read_examples(config.data, limit=train_rows), tokenizer, max_length=max_length)
    short_steps, _ = probe_length(config, len(features), settings)
    epoch_steps = planned_steps(len(features), settings) - 2  # the run's informative steps (2 zero-gradient)
    short, _ = run_probe(model, features, tokenizer, settings, probe_steps=short_steps, keep_factors=False)
    full, _ = run_probe(model, features, tokenizer, settings, probe_steps=max(short_steps, epoch_steps), keep_factors=False)
    tau = kendalltau(short.scores().numpy(), full.scores().numpy())
    return {"task": task, "arm": "kendall", "probe_steps": short_steps, "epoch_steps": max(short_steps, epoch_steps),
            "tau": float(tau.statistic), "p_value": float(tau.pvalue)}


def append_record(results_path: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with results_path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def run_kendall(tasks, preset, args, done: set, results_path: Path) -> None:
    for task in tasks:
        if (task, "kendall") not in done:
            append_record(results_path, kendall_tau(task, preset[task], args))
            done.add((task, "kendall"))


def main() -> None:
    if "--dense-worker" in sys.argv:
        return dense_worker(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--cuts", nargs="+", type=float, default=list(CUTS))
    parser.add_argument("--scorers", nargs="+", default=list(SCORERS))
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--probe-min-steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all-cuts", action="store_true", help="every scorer at every cut (default on the full preset)")
    parser.add_argument("--report", default=str(ROOT / "docs" / "results.md"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = {(r["task"], r["arm"]) for r in map(json.loads, results_path.read_text().splitlines())} if results_path.exists() else set()
    preset = PRESETS[args.preset]
    started, started_at = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tasks = args.tasks or list(preset)
    all_cuts_for = SCORERS if args.all_cuts or args.preset == "full" else CPU_SCORERS_AT_ALL_CUTS
    planned = arms(tuple(args.cuts), tuple(args.scorers), all_cuts_for)
    planned.sort(key=lambda a: PRIORITY.index(a["arm"]) if a["arm"] in PRIORITY else len(PRIORITY))
    jobs = [(task, arm) for arm in planned for task in tasks]
    priority_jobs = sum(arm["arm"] in PRIORITY for arm in planned) * len(tasks)
    for position, (task, arm) in enumerate(jobs):
        if position == priority_jobs:  # the τ measurement once the targets' arms are in
            run_kendall(tasks, preset, args, done, results_path)
        if (task, arm["arm"]) not in done:
            append_record(results_path, run_arm(arm, task, preset[task], out, args))
    run_kendall(tasks, preset, args, done, results_path)
    with (out / "invocations.jsonl").open("a") as fh:  # the report sums these: a resumed study's wall time
        fh.write(json.dumps({"started": started_at, "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "minutes": round((time.perf_counter() - started) / 60, 1)}) + "\n")
    records = [json.loads(line) for line in results_path.read_text().splitlines()]
    from study_report import write_report

    summary = write_report(records, Path(args.report), out, command=" ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
                           preset=args.preset, presets=PRESETS[args.preset], seconds=time.perf_counter() - started,
                           settings=study_settings(args))
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
