"""gradprune-deploy: GradPruner layer pruning for fine-tuned LLMs, and the tools to ship the result.

The public API (imported lazily, so `gradprune --help` stays fast):

    from gradprune_deploy import CompressConfig, compress, evaluate, load_model_and_tokenizer, Manifest
"""

__version__ = "0.2.0"

_API = {
    "CompressConfig": "gradprune_deploy.compress.config",
    "compress": "gradprune_deploy.compress.pipeline",
    "evaluate": "gradprune_deploy.evaluation.evaluate",
    "load_model_and_tokenizer": "gradprune_deploy.loading",
    "Manifest": "gradprune_deploy.manifest",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'gradprune_deploy' has no attribute {name!r}")
