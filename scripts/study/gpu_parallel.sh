#!/bin/bash
# The GPU preset on one GPU, split over 9 background study processes (3 tasks x {arms A, arms B, seed 1}).
# A 135M model leaves an H100 mostly idle at batch 8, so concurrent arms finish the preset sooner; their
# wall times share the device (docs/results.md says so beside every GPU number). Each process has its own
# --out (OUT/<task>-<part>); the distillation arms that need the dense teacher run beside it in part A.
# Merge into the committed records and report afterwards:
#   cat OUT/*/results.jsonl > docs/study-records/results-gpu.jsonl
#   python scripts/study/quality_study.py --preset gpu --report-only --report docs/study-gpu.md
#
#   bash scripts/study/gpu_parallel.sh runs/gpu-study [python]
set -euo pipefail
OUT=${1:?usage: gpu_parallel.sh OUT [python]}
PY=${2:-python3}
A="dense igia-kd-ft@20% igia-kd-ft-wall@20% igia-kd-ft-a09@20% igia-kd-ft-T2@20% igia@30% igia-K2@20% last-n@30% igia-kd@20% judge@30% ppl@30% igia-compensate@20% igia-kd@30% igia-K2@30% igia-p50@20% igia-full@20% random@20% taylor@20% igia-gblm-merge@20%"
B="igia@20% block-influence@30% igia-probe2@20% igia-K0@20% block-influence@20% judge@20% igia-prunedlora@20% igia@40% igia-K0@30% igia-p10@20% igia-K3@20% gblm@20% gradmap@20% auto@20% igia-Kall@20% block-influence@40%"
S1="dense igia@20% igia@30% block-influence@20% block-influence@30% igia@40% random@20%"
export GRADPRUNE_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
for task in sst2 fin_headlines pubmedqa; do
  for part in A B S1; do
    seed=0 threads=2
    [ "$part" = S1 ] && seed=1 threads=1
    # shellcheck disable=SC2086  # the arm lists split on spaces on purpose
    OMP_NUM_THREADS=$threads setsid nohup "$PY" scripts/study/quality_study.py --preset gpu --out "$OUT/$task-$part" \
      --tasks "$task" --seed "$seed" --arms ${!part} --report "$OUT/$task-$part/study.md" --results "$OUT/$task-$part/results.jsonl" \
      > "$OUT/$task-$part.log" 2>&1 < /dev/null &
  done
done
echo "started 9 study processes; logs in $OUT/*.log"
