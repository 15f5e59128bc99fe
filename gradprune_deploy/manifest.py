"""gradprune.json: the machine-readable record of how a checkpoint was made; `gradprune inspect`."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GradPruneError

MANIFEST_NAME = "gradprune.json"
SCHEMA_VERSION = 1


def environment_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("gradprune-deploy", "torch", "transformers", "peft", "accelerate"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_NAME
    record = {"schema_version": SCHEMA_VERSION, **manifest, "versions": environment_versions()}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise GradPruneError(f"{path} not found: this is not a checkpoint written by `gradprune compress`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GradPruneError(f"{path} is not valid JSON ({exc.msg}): the manifest is corrupt") from None


def command_line() -> str:
    import shlex

    prog = Path(sys.argv[0]).name
    if prog in ("gradprune", "cli.py", "__main__.py", "-m"):
        return shlex.join(["gradprune", *sys.argv[1:]])
    return shlex.join([prog, *sys.argv[1:]])


def summarize(manifest: dict[str, Any]) -> str:
    """A human summary of a manifest (what `gradprune inspect` prints)."""
    lines = [
        f"base model      {manifest.get('base_model')}",
        f"data            {manifest.get('data', {}).get('source')} ({manifest.get('data', {}).get('examples')} examples)",
        f"scorer          {manifest.get('scorer')}",
        f"layers          {manifest.get('num_layers_before')} → {manifest.get('num_layers_after')}",
        f"dropped         {manifest.get('layers_dropped')}",
        f"parameters      {manifest.get('params_before'):,} → {manifest.get('params_after'):,}"
        f" ({manifest.get('params_after') / manifest.get('params_before'):.1%})"
        if manifest.get("params_before") else "parameters      ?",
    ]
    probe = manifest.get("probe") or {}
    if probe:
        lines.append(f"probe           {probe.get('probe_steps')} informative steps (+{probe.get('zero_gradient_steps')} zero-gradient), {probe.get('seconds', 0):.1f} s")
    merge = manifest.get("merge") or {}
    if merge.get("enabled"):
        lines.append(f"merge           top {merge.get('keep_top_p'):.0%} by IGIA, same sign; {merge.get('merged_entries_total'):,} entries added")
    ft = manifest.get("finetune") or {}
    if ft.get("mode") and ft.get("mode") != "none":
        lines.append(f"fine-tune       {ft.get('mode')}, {ft.get('steps')} steps, loss {ft.get('first_logged_loss')} → {ft.get('last_logged_loss')}, {ft.get('seconds', 0):.1f} s")
    lines.append(f"total time      {manifest.get('timings', {}).get('total_seconds', 0):.1f} s")
    lines.append(f"command         {manifest.get('command')}")
    return "\n".join(lines)


@dataclass
class InspectConfig:
    """Show the gradprune.json of a compressed checkpoint."""

    checkpoint: str = field(default=None, metadata={"help": "checkpoint directory", "positional": True})
    json: bool = field(default=False, metadata={"help": "print the whole manifest as JSON"})


def inspect_from_config(config: InspectConfig) -> str:
    manifest = read_manifest(config.checkpoint)
    return json.dumps(manifest, indent=2) if config.json else summarize(manifest)
