"""Fixtures for exporter tests: a Hub-protocol server on 127.0.0.1 and small checkpoints."""

from __future__ import annotations

import json

import pytest

from tests.hub_server import LocalHubServer

HUB_TOKEN = "hf_testtoken0123456789abcdefXYZ"  # accepted by the local server only


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A fresh Hub-protocol server; the real huggingface_hub client is pointed at it.

    `HF_ENDPOINT` is read when huggingface_hub is imported, so besides the environment (for
    subprocesses) the already-imported constants are patched too, for transformers'
    `from_pretrained("NS/NAME")` in this process. The HF cache goes to tmp_path.
    """
    import huggingface_hub.constants as constants

    with LocalHubServer(tmp_path / "hub-storage", tokens={HUB_TOKEN: "tester"}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
               "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub")}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
        yield hub


def write_manifest(ckpt, **overrides) -> dict:
    """A gradprune.json as the compression stage writes it (keys it may or may not have)."""
    manifest = {
        "base_model": "bundled:SmolLM2-135M-Instruct",
        "num_layers_before": 8, "num_layers_after": 6,
        "layers_dropped": [3, 5], "layers_kept": [0, 1, 2, 4, 6, 7],
        "layer_scores": [0.9, 0.8, 0.7, 0.05, 0.6, 0.04, 0.5, 0.95],
        "params_before": 3_300_000, "params_after": 3_200_000,
        "command": ["gradprune", "compress", "--model", "bundled:SmolLM2-135M-Instruct", "--drop", "2"],
        "finetune": {"method": "lora", "r": 8, "steps": 20},
        "data": {"train": "../shared/data/sst2/train.jsonl"},
    }
    manifest.update(overrides)
    (ckpt / "gradprune.json").write_text(json.dumps(manifest))
    return manifest
