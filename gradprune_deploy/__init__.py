"""gradprune-deploy: GradPruner layer pruning for fine-tuned LLMs, and the tools to ship the result."""

__version__ = "0.1.0"
