"""Do the official code's two probe choices, or the adaptive probe, change GradPruner's decisions?

Runs only the IGIA probe (no cut, no recovery) of `compress`'s own code path (scoring.igia_scores, the
study's cpu preset: 900 sst2 rows, batch 8, 100 planned steps, max 128 tokens, seed 0) for each variant:

    squared-noclip        the paper's layer score, clipping off          (this project's default)
    norm-noclip           the official layer_important.py's score        (--igia-reduce norm)
    squared-clip1         gradients read after clipping at 1.0           (--probe-clip-grad-norm 1.0)
    norm-clip1            both: the official code                        (--igia-reduce norm --probe-clip-grad-norm 1.0)
    auto-N                --probe-steps auto with the cut of N layers checked (default N = 6, 20% of 30 layers)

and records per variant the informative steps used, the layer scores, the 6/9/12-layer cuts, the layer
K = 1 would merge at each cut, and the top-20% IGIA mask of every linear (packed bits, for the overlaps);
then, for every pair of variants: Kendall τ-b of the scores, how many layers of each cut differ, and
how much of the merged layer's top-p mask they share (the merge's same-sign test depends on the weights
alone, so the top-p mask is where the variants can differ).

Resumable: each variant is written to --out/<variant>.json (+ .masks.npz) when it finishes and skipped
when present; the summary --out/probe_variants.json is rebuilt from what is there. Time it alone.

    .venv/bin/python scripts/study/probe_variants.py --out runs/probe-variants

Ends with one JSON line (the summary without the per-layer scores).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from gradprune_deploy.compress.config import CompressConfig
from gradprune_deploy.compress.finetune import train_settings
from gradprune_deploy.compress.igia.convergence import kendall_tau_b
from gradprune_deploy.compress.igia.merge import layers_to_merge, top_p_mask
from gradprune_deploy.compress.ledger import hold_out
from gradprune_deploy.compress.scoring import igia_scores
from gradprune_deploy.compress.selection import select_layers_to_drop
from gradprune_deploy.data import read_examples, tokenize_examples
from gradprune_deploy.loading import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
CUTS = (6, 9, 12)
KEEP_TOP_P = 0.2  # the merge's default --keep-top-p (the official code's 20%)
FIXED = {
    "squared-noclip": dict(igia_reduce="squared", probe_clip_grad_norm=None),
    "norm-noclip": dict(igia_reduce="norm", probe_clip_grad_norm=None),
    "squared-clip1": dict(igia_reduce="squared", probe_clip_grad_norm=1.0),
    "norm-clip1": dict(igia_reduce="norm", probe_clip_grad_norm=1.0),
}


def variant_options(name: str, args) -> tuple[dict, int | None]:
    """(CompressConfig fields of the variant, the cut size the adaptive rule checks)."""
    if name in FIXED:
        return {**FIXED[name], "probe_steps": args.probe_steps}, None
    drop = int(name.removeprefix("auto-"))
    return {"probe_steps": "auto", "probe_max_steps": args.probe_max_steps, "drop_layers": drop}, drop


def run_variant(name: str, args, out: Path) -> None:
    fields, drop = variant_options(name, args)
    config = CompressConfig(
        out=str(out / "unused"),
        model=args.model,
        data=args.data,
        max_examples=args.rows,
        max_length=args.max_length,
        max_steps=args.max_steps,
        batch_size=8,
        seed=args.seed,
        probe_min_steps=args.probe_min_steps,
        **fields,
    )
    model, tokenizer = load_model_and_tokenizer(config.model)
    held = hold_out(
        read_examples(config.data, split=config.split, limit=config.max_examples),
        data=config.data,
        split=config.split,
        validation_split=None,
        fraction=config.validation_fraction,
        max_rows=config.validation_rows,
        seed=config.seed,
    )
    features = tokenize_examples(held.train, tokenizer, max_length=config.max_length)
    start = time.perf_counter()
    scores = igia_scores(model, features, tokenizer, config, train_settings(config), drop_count=drop)
    values = scores.values
    result = {
        "variant": name,
        "options": fields,
        "training_rows": len(features),
        "seconds": round(time.perf_counter() - start, 1),
        "scoring": dataclasses.asdict(scores.stats),
        "scores": values.tolist(),
        "cuts": {},
        "merged_layer": {},
    }
    for n in CUTS:
        dropped = select_layers_to_drop(values, drop_count=n)
        result["cuts"][str(n)] = dropped
        result["merged_layer"][str(n)] = layers_to_merge(dropped, values.tolist(), 1)[0]
    masks = {}
    for layer in range(len(values)):
        for linear, f in scores.record.igia_for_layer(layer).items():
            masks[f"{layer}:{linear}"] = np.packbits(top_p_mask(f, KEEP_TOP_P).numpy().ravel())
    np.savez_compressed(out / f"{name}.masks.npz", **masks)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))  # last: its presence marks the variant done
    print(f"{name}: {scores.stats.probe_steps} informative steps, cuts {result['cuts']}", flush=True)


def mask_overlap(a: Path, b: Path, layer: int) -> float:
    """Share of one variant's top-p entries of `layer` (all linears) that the other variant also keeps."""
    with np.load(a) as ma, np.load(b) as mb:
        keys = [k for k in ma.files if k.startswith(f"{layer}:")]
        both = sum(int(np.unpackbits(ma[k] & mb[k]).sum()) for k in keys)
        kept = sum(int(np.unpackbits(ma[k]).sum()) for k in keys)
    return both / kept if kept else float("nan")


def compare(results: dict[str, dict], out: Path) -> dict:
    pairs = {}
    for a, b in itertools.combinations(sorted(results), 2):
        ra, rb = results[a], results[b]
        pairs[f"{a} vs {b}"] = {
            "kendall_tau": kendall_tau_b(ra["scores"], rb["scores"]),
            "cut_layers_differing": {n: len(set(ra["cuts"][n]) - set(rb["cuts"][n])) for n in ra["cuts"]},
            "merge_mask_overlap": {
                n: {
                    "layer": ra["merged_layer"][n],
                    "other_merges": rb["merged_layer"][n],
                    "overlap": mask_overlap(out / f"{a}.masks.npz", out / f"{b}.masks.npz", ra["merged_layer"][n]),
                }
                for n in ra["merged_layer"]
            },
        }
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/probe-variants")
    parser.add_argument("--model", default="bundled:SmolLM2-135M-Instruct")
    parser.add_argument("--data", default=str(SHARED / "sst2"))
    parser.add_argument("--rows", type=int, default=900)
    parser.add_argument("--max-steps", type=int, default=100, help="planned fine-tune steps (the probe is 1%% of them, at least the floor)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-steps", type=int, default=None, help="fixed variants' probe length (default: compress's own)")
    parser.add_argument("--probe-min-steps", type=int, default=8)
    parser.add_argument("--probe-max-steps", type=int, default=64, help="the adaptive probe's cap")
    parser.add_argument("--adaptive-drops", type=int, nargs="*", default=[6], help="one adaptive variant per cut size")
    parser.add_argument("--variants", nargs="*", default=None, help="run only these (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("GRADPRUNE_DISABLE_PROGRESS_BARS", "1")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.variants or [*FIXED, *(f"auto-{n}" for n in args.adaptive_drops)]
    for name in names:
        if not (out / f"{name}.json").exists():
            run_variant(name, args, out)
    results = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem != "probe_variants"}
    summary = {
        "setup": {k: v for k, v in vars(args).items() if k not in ("variants", "out")},
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "variants": {
            n: {k: r[k] for k in ("options", "cuts", "merged_layer", "seconds")}
            | {
                "informative_steps": r["scoring"]["probe_steps"],
                "zero_gradient_steps": r["scoring"]["zero_gradient_steps"],
                "adaptive": r["scoring"]["adaptive"],
            }
            for n, r in results.items()
        },
        "pairs": compare(results, out),
    }
    (out / "probe_variants.json").write_text(json.dumps(summary | {"scores": {n: r["scores"] for n, r in results.items()}}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
