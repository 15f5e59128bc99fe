"""FSDP2: the probe reads sharded LoRA gradients (torch-level FSDP2 on CPU, 2 gloo processes, against
one process on the same global batches), the training twin keeps the caller's model plain, and the
launches that cannot work (FSDP without CUDA, FSDP1, PrunedLoRA under FSDP, DeepSpeed ZeRO-3) are refused
with one `error:` line before the model loads.

accelerate 1.16 + Trainer cannot run FSDP on CPU (it falls back to DDP), so the accelerate path itself
needs a GPU machine; what runs here is the same sharding (`fully_shard`) the accelerate path applies.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradprune_deploy.cli import main
from gradprune_deploy.compress import distributed, finetune
from gradprune_deploy.compress.distributed import copy_trained, deepspeed_zero_stage, is_sharded, training_twin
from gradprune_deploy.compress.finetune import TrainSettings, recovery_finetune, run_probe
from gradprune_deploy.data import read_examples, tokenize_examples
from tests.conftest import SHARED_DATA, tiny_model

WORKER = Path(__file__).with_name("fsdp_probe_worker.py")
LAUNCH_ENV = (
    "ACCELERATE_USE_FSDP",
    "FSDP_VERSION",
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE",
)


def test_probe_scores_and_merge_masks_identical_under_fsdp2(tmp_path):  # ~16 s: two launches of a tiny model
    single, fsdp = tmp_path / "single.pt", tmp_path / "fsdp.pt"
    subprocess.run([sys.executable, str(WORKER), "single", str(single)], check=True, capture_output=True, timeout=300)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(WORKER), "fsdp", str(fsdp)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = torch.load(single), torch.load(fsdp)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["param_types"] == ["Parameter"] and two["param_types"] == ["DTensor"]  # the gradients read were sharded
    assert one["zero_gradient_steps"] == two["zero_gradient_steps"] == 1
    assert one["informative_steps"] == two["informative_steps"] == 4
    for a, b in zip(one["scores"], two["scores"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert one["masks"].keys() == two["masks"].keys() and len(one["masks"]) == 4 * 7
    for name, mask in one["masks"].items():
        assert torch.equal(mask, two["masks"][name]), name
    assert not one["merged_is_sharded"] and not two["merged_is_sharded"]
    for name, weight in one["merged"].items():  # the LoRA trained on shards, gathered and merged
        torch.testing.assert_close(two["merged"][name], weight, rtol=1e-5, atol=1e-6)


def test_training_twin_shares_storage_and_leaves_the_model_plain():
    model = tiny_model("llama", num_hidden_layers=2, vocab_size=256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = training_twin(model)
    assert twin is not model
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert p is not q and p.data_ptr() == q.data_ptr(), name
    assert twin.lm_head.weight is twin.model.embed_tokens.weight  # still tied
    for p in twin.parameters():  # what fully_shard / a dtype cast does to the twin's parameters
        p.data = p.data.double() + 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    copy_trained(twin, model)  # plain tensors: the same code path, copied into the model
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, before["model.layers.1.mlp.up_proj.weight"] + 1)


def _compress(tmp_path, *extra) -> list[str]:
    data = str(SHARED_DATA / "sst2")
    return ["compress", "--model", str(tmp_path / "never-loaded"), "--data", data, "--out", str(tmp_path / "out"), *extra]


def _refused(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def launch_env(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_fsdp_without_cuda_is_refused(launch_env, tmp_path, capsys):
    launch_env.setenv("ACCELERATE_USE_FSDP", "true")
    launch_env.setenv("FSDP_VERSION", "2")
    launch_env.setattr(distributed.torch.cuda, "is_available", lambda: False)
    err = _refused(_compress(tmp_path), capsys)
    assert "no CUDA device" in err and "fall back to DDP" in err and "examples/accelerate/ddp.yaml" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("env", "extra", "expected"),
    [
        ({"FSDP_VERSION": "1"}, (), "fsdp_version: 2"),
        ({"FSDP_VERSION": "2"}, ("--finetune", "prunedlora"), "--finetune prunedlora cannot run under FSDP"),
    ],
)
def test_fsdp_launches_that_cannot_work_are_refused(launch_env, tmp_path, capsys, env, extra, expected):
    launch_env.setenv("ACCELERATE_USE_FSDP", "true")
    for name, value in env.items():
        launch_env.setenv(name, value)
    launch_env.setattr(distributed.torch.cuda, "is_available", lambda: True)  # what a GPU machine would say
    assert expected in _refused(_compress(tmp_path, *extra), capsys)


@pytest.mark.parametrize("by", ["env", "config_file"])
def test_deepspeed_zero3_is_refused(launch_env, tmp_path, capsys, by):
    launch_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    if by == "env":
        launch_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    else:
        config = tmp_path / "ds.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
        launch_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    assert deepspeed_zero_stage() == 3
    err = _refused(_compress(tmp_path), capsys)
    assert "DeepSpeed ZeRO stage 3 is not supported" in err and "examples/accelerate/fsdp2.yaml" in err


def test_zero_stage_unset_without_deepspeed(launch_env):
    assert deepspeed_zero_stage() is None
    launch_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")  # without ACCELERATE_USE_DEEPSPEED: not DeepSpeed
    assert deepspeed_zero_stage() is None


@pytest.mark.slow
def test_shipped_fsdp2_config_is_refused_on_cpu_through_accelerate_launch(tmp_path):
    """The documented command, on a machine without CUDA: every process prints the one error line."""
    config = Path(__file__).resolve().parents[2] / "examples" / "accelerate" / "fsdp2.yaml"
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(config), "-m", "gradprune_deploy.cli", *_compress(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("no CUDA device" in line and "fall back to DDP" in line for line in errors), proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_twin_path_of_the_fine_tunes_matches_the_plain_one(mode, tokenizer, monkeypatch):
    """The FSDP wiring of run_probe / recovery_finetune (train a twin, gather back into the plain model),
    run unsharded on CPU: the same scores and weights as training the model itself, the model never sharded."""
    features = tokenize_examples(read_examples(str(SHARED_DATA / "sst2"), limit=16), tokenizer, max_length=64)
    settings = TrainSettings(batch_size=4, learning_rate=1e-3, max_steps=3, warmup_ratio=0.0, lora_dropout=0.0, sampling="sequential")
    results = []
    for twin in (False, True):
        monkeypatch.setattr(finetune, "fsdp_requested", lambda twin=twin: twin)
        model = tiny_model("llama", seed=3, num_hidden_layers=3)
        record, _ = run_probe(model, features, tokenizer, settings, probe_steps=2)
        untouched = {k: v.clone() for k, v in model.state_dict().items()}
        assert all(torch.equal(v, tiny_model("llama", seed=3, num_hidden_layers=3).state_dict()[k]) for k, v in untouched.items())
        recovered, _ = recovery_finetune(model, features, tokenizer, settings, mode=mode, quiet=True)
        assert not is_sharded(recovered) and type(recovered).__name__ == "LlamaForCausalLM"
        results.append((record.scores(), recovered.state_dict()))
    (scores, weights), (twin_scores, twin_weights) = results
    torch.testing.assert_close(twin_scores, scores, rtol=1e-6, atol=0)
    assert weights.keys() == twin_weights.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(twin_weights[name], weight, rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(weights[k], v) for k, v in untouched.items())  # the recovery did change weights
