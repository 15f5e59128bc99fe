"""gradprune-deploy: GradPruner layer pruning for fine-tuned LLMs, and the tools to ship the result.

The public API (imported lazily, so `gradprune --help` stays fast). Each command's function takes
its config dataclass, the same schema as its CLI flags and a YAML recipe:

    from gradprune_deploy import CompressConfig, EvalConfig, Manifest, compress, evaluate, load_model_and_tokenizer

    compress(CompressConfig(data="../shared/data/sst2", out="runs/sst2-pruned"))
    evaluate(EvalConfig("runs/sst2-pruned", data="../shared/data/sst2", metric="choice"))
"""

import importlib

__version__ = "0.3.0"

# `compress` is the subpackage gradprune_deploy/compress/, which is callable: compress(config)
# runs compress.pipeline.compress (see compress/__init__.py), whichever way it was imported.
_API = {
    "CompressConfig": "gradprune_deploy.compress.config",
    "EvalConfig": "gradprune_deploy.evaluation.evaluate",
    "evaluate": "gradprune_deploy.evaluation.evaluate",
    "load_model_and_tokenizer": "gradprune_deploy.loading",
    "Manifest": "gradprune_deploy.manifest",
}
__all__ = ["compress", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name == "compress":
        return importlib.import_module("gradprune_deploy.compress")
    raise AttributeError(f"module 'gradprune_deploy' has no attribute {name!r}")
