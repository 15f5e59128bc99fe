"""The Python API end to end: prune SmolLM2-135M-Instruct on sst2, read the quality ledger back,
and score the pruned checkpoint on the test split — the same calls as `gradprune compress`,
`gradprune inspect` and `gradprune eval`.

    .venv/bin/python examples/python_api.py --out runs/sst2-pruned              # ~15 min on 2 CPU cores
    .venv/bin/python examples/python_api.py --out /tmp/x --steps 2 --rows 24    # a smoke run (tests)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gradprune_deploy import CompressConfig, EvalConfig, Manifest, compress, evaluate

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"  # ../shared/data beside the clone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/sst2-pruned")
    parser.add_argument("--data", default=str(SST2))
    parser.add_argument("--drop-layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100, help="recovery steps of batch 8")
    parser.add_argument("--rows", type=int, default=800, help="training rows")
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    result = compress(
        CompressConfig(
            data=args.data,
            out=args.out,
            drop_layers=str(args.drop_layers),
            max_examples=args.rows,
            max_steps=args.steps,
            max_length=128,
            validation_rows=64,
            overwrite=args.overwrite,
        )
    )
    manifest = Manifest.read(args.out)
    print(
        f"dropped {manifest.layers_dropped}, merged {manifest.merge.targets}, "
        f"{manifest.params_before / 1e6:.1f}M → {manifest.params_after / 1e6:.1f}M parameters"
    )
    for stage, numbers in result["quality"].items():
        print(f"validation {stage:<10} loss {numbers['loss']:.3f}  accuracy {numbers['accuracy']:.3f}")
    test = evaluate(EvalConfig(args.out, data=args.data, split="test", metric="choice", limit=args.test_rows))
    print(f"test accuracy of the pruned model on {test['n']} rows: {test['value']:.3f}")


if __name__ == "__main__":
    main()
