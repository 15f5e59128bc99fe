#!/usr/bin/env bash
# The main job on the embedded default, end to end on CPU:
#   SmolLM2-135M-Instruct (bundled GGUF → float32 safetensors) + GSM8K (bundled, MIT)
#   → held-out rows (GSM8K's test split) scored dense
#   → two proposals for a 6-of-30-layer cut (20%): GradPruner's (IGIA probe, the highest-scoring dropped
#     layer merged into its preceding kept layer) and block-influence's; each applied in place (restored after), healed
#     by 10 LoRA steps and scored on the held-out rows; the better one is kept (--scorer auto)
#   → LoRA recovery fine-tune (merged) → held-out rows scored pruned and recovered
#   → runs/smollm2-gsm8k-pruned (standard checkpoint + gradprune.json with the quality ledger + plot)
#   → the dense vs pruned ledger, and the measured speed-up (transformers on this CPU).
# Extra arguments go to `gradprune compress` (e.g. --overwrite, --max-steps 2 for a smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/gradprune ] || bash scripts/setup.sh
OUT=${OUT:-runs/smollm2-gsm8k-pruned}
.venv/bin/gradprune compress --out "$OUT" --drop-layers 6 --scorer auto --auto-candidates igia block-influence \
  --heal-steps 10 --max-examples 560 --max-length 256 --batch-size 4 --grad-accum 2 --max-steps 60 --probe-steps 8 \
  --validation-rows 48 ${OVERWRITE:+--overwrite} "$@"
echo
echo "measured speed-up (transformers on this CPU, dense vs pruned, input 128 / output 32 tokens; full report: $OUT/bench/report.md):"
.venv/bin/gradprune bench --dense bundled:SmolLM2-135M-Instruct --pruned "$OUT" --backend hf --input-len 128 \
  --output-len 32 --num-prompts "${BENCH_PROMPTS:-2}" --runs "${BENCH_RUNS:-2}" --threads 2 --overwrite -q > /dev/null
grep -E "^\| (metric|time to first token|time per output token|output tokens/s|peak RSS) " "$OUT/bench/report.md"
