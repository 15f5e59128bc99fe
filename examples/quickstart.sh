#!/usr/bin/env bash
# The main job on the embedded default, end to end on CPU:
#   SmolLM2-135M-Instruct (bundled GGUF → float32 safetensors) + GSM8K (bundled, MIT)
#   → IGIA probe → drop 12 of 30 layers → same-sign merge → LoRA recovery fine-tune (merged)
#   → runs/smollm2-gsm8k-pruned (standard checkpoint + gradprune.json + layer_importance.png)
#   → what it cost: completion loss on 64 held-out GSM8K problems, dense vs pruned.
# A fixed budget (256 training problems, ≤320 tokens, batches of 4 × 2 accumulation steps) keeps it
# to minutes and a few GB of memory on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/gradprune ] || bash scripts/setup.sh
OUT=${OUT:-runs/smollm2-gsm8k-pruned}
.venv/bin/gradprune compress --out "$OUT" --drop-layers 12 --max-examples 256 --max-length 320 \
  --batch-size 4 --grad-accum 2 ${OVERWRITE:+--overwrite} "$@"
.venv/bin/gradprune inspect "$OUT"
echo "GSM8K test completion loss (64 problems), dense then pruned:"
.venv/bin/gradprune eval bundled:SmolLM2-135M-Instruct --data bundled:gsm8k --metric loss --limit 64 -q
.venv/bin/gradprune eval "$OUT" --data bundled:gsm8k --metric loss --limit 64 -q
