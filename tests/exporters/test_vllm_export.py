"""`gradprune export vllm`: reports what vLLM will see, writes nothing, refuses what vLLM cannot serve."""

from __future__ import annotations

import json
import shutil

import pytest

from gradprune_deploy.cli import main
from gradprune_deploy.errors import ArchitectureError, ModelLoadError
from gradprune_deploy.runtime.vllm_server import check_vllm_compatible

pytest.importorskip("vllm")


@pytest.fixture
def ckpt(tmp_path, tiny_llama_dir):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, out)
    return out


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_servable_checkpoint_reports_and_writes_nothing(ckpt, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    report = check_vllm_compatible(ckpt)
    assert report["architecture"] == "LlamaForCausalLM" and report["num_hidden_layers"] == 6
    assert report["dtype"] == "float32" and report["weights_dtype"] == "float32" and report["vllm"].startswith("vllm")

    assert main(["export", "vllm", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "servable by vLLM as it is" in out and "layers        6" in out
    assert f"gradprune serve {ckpt}" in out and f"--model {ckpt}" in out
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before


def test_unservable_checkpoints_fail_with_the_reason(ckpt, capsys):
    _edit_config(ckpt, num_hidden_layers=4)  # weights hold 6 layers: config not rewritten after pruning
    with pytest.raises(ModelLoadError, match=r"num_hidden_layers=4 but the weights disagree \(unexpected layer\(s\) \[4, 5\]\)"):
        check_vllm_compatible(ckpt)
    _edit_config(ckpt, num_hidden_layers=7)
    with pytest.raises(ModelLoadError, match=r"missing layer\(s\) \[6\]"):
        check_vllm_compatible(ckpt)
    _edit_config(ckpt, num_hidden_layers=6, architectures=["MadeUpForCausalLM"])
    with pytest.raises(ArchitectureError, match="architecture MadeUpForCausalLM is not supported by the installed vLLM"):
        check_vllm_compatible(ckpt)
    assert main(["export", "vllm", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: architecture MadeUpForCausalLM") and "\n" not in err
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        check_vllm_compatible(ckpt)
