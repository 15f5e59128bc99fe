"""The bad-input matrix: every subcommand, every class of bad input or fault, one promise.

Each case runs the real CLI (`gradprune_deploy.cli.main`, in-process; signals in a subprocess) on
tiny random models built offline, and asserts the README's promise:

- exit status 2 (130 / 143 for SIGINT / SIGTERM);
- exactly one `error:` line on stderr, naming the option or the file to fix; no traceback;
- nothing written: no output directory, no temporary sibling, nothing in the temp dir, every file
  in the case's work directory (a pre-existing output included) byte-for-byte unchanged.

A case is `name: build(ctx) -> (argv, what the error line must name)`; `ctx` makes the inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

import gradprune_deploy.runtime.vllm_server as vllm_server
from gradprune_deploy.cli import main
from gradprune_deploy.errors import ServingError
from gradprune_deploy.evaluation.evaluate import result_filename
from serving.backends import worker as bench_workers
from tests.conftest import free_port, tiny_model
from tests.serving.test_bench import FakeWorker

PROJECT = Path(__file__).resolve().parents[1]
FAST = [
    "--max-examples",
    "24",
    "--max-steps",
    "2",
    "--probe-steps",
    "2",
    "--batch-size",
    "4",
    "--max-length",
    "64",
    "--no-ledger",
    "--no-plot",
    "-q",
]
ROWS = "".join(
    json.dumps({"id": i, "prompt": f"Is {i} even?", "completion": "yes" if i % 2 == 0 else "no", "choices": ["yes", "no"]}) + "\n"
    for i in range(32)
)


# -- inputs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama (6 layers, tied embeddings, 512 positions) with SmolLM2's tokenizer."""
    out = tmp_path_factory.mktemp("matrix-tiny")
    tiny_model("llama").save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory, tokenizer) -> Path:
    """Sliding-window attention: servable, not exportable to ONNX."""
    out = tmp_path_factory.mktemp("matrix-mistral")
    tiny_model("mistral", num_hidden_layers=2).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _edit_config(d: Path, **changes) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


def _edit_weights(d: Path, edit) -> None:
    weights = d / "model.safetensors"
    save_file(edit(load_file(weights)), weights, metadata={"format": "pt"})


def _no_lm_head(d: Path) -> None:
    """Untied config, no lm_head stored: a base-model checkpoint."""
    model = tiny_model("llama")
    model.config.tie_word_embeddings = False
    model.model.save_pretrained(d)
    _edit_config(d, architectures=["LlamaForCausalLM"], tie_word_embeddings=False)


def _pickled(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")


T5_CONFIG = {
    "model_type": "t5",
    "architectures": ["T5ForConditionalGeneration"],
    "is_encoder_decoder": True,
    "d_model": 64,
    "num_layers": 2,
}

# kind → how a copy of the tiny checkpoint is damaged
DAMAGE = {
    "missing_layer": lambda d: _edit_weights(d, lambda sd: {k: v for k, v in sd.items() if ".layers.1." not in k}),
    "unexpected_key": lambda d: _edit_weights(d, lambda sd: {**sd, "model.extra_adapter.weight": torch.zeros(4)}),
    "wrong_shape": lambda d: _edit_weights(d, lambda sd: {**sd, "model.norm.weight": torch.ones(3)}),
    "no_lm_head": _no_lm_head,
    "zero_layers": lambda d: tiny_model("llama", num_hidden_layers=0).save_pretrained(d),
    "layer_count": lambda d: _edit_config(d, num_hidden_layers=7),
    "config_not_json": lambda d: (d / "config.json").write_text("{not json"),
    "no_weights": lambda d: (d / "model.safetensors").unlink(),
    "pickled": _pickled,
    "corrupt_weights": lambda d: (d / "model.safetensors").write_bytes(b"garbage, not safetensors"),
    "remote_code": lambda d: _edit_config(d, model_type="acme-lm", auto_map={"AutoConfig": "acme.Config"}),
    "encoder_decoder": lambda d: (d / "config.json").write_text(json.dumps(T5_CONFIG)),
    "unknown_arch": lambda d: _edit_config(d, architectures=["AcmeForCausalLM"]),
    "none": lambda d: None,  # an intact copy
    "manifest_corrupt": lambda d: (d / "gradprune.json").write_text("{half a manifest"),
    "manifest_wrong_type": lambda d: (d / "gradprune.json").write_text(json.dumps({"schema_version": 2, "num_layers_before": "six"})),
    "manifest_not_utf8": lambda d: (d / "gradprune.json").write_bytes(b'{"schema_version": 2, "tool": "\xff"}'),
    "config_not_utf8": lambda d: (d / "config.json").write_bytes(b'{"model_type": "llama\xff"}'),
    "config_not_object": lambda d: (d / "config.json").write_text("[1, 2, 3]"),
    "tokenizer_not_json": lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "truncat'),
}


class Ctx:
    def __init__(self, work: Path, tiny: Path, tiny_mistral: Path):
        self.work, self.tiny_dir, self._mistral = work, tiny, tiny_mistral
        self.out = work / "out"

    @property
    def tiny(self) -> str:
        return str(self.tiny_dir)

    @property
    def mistral(self) -> str:
        return str(self._mistral)

    def data(self, text: str = ROWS, name: str = "train.jsonl", raw: bytes | None = None) -> str:
        path = self.work / name
        path.write_bytes(raw) if raw is not None else path.write_text(text)
        return str(path)

    def file(self, name: str, text: str) -> str:
        path = self.work / name
        path.write_text(text)
        return str(path)

    def existing_out(self) -> str:
        """An output from an earlier run that must survive byte for byte."""
        self.out.mkdir()
        (self.out / "config.json").write_text('{"precious": true}\n')
        (self.out / "model.safetensors").write_bytes(os.urandom(256))
        return str(self.out)

    def broken(self, kind: str) -> str:
        """A copy of the tiny checkpoint, damaged in one way (DAMAGE[kind])."""
        d = self.work / f"ckpt-{kind}"
        shutil.copytree(self.tiny_dir, d)
        DAMAGE[kind](d)
        return str(d)

    def symlink(self, name: str, target: str | Path) -> str:
        link = self.work / name
        link.symlink_to(target)
        return str(link)

    def symlink_loop(self) -> str:
        """work/loop-a → work/loop-b → work/loop-a."""
        self.symlink("loop-a", self.work / "loop-b")
        return self.symlink("loop-b", self.work / "loop-a")

    def fifo(self, name: str = "train.jsonl") -> str:
        """A named pipe with no writer: reading it would block forever."""
        path = self.work / name
        os.mkfifo(path)
        return str(path)

    def data_dir(self, name: str = "data", split: str = "test") -> str:
        """A folder of splits holding `{split}.jsonl`."""
        folder = self.work / name
        folder.mkdir()
        (folder / f"{split}.jsonl").write_text(ROWS)
        return str(folder)

    def earlier_eval(self, data: str, *, metric: str = "choice") -> str:
        """An --out-dir holding an earlier eval result for this data, split and metric."""
        self.out.mkdir()
        (self.out / result_filename(data, "test", metric)).write_text('{"value": 0.75, "n": 500}\n')
        return str(self.out)

    def report(self, *, dense: str, pruned: str, backends=("hf",)) -> str:
        self.out.mkdir()
        (self.out / "report.json").write_text(
            json.dumps(
                {"schema": "gradprune-bench/1", "dense": dense, "pruned": pruned, "backends": {b: {"measured": True} for b in backends}}
            )
        )
        (self.out / "report.md").write_text("## an earlier report\n")
        return str(self.out)


def _resolved(path: str) -> str:
    return str(Path(path).resolve())


# -- the matrix ---------------------------------------------------------------------------------
# name → (build(ctx) → argv, text the error line must contain: the option or the file to fix)


def _compress(c: Ctx, *extra: str, model: str | None = None, data: str | None = None, out: str | None = None) -> list[str]:
    return ["compress", "--model", model or c.tiny, "--data", data or c.data(), "--out", out or str(c.out), *FAST, *extra]


def _yaml(c: Ctx, text: str) -> list[str]:
    return ["--config", c.file("recipe.yaml", text)]


CASES: dict[str, tuple] = {
    # compress: typed options (CLI and YAML share one schema)
    "compress/drop-layers-word": (lambda c: _compress(c, "--drop-layers", "two"), "--drop-layers: expected an integer"),
    "compress/drop-ratio-text": (lambda c: _compress(c, "--drop-ratio", "abc"), "--drop-ratio: expected a number"),
    "compress/scorer-unknown": (lambda c: _compress(c, "--scorer", "bogus"), "--scorer: expected one of"),
    "compress/finetune-unknown": (lambda c: _compress(c, "--finetune", "bogus"), "--finetune: expected one of"),
    "compress/dtype-unknown": (lambda c: _compress(c, "--dtype", "float8"), "--dtype"),
    "compress/unknown-flag": (lambda c: _compress(c, "--frobnicate", "3"), "--frobnicate"),
    "compress/flag-without-value": (lambda c: _compress(c, "--batch-size"), "--batch-size"),
    "compress/drop-ratio-zero": (lambda c: _compress(c, "--drop-ratio", "0"), "--drop-ratio"),
    "compress/drop-ratio-one": (lambda c: _compress(c, "--drop-ratio", "1.0"), "--drop-ratio"),
    "compress/two-budgets": (lambda c: _compress(c, "--drop-ratio", "0.3", "--drop-layers", "2"), "--drop-layers"),
    "compress/drop-every-layer": (lambda c: _compress(c, "--drop-layers", "6"), "--drop-layers"),
    "compress/zero-layer-model": (lambda c: _compress(c, "--drop-ratio", "0.5", model=c.broken("zero_layers")), "layer"),
    "compress/over-protected": (lambda c: _compress(c, "--drop-layers", "3", "--protect-first", "2", "--protect-last", "2"), "--protect"),
    "compress/distill-without-finetune": (lambda c: _compress(c, "--distill", "--finetune", "none"), "--distill"),
    "compress/teacher-without-distill": (lambda c: _compress(c, "--teacher", c.tiny), "--teacher"),
    "compress/merge-with-other-scorer": (lambda c: _compress(c, "--scorer", "random", "--merge-layers", "2"), "--merge-layers"),
    "compress/gblm-merge-criterion-unknown": (lambda c: _compress(c, "--merge-criterion", "bogus"), "--merge-criterion: expected one of"),
    "compress/gblm-merge-criterion-other-scorer": (
        lambda c: _compress(c, "--scorer", "gblm", "--merge-criterion", "gblm"),
        "--merge-criterion",
    ),
    "compress/gblm-merge-criterion-merge-zero": (
        lambda c: _compress(c, "--merge-layers", "0", "--merge-criterion", "gblm"),
        "--merge-criterion",
    ),
    "compress/max-length-zero": (lambda c: _compress(c, "--max-length", "0"), "--max-length"),
    "compress/compensate-no-mlp-bias": (lambda c: _compress(c, "--compensate", "--drop-layers", "1", model=c.mistral), "--compensate"),
    "compress/compensate-layers-zero": (lambda c: _compress(c, "--compensate", "--compensate-layers", "0"), "--compensate-layers"),
    "compress/compensate-layers-alone": (lambda c: _compress(c, "--compensate-layers", "2"), "add --compensate"),
    "compress/prunedlora-start-below-lora-r": (
        lambda c: _compress(c, "--finetune", "prunedlora", "--prunedlora-start-rank", "4", "--lora-r", "8"),
        "--prunedlora-start-rank",
    ),
    "compress/yaml-quoted-false-keeps-output": (
        lambda c: _compress(c, *_yaml(c, 'overwrite: "false"\n'), out=c.existing_out()),
        "--overwrite: expected true or false",
    ),
    "compress/yaml-yes-is-not-a-boolean": (
        lambda c: _compress(c, *_yaml(c, "gradient_checkpointing: yes\n")),
        "--gradient-checkpointing: expected true or false",
    ),
    "compress/yaml-drop-layers-word": (lambda c: _compress(c, *_yaml(c, "drop_layers: two\n")), "--drop-layers: expected an integer"),
    "compress/yaml-float-for-int": (lambda c: _compress(c, *_yaml(c, "lora_r: 2.5\n")), "--lora-r: expected an integer"),
    "compress/yaml-string-for-number": (lambda c: _compress(c, *_yaml(c, 'learning_rate: "fast"\n')), "--learning-rate"),
    "compress/yaml-unknown-key": (lambda c: _compress(c, *_yaml(c, "drop_ratioo: 0.3\n")), "drop_ratioo"),
    "compress/yaml-not-a-mapping": (lambda c: _compress(c, *_yaml(c, "- drop_ratio\n")), "--config"),
    "compress/yaml-invalid": (lambda c: _compress(c, *_yaml(c, "drop_ratio: [0.3\n")), "--config"),
    "compress/yaml-missing": (lambda c: _compress(c, "--config", str(c.work / "nope.yaml")), "nope.yaml"),
    # compress: the output
    "compress/existing-output": (lambda c: _compress(c, out=c.existing_out()), "--overwrite"),
    "compress/output-under-a-file": (lambda c: _compress(c, out=str(Path(c.file("plain.txt", "x")) / "sub")), "--out"),
    # compress: the model (weights must cover it)
    "compress/model-missing": (lambda c: _compress(c, model=str(c.work / "nope")), "nope"),
    "compress/model-missing-layer": (lambda c: _compress(c, model=c.broken("missing_layer")), "model.layers.1."),
    "compress/model-unexpected-key": (lambda c: _compress(c, model=c.broken("unexpected_key")), "model.extra_adapter.weight"),
    "compress/model-wrong-shape": (lambda c: _compress(c, model=c.broken("wrong_shape")), "model.norm.weight"),
    "compress/model-no-lm-head": (lambda c: _compress(c, model=c.broken("no_lm_head")), "lm_head.weight"),
    "compress/model-config-not-json": (lambda c: _compress(c, model=c.broken("config_not_json")), "config.json"),
    "compress/model-no-weights": (lambda c: _compress(c, model=c.broken("no_weights")), "ckpt-no_weights"),
    "compress/model-pickled": (lambda c: _compress(c, model=c.broken("pickled")), "--allow-pickle"),
    "compress/model-corrupt-weights": (lambda c: _compress(c, model=c.broken("corrupt_weights")), "model.safetensors"),
    "compress/model-remote-code": (lambda c: _compress(c, model=c.broken("remote_code")), "--trust-remote-code"),
    # compress: the data (read before the model loads)
    "compress/data-missing": (lambda c: _compress(c, data=str(c.work / "nope.jsonl")), "nope.jsonl"),
    "compress/data-empty": (lambda c: _compress(c, data=c.data("")), "train.jsonl"),
    "compress/data-malformed": (lambda c: _compress(c, data=c.data('{"prompt": "a", "completion": "b"}\n{not json\n')), "train.jsonl:2"),
    "compress/data-no-label": (lambda c: _compress(c, data=c.data('{"prompt": "a"}\n')), "completion"),
    "compress/data-not-utf8": (lambda c: _compress(c, data=c.data(raw=b'{"prompt": "\xff\xfe"}\n')), "train.jsonl"),
    "compress/data-csv-columns": (lambda c: _compress(c, data=c.data("question,answer\nq,a\n", name="train.csv")), "train.csv"),
    "compress/data-format": (lambda c: _compress(c, data=c.data("prompt: a\n", name="train.txt")), "train.txt"),
    "compress/data-choices-not-list": (
        lambda c: _compress(c, data=c.data('{"prompt": "a", "completion": "b", "choices": 5}\n')),
        "choices",
    ),
    # inspect
    "inspect/missing-dir": (lambda c: ["inspect", str(c.work / "nope")], "nope"),
    "inspect/no-manifest": (lambda c: ["inspect", c.tiny], "gradprune.json"),
    "inspect/corrupt-manifest": (lambda c: ["inspect", c.broken("manifest_corrupt")], "gradprune.json"),
    "inspect/no-checkpoint-given": (lambda c: ["inspect"], "checkpoint"),
    # eval
    "eval/no-data": (lambda c: ["eval", c.tiny, "-q"], "--data"),
    "eval/checkpoint-missing": (lambda c: ["eval", str(c.work / "nope"), "--data", c.data(), "-q"], "nope"),
    "eval/checkpoint-missing-layer": (lambda c: ["eval", c.broken("missing_layer"), "--data", c.data(), "-q"], "model.layers.1."),
    "eval/metric-unknown": (lambda c: ["eval", c.tiny, "--data", c.data(), "--metric", "bleu", "-q"], "--metric"),
    "eval/vllm-backend-for-choice": (lambda c: ["eval", c.tiny, "--data", c.data(), "--backend", "vllm", "-q"], "--backend"),
    "eval/limit-zero": (lambda c: ["eval", c.tiny, "--data", c.data(), "--limit", "0", "-q"], "--limit"),
    "eval/choices-not-a-list": (
        lambda c: ["eval", c.tiny, "--data", c.data('{"prompt": "a", "completion": "b", "choices": 5}\n'), "-q"],
        "choices",
    ),
    "eval/choice-metric-without-choices": (
        lambda c: ["eval", c.tiny, "--data", c.data('{"prompt": "a", "completion": "b"}\n'), "-q"],
        "choices",
    ),
    # export onnx
    "export-onnx/no-out": (lambda c: ["export", "onnx", c.tiny, "-q"], "--out"),
    "export-onnx/existing-output": (lambda c: ["export", "onnx", c.tiny, "--out", c.existing_out(), "-q"], "--overwrite"),
    "export-onnx/dtype-bfloat16": (lambda c: ["export", "onnx", c.tiny, "--out", str(c.out), "--dtype", "bfloat16", "-q"], "--dtype"),
    "export-onnx/new-tokens-zero": (lambda c: ["export", "onnx", c.tiny, "--out", str(c.out), "--new-tokens", "0", "-q"], "--new-tokens"),
    "export-onnx/atol-negative": (lambda c: ["export", "onnx", c.tiny, "--out", str(c.out), "--atol", "-1", "-q"], "--atol"),
    "export-onnx/checkpoint-missing": (lambda c: ["export", "onnx", str(c.work / "nope"), "--out", str(c.out), "-q"], "nope"),
    "export-onnx/checkpoint-missing-layer": (
        lambda c: ["export", "onnx", c.broken("missing_layer"), "--out", str(c.out), "-q"],
        "ckpt-missing_layer",
    ),
    "export-onnx/encoder-decoder": (lambda c: ["export", "onnx", c.broken("encoder_decoder"), "--out", str(c.out), "-q"], "ONNX"),
    "export-onnx/sliding-window": (lambda c: ["export", "onnx", c.mistral, "--out", str(c.out), "-q"], "sliding-window"),
    # export vllm
    "export-vllm/checkpoint-missing": (lambda c: ["export", "vllm", str(c.work / "nope"), "-q"], "nope"),
    "export-vllm/checkpoint-missing-layer": (lambda c: ["export", "vllm", c.broken("missing_layer"), "-q"], "ckpt-missing_layer"),
    "export-vllm/no-lm-head": (lambda c: ["export", "vllm", c.broken("no_lm_head"), "-q"], "lm_head.weight"),
    "export-vllm/layer-count": (lambda c: ["export", "vllm", c.broken("layer_count"), "-q"], "num_hidden_layers"),
    "export-vllm/unknown-architecture": (lambda c: ["export", "vllm", c.broken("unknown_arch"), "-q"], "AcmeForCausalLM"),
    # export hub (nothing may be uploaded: every check is local)
    "export-hub/no-repo-id": (lambda c: ["export", "hub", c.tiny, "-q"], "--repo-id"),
    "export-hub/bad-repo-id": (lambda c: ["export", "hub", c.tiny, "--repo-id", "not a repo", "-q"], "repo id"),
    "export-hub/no-token": (
        lambda c: ["export", "hub", c.tiny, "--repo-id", "me/tiny", "--endpoint", "http://127.0.0.1:9", "-q"],
        "HF_TOKEN",
    ),
    "export-hub/checkpoint-missing-layer": (
        lambda c: ["export", "hub", c.broken("missing_layer"), "--repo-id", "me/tiny", "-q"],
        "ckpt-missing_layer",
    ),
    "export-hub/private-not-boolean": (
        lambda c: ["export", "hub", c.tiny, "--repo-id", "me/tiny", *_yaml(c, "private: 'no'\n"), "-q"],
        "--private",
    ),
    # serve (refused before vLLM starts)
    "serve/port-text": (lambda c: ["serve", c.tiny, "--port", "http"], "--port: expected an integer"),
    "serve/port-range": (lambda c: ["serve", c.tiny, "--port", "70000"], "--port"),
    "serve/max-model-len-beyond-positions": (lambda c: ["serve", c.tiny, "--max-model-len", "4096"], "--max-model-len"),
    "serve/kv-cache-zero": (lambda c: ["serve", c.tiny, "--kv-cache-gib", "0"], "--kv-cache-gib"),
    "serve/checkpoint-missing": (lambda c: ["serve", str(c.work / "nope")], "nope"),
    "serve/checkpoint-missing-layer": (lambda c: ["serve", c.broken("missing_layer"), "--max-model-len", "256"], "ckpt-missing_layer"),
    "serve/no-lm-head": (lambda c: ["serve", c.broken("no_lm_head"), "--max-model-len", "256"], "lm_head.weight"),
    "serve/port-in-use": (lambda c: ["serve", c.tiny, "--port", str(c.busy_port), "--max-model-len", "256"], "--port"),
    # bench
    "bench/no-dense": (lambda c: ["bench", "--pruned", c.tiny, "--backend", "hf", "-q"], "--dense"),
    "bench/runs-zero": (lambda c: ["bench", "--dense", c.tiny, "--pruned", c.tiny, "--runs", "0", "-q"], "--runs"),
    "bench/output-len-one": (lambda c: ["bench", "--dense", c.tiny, "--pruned", c.tiny, "--output-len", "1", "-q"], "--output-len"),
    "bench/backend-unknown": (lambda c: ["bench", "--dense", c.tiny, "--pruned", c.tiny, "--backend", "tensorrt", "-q"], "--backend"),
    "bench/pruned-missing-layer": (
        lambda c: ["bench", "--dense", c.tiny, "--pruned", c.broken("missing_layer"), "--backend", "hf", "--out", str(c.out), "-q"],
        "model.layers.1.",
    ),
    "bench/lengths-beyond-positions": (
        lambda c: ["bench", "--dense", c.tiny, "--pruned", c.tiny, "--backend", "hf", "--input-len", "600", "--out", str(c.out), "-q"],
        "max_position_embeddings",
    ),
    "bench/prompts-missing": (
        lambda c: [
            "bench",
            "--dense",
            c.tiny,
            "--pruned",
            c.tiny,
            "--backend",
            "hf",
            "--prompts",
            str(c.work / "nope.jsonl"),
            "--out",
            str(c.out),
            "-q",
        ],
        "nope.jsonl",
    ),
    "bench/report-of-another-pair": (
        lambda c: [
            "bench",
            "--dense",
            c.tiny,
            "--pruned",
            c.tiny,
            "--backend",
            "hf",
            "--out",
            c.report(dense="/elsewhere/a", pruned="/elsewhere/b"),
            "-q",
        ],
        "--overwrite",
    ),
    "bench/report-already-measured": (
        lambda c: [
            "bench",
            "--dense",
            c.tiny,
            "--pruned",
            c.tiny,
            "--backend",
            "hf",
            "--out",
            c.report(dense=_resolved(c.tiny), pruned=_resolved(c.tiny)),
            "-q",
        ],
        "--overwrite",
    ),
    "bench/out-under-a-file": (
        lambda c: [
            "bench",
            "--dense",
            c.tiny,
            "--pruned",
            c.tiny,
            "--backend",
            "hf",
            "--out",
            str(Path(c.file("plain.txt", "x")) / "sub"),
            "-q",
        ],
        "--out",
    ),
}


def _bench(c: Ctx, *extra: str) -> list[str]:
    return ["bench", "--dense", c.tiny, "--pruned", c.tiny, "--backend", "hf", *extra, "-q"]


def _eval(c: Ctx, *extra: str, checkpoint: str | None = None, data: str | None = None) -> list[str]:
    return ["eval", checkpoint or c.tiny, "--data", data or c.data(), *extra, "-q"]


def _serve(c: Ctx, *extra: str, checkpoint: str | None = None) -> list[str]:
    return ["serve", checkpoint or c.tiny, "--port", str(free_port()), "--max-model-len", "256", *extra]


def _eval_over_an_earlier_result(c: Ctx) -> list[str]:
    """An earlier result inside the checkpoint (eval's default place): a copy, so the shared one stays clean."""
    checkpoint, data = c.broken("none"), c.data()
    (Path(checkpoint) / result_filename(data, "test", "choice")).write_text('{"value": 0.75, "n": 500}\n')
    return _eval(c, checkpoint=checkpoint, data=data)


# 9 levels of 9 aliases: 9**9 values once expanded (what once took 36 s and ended in a MemoryError)
ALIAS_BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['x'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
)
LONG_COMPLETION = json.dumps({"id": "long", "prompt": "Say yes.", "completion": "yes " * 700}) + "\n"

# Reliability round two (issue 25): inputs never touched, every number range-checked, malformed files,
# recipes, and refusals that name the true cause.
CASES |= {
    # never touch an input: --out is not, does not contain and is not inside one, --overwrite or not
    "compress/out-is-model-overwrite": (lambda c: _compress(c, "--overwrite", out=c.tiny), "--model"),
    "compress/out-inside-model": (lambda c: _compress(c, out=str(c.tiny_dir / "pruned")), "--model"),
    "compress/out-symlink-to-model": (lambda c: _compress(c, "--overwrite", out=c.symlink("link", c.tiny_dir)), "--model"),
    "compress/out-is-data-file": (lambda c: _compress(c, "--overwrite", out=c.data()), "--data"),
    "compress/out-contains-data": (lambda c: _compress(c, "--overwrite", data=c.data(), out=str(c.work)), "--data"),
    "compress/out-is-teacher": (
        lambda c: _compress(c, "--distill", "--teacher", c.broken("none"), "--overwrite", out=str(c.work / "ckpt-none")),
        "--teacher",
    ),
    "compress/out-is-dense-reference": (
        lambda c: _compress(c, "--dense-reference", c.broken("none"), "--overwrite", out=str(c.work / "ckpt-none")),
        "--dense-reference",
    ),
    "compress/out-symlink-loop": (lambda c: _compress(c, "--overwrite", out=c.symlink_loop()), "symlink loop"),
    "compress/out-is-a-file": (lambda c: _compress(c, "--overwrite", out=c.file("plain.txt", "x")), "is a file"),
    "export-onnx/out-is-checkpoint": (lambda c: ["export", "onnx", c.tiny, "--out", c.tiny, "--overwrite", "-q"], "checkpoint"),
    "export-gguf/out-is-checkpoint": (lambda c: ["export", "gguf", c.tiny, "--out", c.tiny, "--overwrite", "-q"], "checkpoint"),
    "export-onnx/out-inside-checkpoint": (lambda c: ["export", "onnx", c.tiny, "--out", str(c.tiny_dir / "onnx"), "-q"], "checkpoint"),
    "eval/out-dir-is-the-data-folder": (lambda c: _eval(c, "--out-dir", c.data_dir(), data=str(c.work / "data")), "--data"),
    "eval/earlier-result-in-out-dir": (lambda c: _eval(c, "--out-dir", c.earlier_eval(str(c.work / "train.jsonl"))), "--overwrite"),
    "eval/earlier-result-in-checkpoint": (_eval_over_an_earlier_result, "--overwrite"),
    "bench/out-is-dense": (lambda c: _bench(c, "--out", c.tiny, "--overwrite"), "--dense"),
    "bench/out-inside-prompts-folder": (
        lambda c: _bench(c, "--prompts", c.data_dir(), "--out", str(c.work / "data" / "report")),
        "--prompts",
    ),
    "serve/log-file-is-the-weights": (lambda c: _serve(c, "--log-file", str(c.tiny_dir / "model.safetensors")), "--log-file"),
    "serve/log-file-is-a-directory": (lambda c: _serve(c, "--log-file", str(c.work)), "--log-file"),
    # every numeric option range-checked by the shared schema (CLI, YAML and Python alike)
    "export-onnx/opset-below-18": (lambda c: ["export", "onnx", c.tiny, "--out", str(c.out), "--opset", "17", "-q"], "--opset"),
    "serve/port-zero": (lambda c: ["serve", c.tiny, "--port", "0"], "--port"),
    "serve/startup-timeout-inf": (lambda c: _serve(c, "--startup-timeout-s", "inf"), "--startup-timeout-s"),
    "bench/tolerance-inf": (lambda c: _bench(c, "--tolerance", "inf"), "--tolerance"),
    "bench/max-model-len-zero": (lambda c: _bench(c, "--max-model-len", "0"), "--max-model-len"),
    "bench/threads-beyond-the-cores": (lambda c: _bench(c, "--threads", "1000000000"), "--threads"),
    "bench/out-symlink-loop": (lambda c: _bench(c, "--out", c.symlink_loop()), "symlink loop"),
    "eval/out-dir-symlink-loop": (lambda c: _eval(c, "--out-dir", c.symlink_loop()), "symlink loop"),
    "bench/yaml-threads-negative": (lambda c: _bench(c, *_yaml(c, "threads: -1\n")), "--threads"),
    "eval/yaml-batch-size-zero": (lambda c: _eval(c, *_yaml(c, "batch_size: 0\n")), "--batch-size"),
    "eval/max-new-tokens-negative": (lambda c: _eval(c, "--metric", "exact", "--max-new-tokens", "-5"), "--max-new-tokens"),
    "compress/seed-negative": (lambda c: _compress(c, "--seed", "-1"), "--seed"),
    "compress/protect-last-negative": (lambda c: _compress(c, "--protect-last", "-1"), "--protect-last"),
    "compress/max-examples-negative": (lambda c: _compress(c, "--max-examples", "-3"), "--max-examples"),
    # inputs longer than the model's context (512 positions): cut by rule, or refused when nothing fits
    "eval/max-new-tokens-fill-the-context": (lambda c: _eval(c, "--metric", "exact", "--max-new-tokens", "512"), "--max-new-tokens"),
    "eval/completion-longer-than-the-context": (lambda c: _eval(c, "--metric", "loss", data=c.data(LONG_COMPLETION)), "'long'"),
    # malformed files: one line naming the file
    "compress/model-config-not-utf8": (lambda c: _compress(c, model=c.broken("config_not_utf8")), "config.json"),
    "eval/config-not-an-object": (lambda c: _eval(c, checkpoint=c.broken("config_not_object")), "config.json"),
    "export-vllm/config-not-an-object": (lambda c: ["export", "vllm", c.broken("config_not_object"), "-q"], "config.json"),
    "serve/config-not-utf8": (lambda c: _serve(c, checkpoint=c.broken("config_not_utf8")), "config.json"),
    "eval/tokenizer-not-json": (lambda c: _eval(c, checkpoint=c.broken("tokenizer_not_json")), "tokenizer.json"),
    "export-onnx/tokenizer-not-json": (
        lambda c: ["export", "onnx", c.broken("tokenizer_not_json"), "--out", str(c.out), "-q"],
        "tokenizer.json",
    ),
    "export-hub/tokenizer-not-json": (
        lambda c: ["export", "hub", c.broken("tokenizer_not_json"), "--repo-id", "me/tiny", "-q"],
        "tokenizer.json",
    ),
    "inspect/manifest-wrong-type": (lambda c: ["inspect", c.broken("manifest_wrong_type")], "gradprune.json"),
    "inspect/manifest-not-utf8": (lambda c: ["inspect", c.broken("manifest_not_utf8")], "gradprune.json is not UTF-8"),
    "export-hub/manifest-wrong-type": (
        lambda c: [
            "export",
            "hub",
            c.broken("manifest_wrong_type"),
            "--repo-id",
            "me/tiny",
            "--token",
            "hf_not_a_real_token",  # past the token check; nothing may be requested (no server listens on :9)
            "--endpoint",
            "http://127.0.0.1:9",
            "-q",
        ],
        "gradprune.json",
    ),
    # recipes: duplicate keys, alias bombs, recursion
    "compress/yaml-duplicate-key": (lambda c: _compress(c, *_yaml(c, "lora_r: 4\nlora_r: 8\n")), "duplicate key 'lora_r'"),
    "compress/yaml-alias-bomb": (lambda c: _compress(c, *_yaml(c, ALIAS_BOMB)), "alias"),
    "compress/yaml-recursive-alias": (lambda c: _compress(c, *_yaml(c, "a: &a [*a]\n")), "recursive"),
    # refusals that name the true cause
    "serve/host-unresolvable": (lambda c: _serve(c, "--host", "no-such-host.invalid"), "--host"),
    "serve/host-not-this-machine": (lambda c: _serve(c, "--host", "192.0.2.1"), "not an address of this machine"),
    "compress/data-fifo": (lambda c: _compress(c, data=c.fifo()), "not a regular file"),
    "eval/data-fifo": (lambda c: _eval(c, data=c.fifo()), "not a regular file"),
    "bench/prompts-fifo": (lambda c: _bench(c, "--prompts", c.fifo("prompts.jsonl"), "--out", str(c.out)), "not a regular file"),
    "compress/data-folder-without-the-split": (lambda c: _compress(c, data=c.data_dir(split="test")), "train.jsonl"),
}


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under root → sha256 (directories as entries too): any write shows up."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


def assert_one_error_line(err: str, must_name: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert must_name in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(name, tiny, tiny_mistral, tmp_path, isolated_tmp, monkeypatch, capsys):
    build, must_name = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    ctx = Ctx(work, tiny, tiny_mistral)
    monkeypatch.chdir(work)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # export-hub/no-token: no login cache either
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ctx.busy_port = busy.getsockname()[1]
        argv = build(ctx)
        out_existed = ctx.out.exists()
        before, tiny_before = _snapshot(work), _snapshot(tiny)
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    print(assert_one_error_line(err, must_name))  # shown with -rA: the line a user sees
    assert _snapshot(work) == before  # nothing written, a pre-existing output byte-for-byte unchanged
    assert _snapshot(tiny) == tiny_before  # nor into an input checkpoint (eval results, bench reports)
    assert ctx.out.exists() == out_existed
    assert not [p.name for p in work.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not list(isolated_tmp.iterdir()), list(isolated_tmp.iterdir())


def test_the_matrix_is_wide_enough():
    commands = {name.split("/")[0] for name in CASES}
    assert commands >= {"compress", "inspect", "eval", "export-onnx", "export-vllm", "export-hub", "serve", "bench"}
    assert len(CASES) + len(SIGNAL_CASES) + 1 >= 50  # + the serve start-up failure below


# -- serve: a server that dies during start-up is one line with its log and the decisive line ----

FAKE_VLLM = """
import sys
for i in range(30):
    print(f"(APIServer pid=1) INFO 11-02 10:00:{i:02d} [api_server.py:{i}] starting, step {i}")
print("Traceback (most recent call last):")
print('  File "model_loader.py", line 12, in load')
print("ValueError: checkpoint has 6 layers, model expects 7")
print("(EngineCore pid=2) ERROR 11-02 10:01:00 [core.py:700] RuntimeError: Engine core initialization failed. See root cause above.")
sys.exit(1)
"""


def test_serve_start_up_failure_is_one_line_with_the_log(tiny, tmp_path, isolated_tmp, monkeypatch, capsys):
    monkeypatch.setattr(vllm_server, "supported_architectures", lambda: {"LlamaForCausalLM"})
    monkeypatch.setattr(vllm_server, "server_command", lambda *a, **k: [sys.executable, "-c", FAKE_VLLM])
    log = tmp_path / "server.log"
    code = main(
        ["serve", str(tiny), "--port", str(free_port()), "--log-file", str(log), "--startup-timeout-s", "60", "--max-model-len", "256"]
    )
    err = capsys.readouterr().err
    assert code == 2
    line = assert_one_error_line(err, str(log))
    assert "exited with status 1 during start-up" in line
    assert "ValueError: checkpoint has 6 layers, model expects 7" in line  # the decisive line, not the generic last one
    assert len(err.strip().splitlines()) == 1  # not the 35 lines of the log (-v prints them)
    assert not list(isolated_tmp.iterdir())


# -- signals: SIGINT / SIGTERM in the middle of the work ---------------------------------------


def _spawn(args: list[str], tmp: Path) -> subprocess.Popen:
    env = dict(os.environ, TMPDIR=str(tmp), GRADPRUNE_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(PROJECT))
    return subprocess.Popen(
        [sys.executable, "-m", "gradprune_deploy.cli", *args],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


SIGNAL_CASES = {
    "compress-sigint": ("compress", signal.SIGINT),
    "compress-sigterm": ("compress", signal.SIGTERM),
    "export-onnx-sigint": ("onnx", signal.SIGINT),
    "export-onnx-sigterm": ("onnx", signal.SIGTERM),
}


@pytest.mark.parametrize("name", sorted(SIGNAL_CASES))
def test_signal_mid_run_cleans_up_and_exits_128_plus_signal(name, tiny, tmp_path):
    what, sig = SIGNAL_CASES[name]
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    out = tmp_path / "out"
    if what == "compress":
        data = tmp_path / "train.jsonl"
        data.write_text(ROWS * 8)
        args = [
            "compress",
            "--model",
            str(tiny),
            "--data",
            str(data),
            "--out",
            str(out),
            "--drop-layers",
            "2",
            "--probe-steps",
            "400",
            "--max-steps",
            "400",
            "--batch-size",
            "2",
            "--max-length",
            "64",
            "--no-ledger",
            "-q",
        ]
        # the probe's own temp folder exists: the signal lands in the middle of training
        started = lambda: any(p.name.startswith("gradprune-probe-") for p in tmp.iterdir())  # noqa: E731
    else:
        args = ["export", "onnx", str(tiny), "--out", str(out), "-q"]
        started = lambda: any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())  # noqa: E731
    proc = _spawn(args, tmp)
    try:
        assert _wait_for(started, proc, timeout=240), proc.communicate(timeout=60)[1][-3000:] if proc.poll() is not None else "not started"
        time.sleep(1.0 if what == "onnx" else 0.3)  # into the load / trace / training step
        assert proc.poll() is None, "finished before the signal: make the run longer"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err[-3000:]
    assert_one_error_line(err, f"interrupted by {signal.Signals(sig).name}")
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert not list(tmp.iterdir()), list(tmp.iterdir())  # probe / fine-tune / export temp folders removed


# -- bench: no temp folder left, success or failure; the --overwrite rule for reports -----------


def test_bench_leaves_no_temp_folder_and_keeps_reports_unless_overwrite(tiny, tmp_path, isolated_tmp, monkeypatch, capsys):
    class FailingWorker(FakeWorker):
        def call(self, request):
            raise ServingError("the pruned benchmark worker exited with status 1: RuntimeError: out of memory")

    monkeypatch.setattr(bench_workers, "SETTLE_S", 0)
    out = tmp_path / "report"
    args = [
        "bench",
        "--dense",
        str(tiny),
        "--pruned",
        str(tiny),
        "--backend",
        "hf",
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--num-prompts",
        "2",
        "--runs",
        "1",
        "--warmup",
        "1",
        "--out",
        str(out),
        "--no-plot",
        "-q",
    ]

    monkeypatch.setattr(bench_workers, "Worker", FailingWorker)
    assert main(args) == 2
    assert_one_error_line(capsys.readouterr().err, "out of memory")
    assert not out.exists() and not list(isolated_tmp.iterdir())  # the worker log folder is gone too

    monkeypatch.setattr(bench_workers, "Worker", FakeWorker)
    FakeWorker.calls = []
    assert main(args) == 0
    capsys.readouterr()
    assert not list(isolated_tmp.iterdir())  # no gradprune-bench-* folder after a successful run either
    report = _snapshot(out)
    assert main(args) == 2  # the same backend again: refused, the report untouched
    assert_one_error_line(capsys.readouterr().err, "--overwrite")
    assert _snapshot(out) == report
    FakeWorker.calls = []
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((out / "report.json").read_text())["backends"]["hf"]
