"""`gradprune compress`: a model + data → a smaller standard checkpoint + gradprune.json.

Orchestration apart from the pure math (the llm-compressor shape). Each step, and its pure function:

    step                        orchestration                         pure math
    read + hold out rows        pipeline._read_data, ledger.hold_out  ledger.split_slice
    score layers (igia)         scoring.igia_scores, finetune.run_probe, igia/probe.py   igia/importance.py
    score layers (baselines)    scoring.score_layers → scorers/registry.SCORERS          scorers/*_terms, scorers/gblm_metric.py
    score layers (gradmap)      gradmap/score.py                      gradmap/ranking.py
    choose the cut              cut.choose_cut, cut.judge_cut         selection.select_layers_to_drop
    merge (GradPruner)          cut.apply_cut, igia/apply_merge.py    igia/merge.py (same_sign_merge)
    drop layers                 surgery.drop_layers                   surgery.prune_config_dict
    compensate (GradMAP)        gradmap/compensate.py                 gradmap/compensation.py
    recover                     finetune.recovery_finetune            distill.py, prunedlora/pruning.py
    measure quality             ledger.measure                        ledger.verdict
    record                      manifest.Manifest.from_run            -
    wire it all                 pipeline.compress                     -

Options: config.CompressConfig, composed of one small config per concern (see config.py).

The package itself is the public function: `from gradprune_deploy import compress` then
`compress(CompressConfig(...))` calls `pipeline.compress`, imported on the first call so that
importing the package (and its torch-free config) does not import torch.
"""

import sys
import types


def _run(config):
    from .pipeline import compress  # noqa: PLC0415 - importing the package must not import torch (the CLI validates configs first)

    return compress(config)


class _CallablePackage(types.ModuleType):
    def __call__(self, config):
        """Run GradPruner end to end (see pipeline.compress)."""
        return _run(config)


sys.modules[__name__].__class__ = _CallablePackage
