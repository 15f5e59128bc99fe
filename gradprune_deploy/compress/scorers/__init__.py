"""The baseline layer scorers (`--scorer ...`; igia, GradPruner's own, is compress/igia/; gradmap is
compress/gradmap/). One signature for all, registry.SCORERS; one torch-free list of names, names.py.

    scorer            where                              pure function
    block-influence   block_influence.block_influence    block_influence.block_influence_terms (ShortGPT)
    last-n, random    data_free.last_n, data_free.random_scores   (no data)
    taylor            taylor.taylor                      taylor.taylor_terms
    ppl               ppl.ppl (validation rows)          common.completion_loss per bypassed layer
    gblm              gblm.gblm, gblm.gblm_importance    gblm_metric.gblm_metric, gblm_metric.layer_total
    options           config.ScorerConfig (--scorer-batches)

No imports here, so names.py and config.py stay torch-free.
"""
