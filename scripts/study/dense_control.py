"""The dense control of a compress run: its rows and recovery settings, without the cut.

A checkpoint's gradprune.json records the data, the split, the held-out rows and the fine-tune settings; this
fine-tunes the *dense* model on exactly those training rows with exactly those settings (`train_settings`, the
recovery's mode, seed), then scores it on the ledger's held-out rows the way compress scores its stages (loss,
and greedy answers with the repeated 4-gram rate). It tells "the pruned model loops where the dense one does not"
apart from "this fine-tune makes any model loop". Writes a standard checkpoint (usable as `--dense-reference`)
and control.json beside it, and prints the ledger's stages with the control between them.

    .venv/bin/python scripts/study/dense_control.py runs/mainjob/base runs/mainjob/dense-control
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from gradprune_deploy.compress.config import CompressConfig
from gradprune_deploy.compress.finetune import recovery_finetune, train_settings
from gradprune_deploy.compress.ledger import held_out_of, measure
from gradprune_deploy.data import tokenize_examples
from gradprune_deploy.loading import load_model_and_tokenizer
from gradprune_deploy.manifest import MANIFEST_NAME, Manifest

STAGE = "dense fine-tuned (the control)"


def run_config(manifest: Manifest) -> CompressConfig:
    """The compress run's own config (validated again), minus what would reach outside this control."""
    known = {f.name for f in dataclasses.fields(CompressConfig)}
    recorded = {k: v for k, v in manifest.config.items() if k in known}
    return CompressConfig(**{**recorded, "dense_reference": None, "teacher": None, "overwrite": False})


def stage_line(stage: str, loss: float, generation) -> str:
    rate = "–" if generation is None or generation.repeated_4gram_rate is None else f"{generation.repeated_4gram_rate:.3f}"
    distinct = "–" if generation is None or generation.distinct_2 is None else f"{generation.distinct_2:.3f}"
    return f"| {stage} | {loss:.3f} | {rate} | {distinct} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a compress output directory (its gradprune.json is read; its weights are not)")
    parser.add_argument("out", help="the dense control's checkpoint directory (must not exist)")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} exists: give a new directory")
    manifest = Manifest.from_json((Path(args.checkpoint) / MANIFEST_NAME).read_text())
    config = run_config(manifest)
    held = held_out_of(manifest)
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(config.model, dtype=config.dtype)
    features = tokenize_examples(held.train, tokenizer, max_length=config.max_length)
    mode = "lora" if config.finetune == "none" else config.finetune
    settings = train_settings(config)
    model, stats = recovery_finetune(model, features, tokenizer, settings, mode=mode)
    point = measure(
        model,
        tokenizer,
        held.validation,
        stage=STAGE,
        batch_size=config.batch_size,
        generate_rows=config.ledger_generate,
        max_new_tokens=config.ledger_new_tokens,
    )
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "of": str(args.checkpoint),
        "command": f"scripts/study/dense_control.py {args.checkpoint} {args.out}",
        "train_rows": len(features),
        "validation": held.description,
        "finetune": {**stats, "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "sampling"}},
        "point": dataclasses.asdict(point),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "control.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    points = {p.stage: p for p in manifest.quality.points} if manifest.quality else {}
    print("| stage | held-out loss | repeated 4-gram rate | distinct-2 |\n|---|---:|---:|---:|")
    for stage in ("dense", "pruned", "recovered"):
        if stage in points:
            print(stage_line(stage, points[stage].loss, points[stage].generation))
        if stage == "dense":
            print(stage_line(STAGE, point.loss, point.generation))


if __name__ == "__main__":
    main()
