"""`gradprune export hub` round trips through a Hub-protocol server on 127.0.0.1, with the real client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants as constants
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import AutoModelForCausalLM

from exporters.hub import HubExportConfig, export_hub, public_manifest
from gradprune_deploy.cli import main
from gradprune_deploy.errors import ConfigError, ExportError, ModelLoadError
from gradprune_deploy.manifest import Manifest
from tests.conftest import free_port
from tests.exporters.conftest import HUB_TOKEN, edit_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ckpt(tmp_path, compressed_dir):
    """A real `compress` output (manifest, plot) plus an eval result and a bench report."""
    out = tmp_path / "tiny-pruned"
    shutil.copytree(compressed_dir, out)
    edit_manifest(out, base_model="bundled:SmolLM2-135M-Instruct")  # what compress records for the bundled model
    (out / "eval_sst2.json").write_text(
        json.dumps({"metric": "accuracy", "value": 0.75, "data": "../shared/data/sst2/test.jsonl", "n": 872})
    )
    (out / "bench").mkdir()
    (out / "bench" / "report.md").write_text(
        "# Dense vs pruned\n\n| model | tok/s |\n|---|---:|\n| pruned | 42 |\n\n![latency](latency.png)\n"
    )
    (out / "bench" / "latency.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\1" * 64)
    return out


def _logits(model_dir_or_id, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(model_dir_or_id, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 20, 300, 4000, 5]])).logits


def push_to_hub(checkpoint, **options) -> str:
    return export_hub(HubExportConfig(str(checkpoint), **options))


def test_push_round_trip_same_logits_and_card(local_hub, ckpt):
    url = push_to_hub(ckpt, repo_id="tester/tiny-pruned", token=HUB_TOKEN, endpoint=local_hub.url)

    head = local_hub.commits("tester/tiny-pruned")[0]
    assert url == f"{local_hub.url}/tester/tiny-pruned/commit/{head}"
    snapshot = Path(snapshot_download("tester/tiny-pruned", endpoint=local_hub.url, token=HUB_TOKEN))
    local_files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    remote_files = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    assert remote_files == local_files | {"README.md"}
    for rel in local_files - {"gradprune.json"}:
        assert (snapshot / rel).read_bytes() == (ckpt / rel).read_bytes(), rel
    # the manifest goes up without the user's directory layout, and otherwise as it is
    local, remote = (ckpt / "gradprune.json").read_text(), (snapshot / "gradprune.json").read_text()
    local_m, remote_m = Manifest.read(ckpt), Manifest.read(snapshot)
    assert Path(local_m.config["out"]).is_absolute() and local_m.config["out"] in local and local_m.config["out"] not in remote
    assert "/shared/data" in local and "/shared/data" not in remote
    assert remote_m.layers_dropped == local_m.layers_dropped and remote_m.quality.points == local_m.quality.points
    assert remote_m.data.source == Path(local_m.data.source).name and remote_m.base_model == local_m.base_model
    # The user's path: from_pretrained("NS/NAME") through the endpoint, not a local directory.
    assert torch.equal(_logits("tester/tiny-pruned", token=HUB_TOKEN), _logits(ckpt))

    card = ModelCard.load(snapshot / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"gradprune", "layer-pruning", "llama"} <= set(card.data.tags)
    assert card.data.metrics == ["accuracy", "loss"]  # eval_sst2.json + the held-out quality ledger
    results = {(r.dataset_name, r.metric_type, r.metric_value) for r in card.data.eval_results}
    assert ("sst2", "accuracy", 0.75) in results and len(results) == 3
    assert "## Held-out quality" in card.text and "was merged into kept layer" in card.text
    assert "![Layer importance" in card.text and "(layer_importance.png)" in card.text
    assert "](bench/latency.png)" in card.text and "| pruned | 42 |" in card.text
    manifest = Manifest.read(ckpt)
    assert f"Layers dropped (original indices): {', '.join(map(str, manifest.layers_dropped))}" in card.text
    assert f"```bash\n{manifest.command}\n```" in card.text
    assert 'from_pretrained("tester/tiny-pruned")' in card.text and "vllm serve tester/tiny-pruned" in card.text


def test_public_manifest_strips_local_paths_only():
    text = json.dumps(
        {
            "data": "/home/alice/projects/med/train.jsonl",
            "out": "~/runs/pruned",
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "url": "https://huggingface.co/a/b",
            "command": "gradprune compress --data /home/alice/med/ --out ./rel/dir --model bundled:SmolLM2-135M-Instruct",
            "ratio": "3/4",
        }
    )
    public = json.loads(public_manifest(text))
    assert public["data"] == "train.jsonl" and public["out"] == "pruned"
    assert public["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and public["url"] == "https://huggingface.co/a/b"
    assert public["command"] == "gradprune compress --data . --out ./rel/dir --model bundled:SmolLM2-135M-Instruct"
    assert public["ratio"] == "3/4"


def test_second_push_makes_a_new_commit(local_hub, ckpt):
    first = push_to_hub(ckpt, repo_id="tester/again", token=HUB_TOKEN, endpoint=local_hub.url)
    (ckpt / "eval_pubmedqa.json").write_text(json.dumps({"metric": "accuracy", "value": 0.5, "data": "pubmedqa"}))
    second = push_to_hub(ckpt, repo_id="tester/again", token=HUB_TOKEN, endpoint=local_hub.url, commit_message="add eval")

    commits = local_hub.commits("tester/again")
    assert len(commits) == 2 and first.endswith(commits[1]) and second.endswith(commits[0])
    card = ModelCard.load(hf_hub_download("tester/again", "README.md", endpoint=local_hub.url, token=HUB_TOKEN))
    assert {r.dataset_name for r in card.data.eval_results} == {"sst2", "pubmedqa"}
    # Pushing identical content again is not an error either; the client skips the empty commit.
    assert push_to_hub(ckpt, repo_id="tester/again", token=HUB_TOKEN, endpoint=local_hub.url).endswith(commits[0])


def test_private_repo_on_a_branch(local_hub, ckpt):
    url = push_to_hub(ckpt, repo_id="tester/secret", token=HUB_TOKEN, endpoint=local_hub.url, private=True, revision="v1")
    api = HfApi(endpoint=local_hub.url)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/secret", revision="v1", token=False)
    info = api.model_info("tester/secret", revision="v1", token=HUB_TOKEN)
    assert info.private and url.endswith(info.sha) and "README.md" in {s.rfilename for s in info.siblings}
    assert local_hub.commits("tester/secret", "main") == []


def test_no_token_fails_before_any_request(local_hub, ckpt):
    with pytest.raises(ConfigError, match="no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass --token"):
        push_to_hub(ckpt, repo_id="tester/x", endpoint=local_hub.url)
    assert local_hub.requests == []


def test_cli_bad_input_is_one_line_exit_2(local_hub, ckpt, capsys, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(ckpt, newer)
    manifest = json.loads((newer / "gradprune.json").read_text())
    (newer / "gradprune.json").write_text(json.dumps({**manifest, "schema_version": manifest["schema_version"] + 1}))
    cases = [
        (["export", "hub", str(newer), "--repo-id", "tester/x", "--token", HUB_TOKEN], "newer than this gradprune-deploy reads"),
        (["export", "hub", str(ckpt), "--repo-id", "no-namespace"], "invalid repo id 'no-namespace'"),
        (["export", "hub", str(ckpt), "--repo-id", "a/b--c"], "invalid repo id"),
        (["export", "hub", str(ckpt)], "--repo-id is required"),
        (["export", "hub", str(ckpt), "--repo-id", "tester/x"], "no Hugging Face token"),
        (["export", "hub", str(tmp_path / "missing"), "--repo-id", "tester/x", "--token", HUB_TOKEN], "not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert local_hub.requests == []


def test_checkpoint_without_weights_or_config(local_hub, ckpt):
    for missing, message in (("model.safetensors", "no weights"), ("config.json", "no config.json")):
        broken = ckpt.parent / f"broken-{missing}"
        shutil.copytree(ckpt, broken)
        (broken / missing).unlink()
        with pytest.raises(ModelLoadError, match=message):
            push_to_hub(broken, repo_id="tester/broken", token=HUB_TOKEN, endpoint=local_hub.url)
    assert local_hub.requests == []


def test_unreachable_endpoint_and_rejected_token(local_hub, ckpt):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ExportError, match=f"cannot reach the Hub at {dead}.*no commit was made"):
        push_to_hub(ckpt, repo_id="tester/x", token=HUB_TOKEN, endpoint=dead)
    wrong = "hf_wrongtoken0123456789"
    with pytest.raises(ExportError, match="rejected the token") as exc:
        push_to_hub(ckpt, repo_id="tester/x", token=wrong, endpoint=local_hub.url)
    assert wrong not in str(exc.value)
    assert not local_hub.store.exists("tester/x")


def test_token_inside_a_file_is_refused(local_hub, ckpt):
    edit_manifest(ckpt, command=f"gradprune compress --token {HUB_TOKEN}")
    with pytest.raises(ExportError, match="contains the Hub token") as exc:
        push_to_hub(ckpt, repo_id="tester/x", token=HUB_TOKEN, endpoint=local_hub.url)
    assert HUB_TOKEN not in str(exc.value) and local_hub.requests == []


def test_cli_push_never_shows_or_stores_the_token(local_hub, ckpt, tmp_path):
    """The real command in a fresh process (HF_TOKEN + HF_ENDPOINT from the environment, debug logs on)."""
    env = {**os.environ, "HF_TOKEN": HUB_TOKEN, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "gradprune_deploy.cli", "export", "hub", str(ckpt), "--repo-id", "tester/cli", "-v"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"{local_hub.url}/tester/cli/commit/{local_hub.commits('tester/cli')[0]}"
    assert HUB_TOKEN not in result.stdout + result.stderr
    stored = [p for p in Path(local_hub.store.root).rglob("*") if p.is_file()]
    assert stored and not any(HUB_TOKEN.encode() in p.read_bytes() for p in stored)
    assert not any(HUB_TOKEN.encode() in p.read_bytes() for p in ckpt.rglob("*") if p.is_file())
    writes = [r for r in local_hub.requests if r["method"] == "POST" and r["path"].startswith("/api/models/")]
    assert writes and all(r["auth"] for r in writes)  # the token came from HF_TOKEN


def test_endpoint_without_xet_names_the_switch(local_hub, ckpt, monkeypatch):
    """huggingface_hub uploads through Xet when hf_xet is installed; a plain Hub-protocol server has no Xet."""
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    with pytest.raises(ExportError, match="does not offer Xet storage: set HF_HUB_DISABLE_XET=1"):
        push_to_hub(ckpt, repo_id="tester/xet", token=HUB_TOKEN, endpoint=local_hub.url)
    assert local_hub.commits("tester/xet") == []
