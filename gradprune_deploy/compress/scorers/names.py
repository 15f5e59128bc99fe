"""The scorer names `--scorer` accepts, in one torch-free place (config.py validates against it, the
scorer registry is checked against it). Adding a scorer: its module, one entry in registry.SCORERS,
its name here.
"""

from __future__ import annotations

IGIA = "igia"  # GradPruner's own: the LoRA probe (compress/igia/)
AUTO = "auto"  # not a scorer: try AUTO_CANDIDATES (or --auto-candidates) and keep the best cut
PPL = "ppl"  # measured on the validation rows, not the training batches
GRADMAP = "gradmap"  # can stop after the number of layers to drop (compress/gradmap/)

# the scorers behind one signature, score(model, batches, *, seed) (registry.SCORERS)
BASELINE_SCORERS = ("block-influence", "last-n", "random", GRADMAP, "taylor", "gblm", PPL)
SCORER_NAMES = (IGIA, *BASELINE_SCORERS, AUTO)  # --scorer's choices, in --help order
AUTO_CANDIDATES = (IGIA, "block-influence", "last-n", PPL)
MERGING_SCORERS = (IGIA, AUTO)  # the merge needs IGIA's per-entry importance
