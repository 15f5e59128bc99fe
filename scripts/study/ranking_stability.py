"""Does the early IGIA ranking (the paper's ~1% probe) match the ranking after the whole fine-tune?

GradPruner's premise: the layer ranking from the first ~1% of LoRA fine-tuning steps is already
the ranking the full run would give. This runs one dense LoRA fine-tune of `--steps` optimizer
steps (batch 8, the study's rows and token limit) on a task with the IGIA probe left on for the
whole run, and keeps the layer scores after 1, 2, 4, … informative steps. For each snapshot:
Kendall's τ-b against the end-of-run ranking, and the overlap of the layers each would drop at
20/30/40% of the depth (what the decision actually uses). The probe's gradient clipping is off
(as in `compress`), so this fine-tune is the probe's, not the study's dense arm.

    .venv/bin/python scripts/study/ranking_stability.py --task sst2 --out runs/ranking-stability.json

Ends with one JSON line (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from gradprune_deploy.compress.finetune import TrainSettings, run_probe
from gradprune_deploy.compress.igia.convergence import kendall_tau_b  # the adaptive probe's τ-b, the one implementation
from gradprune_deploy.data import read_examples, tokenize_examples
from gradprune_deploy.loading import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"


def lowest(scores: list[float], count: int) -> set[int]:
    """The `count` layers a cut would drop: lowest scores, ties to the deeper layer (as selection.py)."""
    return set(sorted(range(len(scores)), key=lambda i: (scores[i], -i))[:count])


def second_half(snapshots: dict[int, list[float]]) -> tuple[int, list[float]] | None:
    """IGIA accumulated over the second half of the run only (final minus the snapshot at half the steps),
    a ranking that shares no step with an early probe; None without a snapshot at half the run."""
    final_step = max(snapshots)
    half = final_step // 2
    if half not in snapshots or half == final_step:
        return None
    return half, [f - h for f, h in zip(snapshots[final_step], snapshots[half])]


def stability(snapshots: dict[int, list[float]], cuts: tuple[int, ...]) -> list[dict]:
    """Per snapshot: τ-b and dropped-set overlap against the last snapshot (the whole run's accumulated IGIA),
    and τ-b against the second half's IGIA alone (the whole run's sum is dominated by its early steps)."""
    final_step = max(snapshots)
    final = snapshots[final_step]
    late = second_half(snapshots)
    rows = []
    for step in sorted(snapshots):
        scores = snapshots[step]
        rows.append(
            {
                "informative_steps": step,
                "fraction_of_run": step / final_step,
                "kendall_tau": kendall_tau_b(scores, final),
                "kendall_tau_second_half": kendall_tau_b(scores, late[1]) if late else None,
                "dropped_overlap": {str(n): len(lowest(scores, n) & lowest(final, n)) / n for n in cuts},
                "dropped": {str(n): sorted(lowest(scores, n)) for n in cuts},
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--rows", type=int, default=900)
    parser.add_argument("--steps", type=int, default=100, help="informative steps of the whole run")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/ranking-stability.json")
    args = parser.parse_args()
    os.environ.setdefault("GRADPRUNE_DISABLE_PROGRESS_BARS", "1")

    model, tokenizer = load_model_and_tokenizer("bundled:SmolLM2-135M-Instruct")
    examples = read_examples(str(SHARED / args.task / "train.jsonl"), limit=args.rows)
    features = tokenize_examples(examples, tokenizer, max_length=args.max_length)
    snapshot_steps = tuple(sorted({*(2**k for k in range(int(math.log2(args.steps)) + 1)), args.steps // 2, args.steps}))
    settings = TrainSettings(batch_size=8, max_steps=args.steps + 4, seed=args.seed)
    start = time.perf_counter()
    record, stats = run_probe(
        model, features, tokenizer, settings, probe_steps=args.steps, keep_factors=False, snapshot_steps=snapshot_steps
    )
    num_layers = record.num_layers
    cuts = tuple(round(f * num_layers) for f in (0.2, 0.3, 0.4))
    result = {
        "task": args.task,
        "rows": args.rows,
        "steps": args.steps,
        "num_layers": num_layers,
        "seconds": round(time.perf_counter() - start, 1),
        "zero_gradient_steps": stats["zero_gradient_steps"],
        "snapshots": {str(k): v for k, v in record.snapshots.items()},
        "stability": stability(record.snapshots, cuts),
    }
    for row in result["stability"]:
        overlaps = " ".join(f"{n}:{v:.2f}" for n, v in row["dropped_overlap"].items())
        step, share = row["informative_steps"], 100 * row["fraction_of_run"]
        late = row["kendall_tau_second_half"]
        late_text = f"  τ vs second half {late:+.3f}" if late is not None else ""
        print(f"after {step:>4} steps ({share:5.1f}%): τ {row['kendall_tau']:+.3f}{late_text}  overlap {overlaps}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("snapshots", "stability")} | {"out": args.out}))


if __name__ == "__main__":
    main()
