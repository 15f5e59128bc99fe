"""PrunedLoRA (2025): recover with an over-parameterised LoRA pruned to the target rank during training.

    step                                  where                                 pure function
    when to prune, how many components    callback.PrunedLoRACallback           pruning.rank_schedule
    score rank components                 callback.on_pre_optimizer_step        pruning.component_scores
    prune + Optimal Brain Surgeon update  callback.on_pre_optimizer_step        pruning.prune_components, pruning.obs_remove
    warn when the run is too short        finetune._attach_prunedlora           pruning.paper_pace_gap
    options                               config.PrunedLoRAConfig

No imports here, so config.py stays torch-free.
"""
