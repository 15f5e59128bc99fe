"""GradPruner (ICLR 2026): layer importance from a short LoRA probe (IGIA), and the same-sign merge.

    step                                   where                        pure function
    read LoRA gradients during the probe   probe.IGIAProbe (callback)   importance.step_score (squared | norm)
    layer scores                           probe.ProbeRecord.scores     importance.layer_scores
    when to stop (--probe-steps auto)      probe.IGIAProbe              convergence.ranking_converged
    element-level IGIA of a dropped layer  ProbeRecord.igia_for_layer   importance.igia_matrix
    which dropped layers to merge          cut.apply_cut                merge.layers_to_merge
    merge into the preceding kept layer    apply_merge.merge_dropped_layers   merge.merge_targets, merge.same_sign_merge
    options                                config.ProbeConfig, config.MergeConfig, probe.ProbeOptions

The probe run itself (a Trainer) is finetune.run_probe. No imports here, so config.py stays torch-free.
"""
