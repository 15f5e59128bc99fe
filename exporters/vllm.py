"""Check that vLLM can serve a checkpoint as it is, and say what vLLM will see.

A GradPruner checkpoint is already a standard Hugging Face directory (layers renumbered,
`num_hidden_layers` rewritten), so "exporting" to vLLM writes nothing: it checks the
architecture is one vLLM implements, the config loads, the weights hold exactly the layers the
config announces, and (verify.py) every file is whole, every tensor finite and the tokenizer
loadable; then it reports architecture, layers, dtype and the command to serve it, with a
--max-model-len the model's positions allow, so the command runs as printed.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field

from gradprune_deploy.config_schema import validate_fields
from gradprune_deploy.runtime.vllm_server import check_vllm_compatible
from gradprune_deploy.verify import verify_checkpoint

logger = logging.getLogger(__name__)


DEFAULT_MAX_MODEL_LEN = 2048  # `gradprune serve`'s default


def model_len_for(config: dict, wanted: int = DEFAULT_MAX_MODEL_LEN) -> int:
    """`wanted`, capped at the model's max_position_embeddings (config.json, or its text_config): a
    longer --max-model-len is refused by `gradprune serve` and by vLLM itself."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    limit = text.get("max_position_embeddings")
    return min(wanted, limit) if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else wanted


def serve_command(checkpoint_dir: str, *, port: int = 8000, dtype: str = "auto", max_model_len: int = DEFAULT_MAX_MODEL_LEN) -> str:
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
    verified = verify_checkpoint(config.checkpoint)  # "servable" only if every file is whole, every tensor finite
    report = check_vllm_compatible(verified.path)
    path = report["checkpoint"]
    max_len = model_len_for(verified.info.config)
    plain = shlex.join(["python", "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--max-model-len", str(max_len)])
    lines = [
        f"{path} is servable by vLLM as it is (nothing written; {verified.tensors} tensors read, all finite; tokenizer loads):",
        f"  architecture  {report['architecture']}",
        f"  layers        {report['num_hidden_layers']}",
        f"  dtype         {report['dtype']} (weights stored as {report['weights_dtype']})",
        f"  parameters    {report['parameters']:,}",
        f"  vLLM          {report['vllm']}",
        "serve it:",
        f"  {serve_command(path, max_model_len=max_len)}",
        f"  {plain}   # vLLM directly (`vllm serve {shlex.quote(path)}` with the GPU build)",
    ]
    return "\n".join(lines)
