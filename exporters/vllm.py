"""Check that vLLM can serve a checkpoint as it is, and say what vLLM will see.

A GradPruner checkpoint is already a standard Hugging Face directory (layers renumbered,
`num_hidden_layers` rewritten), so "exporting" to vLLM writes nothing: it checks the
architecture is one vLLM implements, the config loads, and the weights hold exactly the layers
the config announces; then it reports architecture, layers, dtype and the command to serve it.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field

from gradprune_deploy.config_schema import validate_fields
from gradprune_deploy.runtime.vllm_server import check_vllm_compatible

logger = logging.getLogger(__name__)


def serve_command(checkpoint_dir: str, *, port: int = 8000, dtype: str = "auto", max_model_len: int = 2048) -> str:
    return shlex.join(
        ["gradprune", "serve", str(checkpoint_dir), "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len)]
    )


@dataclass
class VllmExportConfig:
    """Check a checkpoint is servable by vLLM as it is (nothing is written) and print how to serve it."""

    checkpoint: str = field(metadata={"positional": True, "help": "checkpoint directory to check"})

    def __post_init__(self):
        validate_fields(self)


def export_vllm(config: VllmExportConfig) -> str:
    """`gradprune export vllm`: the report, then the serve commands (gradprune's and plain vLLM's)."""
    report = check_vllm_compatible(config.checkpoint)
    path = report["checkpoint"]
    plain = shlex.join(["python", "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--max-model-len", "2048"])
    lines = [
        f"{path} is servable by vLLM as it is (nothing written):",
        f"  architecture  {report['architecture']}",
        f"  layers        {report['num_hidden_layers']}",
        f"  dtype         {report['dtype']} (weights stored as {report['weights_dtype']})",
        f"  parameters    {report['parameters']:,}",
        f"  vLLM          {report['vllm']}",
        "serve it:",
        f"  {serve_command(path)}",
        f"  {plain}   # vLLM directly (`vllm serve {shlex.quote(path)}` with the GPU build)",
    ]
    return "\n".join(lines)
