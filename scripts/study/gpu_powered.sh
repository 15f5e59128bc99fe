#!/bin/bash
# The powered comparison at the gpu preset (issue 23: 500 steps, the merge at an adequate budget) on one GPU: six
# background study processes, one per (task, seed), each running ARMS in the grid's order. A 135M model at batch 8
# leaves a GPU mostly idle, so concurrent arms finish sooner; their wall times share the device (say so beside any
# GPU number). Default ARMS: the merge question alone (dense, K = 1, K = 0), ~12 min on an H100 at the 2026-11-24
# rate (a dense arm: 500 steps in 167 s with nine processes sharing it); name more arms of powered.py's grid to run more.
# Merge into the committed records and report afterwards:
#   cat OUT/*/results.jsonl >> docs/study-records/powered-gpu.jsonl
#   .venv/bin/python scripts/study/quality_study.py --powered --preset gpu --report-only
#
#   bash scripts/study/gpu_powered.sh runs/gpu-powered [python] [arm ...]
set -euo pipefail
OUT=${1:?usage: gpu_powered.sh OUT [python] [arm ...]}
PY=${2:-python3}
shift $(($# < 2 ? $# : 2))
ARMS=${*:-dense igia@20% igia-K0@20%}
export GRADPRUNE_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
for task in sst2 fin_headlines; do
  for seed in 0 1 2; do
    part="$OUT/$task-seed$seed"
    # shellcheck disable=SC2086  # the arm list splits on spaces on purpose
    OMP_NUM_THREADS=2 setsid nohup "$PY" scripts/study/quality_study.py --powered --preset gpu --out "$part" --tasks "$task" \
      --seed "$seed" --arms $ARMS --results "$part/results.jsonl" --report "$part/study.md" > "$part.log" 2>&1 < /dev/null &
  done
done
echo "started 6 study processes ($ARMS); logs in $OUT/*.log"
