"""`gradprune compress`: a model + data → a smaller standard checkpoint + gradprune.json.

Orchestration (pipeline.py wires; scoring.py, finetune.py, ledger.py run steps) apart from the
pure math (importance.py: IGIA; selection.py: which layers; merge.py: same-sign merge;
surgery.py: config rewrite; distill.py: the KD loss).

The package itself is the public function: `from gradprune_deploy import compress` then
`compress(CompressConfig(...))` calls `pipeline.compress` (imported lazily: no torch until then).
"""

import sys
import types


def _run(config):
    from .pipeline import compress

    return compress(config)


class _CallablePackage(types.ModuleType):
    def __call__(self, config):
        """Run GradPruner end to end (see pipeline.compress)."""
        return _run(config)


sys.modules[__name__].__class__ = _CallablePackage
