"""gradprune-deploy: GradPruner layer pruning for fine-tuned LLMs, and the tools to ship the result.

The public API (imported lazily, so `gradprune --help` stays fast):

    from gradprune_deploy import CompressConfig, compress, evaluate, load_model_and_tokenizer, Manifest
"""

__version__ = "0.3.0"

# `compress` is the subpackage gradprune_deploy/compress/, which is callable: compress(config)
# runs compress.pipeline.compress (see compress/__init__.py), whichever way it was imported.
_API = {
    "CompressConfig": "gradprune_deploy.compress.config",
    "evaluate": "gradprune_deploy.evaluation.evaluate",
    "load_model_and_tokenizer": "gradprune_deploy.loading",
    "Manifest": "gradprune_deploy.manifest",
}
__all__ = ["compress", *_API]


def __getattr__(name: str):
    import importlib

    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name == "compress":
        return importlib.import_module("gradprune_deploy.compress")
    raise AttributeError(f"module 'gradprune_deploy' has no attribute {name!r}")
