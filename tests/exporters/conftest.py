"""Fixtures for exporter tests: a Hub-protocol server on 127.0.0.1 and a checkpoint made by the real `compress`."""

from __future__ import annotations

import huggingface_hub.constants as constants
import pytest

from gradprune_deploy.cli import main
from gradprune_deploy.manifest import Manifest
from tests.conftest import SHARED_DATA
from tests.hub_server import LocalHubServer

HUB_TOKEN = "hf_testtoken0123456789abcdefXYZ"  # accepted by the local server only


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A fresh Hub-protocol server; the real huggingface_hub client is pointed at it.

    `HF_ENDPOINT` is read when huggingface_hub is imported, so besides the environment (for
    subprocesses) the already-imported constants are patched too, for transformers'
    `from_pretrained("NS/NAME")` in this process. The HF cache goes to tmp_path.
    """
    with LocalHubServer(tmp_path / "hub-storage", tokens={HUB_TOKEN: "tester"}) as hub:
        env = {
            "HF_ENDPOINT": hub.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub"),
        }
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


# The real `gradprune compress` on the tiny random Llama, small enough for a CPU test run: 2 of 6
# layers dropped, one of them merged (so the card shows a merged and an unmerged layer), a LoRA
# fine-tune, and the held-out quality ledger on sst2's test rows (they carry `choices`: accuracy too).
COMPRESS_ARGS = [
    "--max-examples",
    "32",
    "--max-length",
    "64",
    "--batch-size",
    "4",
    "--max-steps",
    "4",
    "--probe-steps",
    "2",
    "--drop-layers",
    "2",
    "--merge-layers",
    "1",
    "--validation-rows",
    "16",
    "-q",
]


@pytest.fixture(scope="session")
def compressed_dir(tmp_path_factory, tiny_llama_dir):
    """A checkpoint as `gradprune compress` writes it (weights, tokenizer, gradprune.json, plot); read-only."""
    out = tmp_path_factory.mktemp("compressed") / "tiny-pruned"
    code = main(["compress", "--model", str(tiny_llama_dir), "--data", str(SHARED_DATA / "sst2"), "--out", str(out), *COMPRESS_ARGS])
    assert code == 0, "gradprune compress failed on the tiny model (see the error line above)"
    return out


def edit_manifest(ckpt, **changes) -> Manifest:
    """Change fields of a checkpoint's real manifest through the schema; nested ones as `data__source=...`.

    For what compress records for inputs a test cannot run offline (a bundled base model, a Hub dataset).
    """
    manifest = Manifest.read(ckpt)
    for name, value in changes.items():
        target = manifest
        *path, last = name.split("__")
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, last):
            raise AttributeError(f"{type(target).__name__} has no field {last!r}")
        setattr(target, last, value)
    manifest.write(ckpt)
    return manifest
