"""Nothing broken is published, and training never saves a broken model: the bad-input matrix's promise
(exit 2, one `error:` line naming the file or option, no traceback, nothing written or uploaded, no input
changed) for damaged artefacts and diverging fine-tunes, through the real CLI on tiny random models.

- A checkpoint whose model.safetensors is cut to half its size, holds a NaN, or has no tokenizer is refused
  by `export vllm`, `export hub` (against the local Hub-protocol server: no request is made), `export onnx`
  and `serve` — each reads and verifies the whole checkpoint first (gradprune_deploy/verify.py).
- `compress` stops a fine-tune whose loss goes non-finite, naming --learning-rate; refuses to save
  non-finite weights; refuses an input with non-finite weights; and refuses fine-tune options out of the
  range the libraries accept (--warmup-ratio ≥ 1 is a step count to transformers) before any work.
- `export vllm` prints a `serve` command that `gradprune serve` runs as printed.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import socket
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import serving.serve as serve_module
from gradprune_deploy.cli import main
from gradprune_deploy.compress.config import CompressConfig
from gradprune_deploy.compress.divergence import StopOnNonFiniteLoss
from gradprune_deploy.compress.finetune import TrainSettings, _training_args
from gradprune_deploy.errors import ConfigError
from tests.conftest import free_port, tiny_model
from tests.exporters.conftest import HUB_TOKEN, local_hub  # noqa: F401 - the local Hub-protocol server fixture
from tests.test_bad_inputs import FAST, ROWS, _snapshot, assert_one_error_line

POISONED = "model.layers.2.mlp.up_proj.weight"


def _truncate(d: Path) -> None:
    weights = d / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)


def _nan(d: Path) -> None:
    tensors = load_file(d / "model.safetensors")
    tensors[POISONED][3, 5] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _no_tokenizer(d: Path) -> None:
    for path in d.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")) or path.name == "chat_template.jinja":
            path.unlink()


# damage → (how, what the one error line must name)
DAMAGE = {
    "truncated": (_truncate, "model.safetensors is truncated"),
    "nan": (_nan, f"tensor {POISONED} in model.safetensors holds 1 non-finite"),
    "no-tokenizer": (_no_tokenizer, "has no tokenizer"),
}
COMMANDS = {
    "export-vllm": lambda ckpt, out: ["export", "vllm", ckpt, "-q"],
    "export-hub": lambda ckpt, out: ["export", "hub", ckpt, "--repo-id", "tester/broken", "-q"],
    "export-onnx": lambda ckpt, out: ["export", "onnx", ckpt, "--out", out, "-q"],
    "serve": lambda ckpt, out: ["serve", ckpt, "--port", str(free_port()), "--max-model-len", "256", "-q"],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("artefacts-tiny")
    tiny_model("llama").save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _run_refused(argv: list[str], work: Path, must_name: str, capsys) -> str:
    """main(argv) refuses: exit 2, one error line naming `must_name`, nothing in `work` changed or added."""
    before = _snapshot(work)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    line = assert_one_error_line(err, must_name)
    assert _snapshot(work) == before
    assert not [p.name for p in work.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    return line


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_broken_checkpoint_is_never_published_or_served(command, damage, tiny, tmp_path, isolated_tmp, request, monkeypatch, capsys):
    work = tmp_path / "work"
    ckpt = work / f"ckpt-{damage}"
    shutil.copytree(tiny, ckpt)
    damage_fn, must_name = DAMAGE[damage]
    damage_fn(ckpt)
    monkeypatch.chdir(work)
    hub = None
    if command == "export-hub":
        hub = request.getfixturevalue("local_hub")
        monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    out = work / "out"
    line = _run_refused(COMMANDS[command](str(ckpt), str(out)), work, must_name, capsys)
    assert str(ckpt) in line  # the file's folder is named
    assert not out.exists()
    assert not list(isolated_tmp.iterdir())
    if hub is not None:
        assert hub.requests == [] and not hub.store.exists("tester/broken")  # nothing left the machine
        assert HUB_TOKEN not in line


# -- compress: a diverging fine-tune stops, nothing broken is saved -----------------------------


def _compress(work: Path, tiny: Path, *extra: str) -> list[str]:
    data = work / "train.jsonl"
    data.write_text(ROWS)
    return ["compress", "--model", str(tiny), "--data", str(data), "--out", str(work / "out"), *FAST, *extra]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param((), id="probe"),  # GradPruner's LoRA probe diverges first
        pytest.param(("--scorer", "block-influence", "--max-steps", "2"), id="recovery-last-step"),  # seen only after the last step
        pytest.param(("--scorer", "block-influence", "--finetune", "full", "--max-steps", "4"), id="full-recovery"),
    ],
)
def test_compress_stops_a_diverging_fine_tune_naming_the_learning_rate(extra, tiny, tmp_path, isolated_tmp, capsys):
    work = tmp_path / "work"
    work.mkdir()
    line = _run_refused(_compress(work, tiny, "--learning-rate", "1e30", *extra), work, "--learning-rate 1e+30", capsys)
    assert "non-finite" in line and "lower --learning-rate" in line and "nothing was saved" in line
    assert not (work / "out").exists() and not list(isolated_tmp.iterdir())


def test_compress_never_saves_non_finite_weights_even_if_training_did_not_stop(tiny, tmp_path, isolated_tmp, monkeypatch, capsys):
    """The save step's own check, with the loss guard switched off: the weights the run would save are read."""
    monkeypatch.setattr(StopOnNonFiniteLoss, "on_log", lambda *a, **k: None)
    monkeypatch.setattr(StopOnNonFiniteLoss, "on_train_end", lambda *a, **k: None)
    work = tmp_path / "work"
    work.mkdir()
    argv = _compress(work, tiny, "--learning-rate", "1e30", "--scorer", "block-influence", "--finetune", "full", "--max-steps", "4")
    line = _run_refused(argv, work, "the compressed model has non-finite weights", capsys)
    assert "lower --learning-rate" in line and not (work / "out").exists()


def test_compress_refuses_an_input_with_non_finite_weights(tiny, tmp_path, isolated_tmp, capsys):
    work = tmp_path / "work"
    model = work / "nan-model"
    shutil.copytree(tiny, model)
    _nan(model)
    line = _run_refused(_compress(work, model), work, f"--model {model} has non-finite weights ({POISONED}: 1 NaN/inf", capsys)
    assert not (work / "out").exists()
    assert "learning-rate" not in line  # the input is the cause, not the fine-tune


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--warmup-ratio", "5"),
        ("--warmup-ratio", "1"),
        ("--warmup-ratio", "-0.1"),
        ("--lora-dropout", "1.5"),
        ("--lora-dropout", "1"),
        ("--lora-alpha", "0"),
        ("--learning-rate", "inf"),
        ("--learning-rate", "0"),
        ("--epochs", "inf"),
        ("--distill-temperature", "inf"),
        ("--distill-alpha", "1.5"),
    ],
)
def test_fine_tune_options_out_of_range_are_refused_up_front(flag, value, tiny, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    loads = []
    monkeypatch.setattr("gradprune_deploy.compress.pipeline.load_model_and_tokenizer", lambda *a, **k: loads.append(a))
    _run_refused(_compress(work, tiny, flag, value), work, flag, capsys)
    assert loads == []  # refused before any model is loaded


def test_fine_tune_ranges_are_the_same_from_yaml_and_python(tiny, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("warmup_ratio: 5\n")
    work = tmp_path / "work"
    work.mkdir()
    _run_refused([*_compress(work, tiny), "--config", str(recipe)], work, "--warmup-ratio", capsys)
    with pytest.raises(ConfigError, match="--lora-dropout"):
        CompressConfig(out=str(tmp_path / "o"), lora_dropout=1.5)
    with pytest.raises(ConfigError, match="--warmup-ratio"):
        CompressConfig(out=str(tmp_path / "o"), warmup_ratio=1.0)
    assert CompressConfig(out=str(tmp_path / "o"), warmup_ratio=0.0, lora_dropout=0.0).warmup_ratio == 0.0


# -- export vllm's serve command runs as printed ---------------------------------------------------


def _printed_commands(ckpt: Path, capsys) -> tuple[str, str]:
    assert main(["export", "vllm", str(ckpt), "-q"]) == 0
    out = capsys.readouterr().out
    serve = next(line.strip() for line in out.splitlines() if line.strip().startswith("gradprune serve "))
    plain = next(line.strip().split("   #")[0] for line in out.splitlines() if "vllm.entrypoints.openai.api_server" in line)
    return serve, plain


@pytest.mark.parametrize(("positions", "expected_len"), [(512, 512), (100_000, 2048)])
def test_export_vllm_prints_a_serve_command_that_serve_runs_as_printed(positions, expected_len, tiny, tmp_path, monkeypatch, capsys):
    pytest.importorskip("vllm")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "max_position_embeddings": positions}))
    serve_cmd, plain_cmd = _printed_commands(ckpt, capsys)
    argv = shlex.split(serve_cmd)
    assert argv[:3] == ["gradprune", "serve", str(ckpt.resolve())]
    assert argv[argv.index("--max-model-len") + 1] == str(expected_len)
    assert shlex.split(plain_cmd)[-2:] == ["--max-model-len", str(expected_len)]

    started = {}

    @contextlib.contextmanager
    def record_instead_of_starting(model_dir, **kwargs):
        started.update(kwargs, model_dir=model_dir)
        raise KeyboardInterrupt  # as Ctrl-C right after start-up: serve stops cleanly
        yield

    monkeypatch.setattr(serve_module, "start_server", record_instead_of_starting)
    port = argv[argv.index("--port") + 1]
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", int(port))) == 0:  # the printed port is taken on this machine: use a free one
            argv[argv.index("--port") + 1] = str(free_port())
    assert main(argv[1:]) == 0, capsys.readouterr().err  # every check of `gradprune serve` passes on the printed command
    assert started["max_model_len"] == expected_len and started["model_dir"] == str(ckpt.resolve())


def test_the_fine_tunes_log_a_non_finite_loss_as_it_is(tmp_path):
    """Left on, the Trainer's `logging_nan_inf_filter` logs a NaN step as the running average, and the
    guard would never see it: every fine-tune (probe, heal, recovery) builds its arguments here."""
    args = _training_args(str(tmp_path), TrainSettings(), max_steps=4, max_grad_norm=1.0, learning_rate=1e-4)
    assert args.logging_nan_inf_filter is False
