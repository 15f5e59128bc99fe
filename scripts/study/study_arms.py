"""The quality study's arms and presets (data only; quality_study.py runs them, powered.py picks the defaults grid).

Each arm: its name (`<method>@<pct>%`, pct of SmolLM2's 30 layers), the scorer and layer count it passes to
`gradprune compress`, and its extra flags (`{dense}` = this study's dense fine-tune of the same seed, a teacher).
"""

from __future__ import annotations

# (training rows read from train.jsonl incl. the 10% validation slice, optimizer steps, test rows, max tokens)
# gpu: the full preset (every training row up to 4000, 500 steps, the whole test split) for a GPU machine.
PRESETS = {"cpu": (900, 100, 200, 128), "gpu": (4000, 500, 1000, 256), "smoke": (48, 4, 16, 96)}
# pubmedqa's prompts (abstract + question) run to ~360 tokens (90th percentile ~500): 128 would drop them.
TASK_MIN_LENGTH = {"pubmedqa": 512}
# What a run without --tasks/--arms does. cpu: the arms behind the quality targets on the two short-prompt tasks;
# their sst2 runs took 68 min in all here, and the fin_headlines arms that ran alone took 0.7-1.2x their sst2
# counterparts, so ~2.3 h (2.5 h at 1.2x). pubmedqa's 512-token arms take ~7x longer, and at this preset its dense fine-tune does
# not beat the majority label (54.0%, majority 54.0%). gpu: every arm on every task.
DEFAULT_TASKS = {"cpu": ["sst2", "fin_headlines"], "gpu": ["sst2", "fin_headlines", "pubmedqa"], "smoke": ["sst2"]}
CPU_ARMS = ["dense", "igia@20%", "block-influence@20%", "igia@30%", "block-influence@30%", "last-n@30%", "ppl@30%", "igia@40%"]
# Arms in priority order: an interrupted study has the targets' arms first.
ARMS = [
    {"arm": "dense"},
    {"arm": "igia@20%", "scorer": "igia", "drop": 6},
    {"arm": "igia@30%", "scorer": "igia", "drop": 9},
    {"arm": "block-influence@30%", "scorer": "block-influence", "drop": 9},
    # the teacher that knows the task: this study's dense LoRA fine-tune ({dense} = OUT/<task>/dense)
    {"arm": "igia-kd-ft@20%", "scorer": "igia", "drop": 6, "extra": ["--distill", "--teacher", "{dense}"]},
    {"arm": "igia-K2@20%", "scorer": "igia", "drop": 6, "extra": ["--merge-layers", "2"]},
    # a 2-step probe floor (later flags win over the pinned 8): cost vs quality of the merge
    {"arm": "igia-probe2@20%", "scorer": "igia", "drop": 6, "extra": ["--probe-min-steps", "2"]},
    {"arm": "last-n@30%", "scorer": "last-n", "drop": 9},
    # ablations at 20%, where the pruned model still works: merge K and distillation at equal steps
    {"arm": "igia-K0@20%", "scorer": "igia", "drop": 6, "extra": ["--merge-layers", "none"]},
    {"arm": "igia-kd@20%", "scorer": "igia", "drop": 6, "extra": ["--distill"]},
    {"arm": "block-influence@20%", "scorer": "block-influence", "drop": 6},
    # what `--scorer auto` sees of each scorer's cut (raw and after a 10-step heal, no recovery), to
    # check its criterion against the arms' post-recovery accuracy
    {"arm": "judge@30%", "judge": ["igia", "block-influence", "last-n", "ppl"], "drop": 9},
    {"arm": "judge@20%", "judge": ["igia", "block-influence"], "drop": 6},
    {"arm": "ppl@30%", "scorer": "ppl", "drop": 9},
    # the other seed papers' methods on GradPruner's cut
    {"arm": "igia-prunedlora@20%", "scorer": "igia", "drop": 6, "extra": ["--finetune", "prunedlora"]},
    {"arm": "igia-compensate@20%", "scorer": "igia", "drop": 6, "extra": ["--compensate"]},
    {"arm": "igia@40%", "scorer": "igia", "drop": 12},
    {"arm": "igia-kd@30%", "scorer": "igia", "drop": 9, "extra": ["--distill"]},
    {"arm": "igia-K0@30%", "scorer": "igia", "drop": 9, "extra": ["--merge-layers", "none"]},
    {"arm": "igia-K2@30%", "scorer": "igia", "drop": 9, "extra": ["--merge-layers", "2"]},
    # the paper's sparsity range (keep 10-50% of the merged layer's entries; default 20%) and K = 3
    {"arm": "igia-p10@20%", "scorer": "igia", "drop": 6, "extra": ["--keep-top-p", "0.1"]},
    {"arm": "igia-p50@20%", "scorer": "igia", "drop": 6, "extra": ["--keep-top-p", "0.5"]},
    {"arm": "igia-K3@20%", "scorer": "igia", "drop": 6, "extra": ["--merge-layers", "3"]},
    # distillation tuning with the fine-tuned teacher (the default arm: alpha 0.5, T 1): KL-heavy mix, a softer
    # temperature, and equal wall time (68 steps ~ 100 CE steps at the measured 1.46x step cost)
    {"arm": "igia-kd-ft-wall@20%", "scorer": "igia", "drop": 6, "extra": ["--distill", "--teacher", "{dense}", "--max-steps", "68"]},
    {"arm": "igia-kd-ft-a09@20%", "scorer": "igia", "drop": 6, "extra": ["--distill", "--teacher", "{dense}", "--distill-alpha", "0.9"]},
    {"arm": "igia-kd-ft-T2@20%", "scorer": "igia", "drop": 6, "extra": ["--distill", "--teacher", "{dense}", "--distill-temperature", "2"]},
    # full fine-tuning as the recovery (same steps; its own default learning rate)
    {"arm": "igia-full@20%", "scorer": "igia", "drop": 6, "extra": ["--finetune", "full"]},
    # the remaining layer scorers at 20% (the cut where the pruned model still works), and auto's pick
    {"arm": "gblm@20%", "scorer": "gblm", "drop": 6},
    {"arm": "random@20%", "scorer": "random", "drop": 6},
    {"arm": "gradmap@20%", "scorer": "gradmap", "drop": 6},
    {"arm": "taylor@20%", "scorer": "taylor", "drop": 6},
    {"arm": "auto@20%", "scorer": "auto", "drop": 6},
    # the merge: GBLM-Pruner's metric ranks the merged entries; and every dropped layer merged
    {"arm": "igia-gblm-merge@20%", "scorer": "igia", "drop": 6, "extra": ["--merge-criterion", "gblm"]},
    {"arm": "igia-Kall@20%", "scorer": "igia", "drop": 6, "extra": ["--merge-layers", "all"]},
    {"arm": "block-influence@40%", "scorer": "block-influence", "drop": 12},
    # PrunedLoRA at the authors' pace within 100 steps: 16 -> 8 is 2 components every 10 steps, done by step 40
    {"arm": "igia-prunedlora16@20%", "scorer": "igia", "drop": 6, "extra": ["--finetune", "prunedlora", "--prunedlora-start-rank", "16"]},
    {"arm": "igia-compensate@30%", "scorer": "igia", "drop": 9, "extra": ["--compensate"]},
    {"arm": "igia-prunedlora16@30%", "scorer": "igia", "drop": 9, "extra": ["--finetune", "prunedlora", "--prunedlora-start-rank", "16"]},
    # the control for PrunedLoRA 16 -> 8: plain LoRA at rank 16 (alpha/rank as at rank 8; the probe runs at rank 16 too)
    {"arm": "igia-lora16@20%", "scorer": "igia", "drop": 6, "extra": ["--lora-r", "16", "--lora-alpha", "32"]},
    # the rest of the defaults grid (powered.py): rank 16 and PrunedLoRA 16 -> 8 on the cut without the merge
    {"arm": "igia-K0-lora16@20%", "scorer": "igia", "drop": 6, "extra": ["--merge-layers", "none", "--lora-r", "16", "--lora-alpha", "32"]},
    {
        "arm": "igia-K0-prunedlora16@20%",
        "scorer": "igia",
        "drop": 6,
        "extra": ["--merge-layers", "none", "--finetune", "prunedlora", "--prunedlora-start-rank", "16"],
    },
    # the recovery that keeps the model general (issue 23): GSM8K as the general rows (a seeded tenth held out and
    # scored at every stage). ratio 0 trains exactly as igia@20% and only scores them (the no-mix control on the same
    # general rows); 0.25 of the recovery rows from GSM8K's own answers, or from the dense model's (self-data)
    {"arm": "igia-general@20%", "scorer": "igia", "drop": 6, "extra": ["--mix-data", "bundled:gsm8k", "--mix-ratio", "0"]},
    {"arm": "igia-mix@20%", "scorer": "igia", "drop": 6, "extra": ["--mix-data", "bundled:gsm8k", "--mix-ratio", "0.25"]},
    {
        "arm": "igia-mixself@20%",
        "scorer": "igia",
        "drop": 6,
        "extra": ["--mix-data", "bundled:gsm8k", "--mix-ratio", "0.25", "--mix-completions", "dense"],
    },
    # the official code's probe (layer score Σ‖∇B∇A‖_F, gradients after clipping at 1.0) and the adaptive probe, each
    # beside igia@N% of the same seed: does the choice change the cut, the merge mask, the recovered accuracy?
    {"arm": "igia-official@20%", "scorer": "igia", "drop": 6, "extra": ["--igia-reduce", "norm", "--probe-clip-grad-norm", "1.0"]},
    {"arm": "igia-official@30%", "scorer": "igia", "drop": 9, "extra": ["--igia-reduce", "norm", "--probe-clip-grad-norm", "1.0"]},
    # (the adaptive probe with a 2-step floor: at 100 planned steps the fixed probe is already at its 8-step floor)
    {"arm": "igia-autoprobe@20%", "scorer": "igia", "drop": 6, "extra": ["--probe-steps", "auto", "--probe-min-steps", "2"]},
]
