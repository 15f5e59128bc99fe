"""`gradprune export hub --with ...`: quantised artefacts built, validated, scored and published in the same
commit as the checkpoint, through a Hub-protocol server on 127.0.0.1 and the real client."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, snapshot_download
from transformers import AutoConfig

from exporters.hub import HubExportConfig, export_hub
from exporters.hub_artefacts import parse_artefacts
from gradprune_deploy.cli import main
from gradprune_deploy.errors import ConfigError
from gradprune_deploy.manifest import Manifest
from gradprune_deploy.runtime.onnx_runtime import OnnxCausalLM
from tests.exporters.conftest import HUB_TOKEN


@pytest.fixture
def ckpt(tmp_path, compressed_dir):
    out = tmp_path / "tiny-pruned"
    shutil.copytree(compressed_dir, out)
    return out


def test_parse_artefacts_accepts_spaces_and_commas_once_each():
    assert parse_artefacts(["onnx-int4,gguf-q8_0", "onnx-int4"]) == ["onnx-int4", "gguf-q8_0"]
    assert parse_artefacts(None) == []
    with pytest.raises(ConfigError, match="--with 'gguf-q5'.*onnx-int4"):
        parse_artefacts(["gguf-q5"])


def test_push_with_int4_onnx_and_q8_0_gguf(local_hub, ckpt):
    export_hub(
        HubExportConfig(str(ckpt), repo_id="tester/tiny-q", token=HUB_TOKEN, endpoint=local_hub.url, with_artefacts=["onnx-int4,gguf-q8_0"])
    )
    assert len(local_hub.commits("tester/tiny-q")) == 1  # everything in one commit
    snap = Path(snapshot_download("tester/tiny-q", endpoint=local_hub.url, token=HUB_TOKEN))
    source = Manifest.read(ckpt)
    # each artefact's folder: its files, and its own gradprune.json with its ledger stage
    for name in ("onnx-int4", "gguf-q8_0"):
        m = Manifest.read(snap / name)
        record = next(a for a in m.artefacts if a.stage == name)
        assert all((snap / name / f).is_file() for f in record.files)
        assert record.quality is not None and record.quality.rows == source.quality.rows
        assert m.quality.point(name) == record.quality
    # the int4 graph generates; the GGUF reads back with the pruned layer count
    lm = OnnxCausalLM(snap / "onnx-int4")
    assert lm.generate([[1, 2, 3]], max_new_tokens=3).shape[1] >= 1
    gguf = next(f for f in (snap / "gguf-q8_0").iterdir() if f.suffix == ".gguf")
    assert AutoConfig.from_pretrained(snap / "gguf-q8_0", gguf_file=gguf.name).num_hidden_layers == source.num_layers_after
    # the card lists both, with sizes and measured quality, and how to run each
    card = ModelCard.load(snap / "README.md").text
    assert "## Quantised and exported versions" in card
    assert "**onnx-int4**" in card and "**gguf-q8_0**" in card and "ollama create" in card and "OnnxCausalLM" in card
    # the checkpoint itself is unchanged
    assert Manifest.read(ckpt).artefacts == []


def test_bad_with_is_one_line_before_any_request(local_hub, ckpt, capsys):
    code = main(
        [
            "export",
            "hub",
            str(ckpt),
            "--repo-id",
            "tester/tiny-bad",
            "--token",
            HUB_TOKEN,
            "--endpoint",
            local_hub.url,
            "--with",
            "onnx-int3",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --with 'onnx-int3'")
    assert local_hub.requests == []
