"""`gradprune compress`: a model + data → a smaller standard checkpoint + gradprune.json.

Orchestration (pipeline.py wires; scoring.py, finetune.py, ledger.py run steps) apart from the
pure math (importance.py: IGIA; selection.py: which layers; merge.py: same-sign merge;
surgery.py: config rewrite; distill.py: the KD loss).
"""
