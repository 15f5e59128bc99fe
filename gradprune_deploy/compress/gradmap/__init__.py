"""GradMAP (arXiv 2602.14649): stage 1 scores layers by gradient magnitude, stage 2 compensates the cut.

    step                                   where                           pure function
    gradient-magnitude layer metric        score.gradmap (--scorer gradmap)    ranking.gradient_magnitude_terms
    greedy removal order → scores          score.gradmap                   ranking.ranks_from_removal_order
    dense outputs, before the cut          compensate.capture_dense        (no second model is kept)
    mean shift of each pruned layer        compensate.measure_shifts       compensation.shift_terms, compensation.mean_shift_norms
    layers to correct                      compensate.compensate_cut       compensation.largest_shift_layers
    fit the projection                     compensate.fit_layer            compensation.RegressionStats, compensation.fit_projection
    fold it into down_proj                 compensate.fold                 compensation.fold_into_linear
    options                                config.CompensationConfig (--compensate)

No imports here, so config.py stays torch-free.
"""
