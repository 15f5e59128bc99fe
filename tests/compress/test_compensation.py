"""`--compensate` (GradMAP's projection compensation) against brute force: the fold is exact, the fit
is the ridge least-squares solution, it removes the mean shift it targets, the checkpoint reloads
unchanged, and `gradprune compress --compensate` writes it with its record."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from exporters.onnx import OnnxExportConfig, export_onnx
from gradprune_deploy.cli import main
from gradprune_deploy.compress.config import DEFAULT_COMPENSATE_RIDGE
from gradprune_deploy.compress.gradmap import compensation as cmath
from gradprune_deploy.compress.gradmap.compensate import (
    add_zero_biases,
    biased_mlp_linears,
    compensate_cut,
    fit_layer,
    fold,
    measure_shifts,
)
from gradprune_deploy.compress.surgery import drop_layers, find_layer_stack
from gradprune_deploy.errors import ConfigError
from gradprune_deploy.manifest import Manifest
from tests.conftest import SHARED_DATA, tiny_model

VOCAB = 256
DROPPED, KEPT, NUM_LAYERS = [2, 3], [0, 1, 4, 5], 6


def _batches(n: int = 3, seed: int = 0) -> list[dict]:
    """Right-padded rows with the prompt masked out of the labels, as CompletionCollator makes them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (4, 20), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 15:] = 0
        mask[2, 11:] = 0
        labels = ids.clone()
        labels[:, :8] = -100
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _dense_and_pruned(seed: int = 0):
    dense = tiny_model("llama", num_hidden_layers=NUM_LAYERS, vocab_size=VOCAB, seed=seed)
    pruned = drop_layers(copy.deepcopy(dense), DROPPED)
    return dense, pruned


@torch.no_grad()
def _logits(model, batches) -> torch.Tensor:
    return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches])


@torch.no_grad()
def _tokens(model, batches, layer: int, *, mlp_out: bool = False) -> torch.Tensor:
    """Brute force: every non-padding token's output of decoder layer `layer` (or of its down_proj), stacked."""
    _, layers = find_layer_stack(model)
    module = layers[layer].mlp.down_proj if mlp_out else layers[layer]
    got: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda mod, args, out: got.append(out[0] if isinstance(out, tuple) else out))
    for b in batches:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    handle.remove()
    return torch.cat([x[b["attention_mask"].bool()].double() for x, b in zip(got, batches, strict=True)])


# ── pure math ─────────────────────────────────────────────────────────────────────────────────
def test_target_positions_point_past_each_cut():
    assert cmath.target_positions([0, 1, 4, 5], 6) == [0, 3, 4, 5]
    assert cmath.target_positions([0, 2, 3], 6) == [1, 2, 5]
    assert cmath.largest_shift_layers([0.0, 3.0, 1.0, 3.0], 2) == [1, 3]
    assert cmath.largest_shift_layers([0.0, 3.0, 1.0], 1) == [1]


@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_into_linear_is_m_times_the_linear_plus_c(with_bias):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(8, 5, generator=g), torch.randn(7, 5, generator=g)
    b = torch.randn(8, generator=g) if with_bias else None
    m_mat, c = torch.eye(8) + 0.3 * torch.randn(8, 8, generator=g), torch.randn(8, generator=g)
    w2, b2 = cmath.fold_into_linear(w, b, m_mat.double(), c.double())
    expected = (x @ w.T + (b if with_bias else 0)) @ m_mat.T + c
    torch.testing.assert_close(x @ w2.T + b2, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ridge", [0.0, DEFAULT_COMPENSATE_RIDGE, 1.0])
def test_fit_projection_equals_an_augmented_least_squares_solve(ridge):
    """Brute force: the objective mean||t - M m - c||^2 + lam ||M - I||^2 as one stacked lstsq in (M, c)."""
    g = torch.Generator().manual_seed(2)
    n, d = 300, 6
    m = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) + 0.5
    t = m @ torch.randn(d, d, generator=g, dtype=torch.float64).T + 0.2 * torch.randn(n, d, generator=g, dtype=torch.float64) - 1.0
    stats = cmath.RegressionStats.zeros(d)
    mask = torch.ones(n, dtype=torch.long)
    stats.update(m[:150], t[:150], mask[:150])  # two updates: sums must add up
    stats.update(m[150:], t[150:], mask[150:])
    m_mat, c = cmath.fit_projection(stats, ridge)

    lam = ridge * float(torch.trace(torch.cov(m.T, correction=0))) / d
    x = torch.cat([m, torch.ones(n, 1, dtype=torch.float64)], 1)  # [m, 1] @ [M^T; c^T] = t
    prior_x = torch.cat([torch.eye(d, dtype=torch.float64), torch.zeros(d, 1, dtype=torch.float64)], 1) * (n * lam) ** 0.5
    prior_y = torch.eye(d, dtype=torch.float64) * (n * lam) ** 0.5
    sol = torch.linalg.lstsq(torch.cat([x, prior_x]), torch.cat([t, prior_y])).solution
    torch.testing.assert_close(m_mat, sol[:d].T, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(c, sol[d], rtol=1e-8, atol=1e-8)
    # for every ridge the corrected mean equals the target mean: the mean shift is gone
    torch.testing.assert_close((m @ m_mat.T + c).mean(0), t.mean(0), rtol=1e-9, atol=1e-9)


def test_a_huge_ridge_is_the_plain_mean_shift_bias():
    g = torch.Generator().manual_seed(3)
    m, t = torch.randn(50, 4, generator=g).double(), torch.randn(50, 4, generator=g).double()
    stats = cmath.RegressionStats.zeros(4)
    stats.update(m, t, torch.ones(50))
    m_mat, c = cmath.fit_projection(stats, 1e9)
    torch.testing.assert_close(m_mat, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(c, t.mean(0) - m.mean(0), atol=1e-6, rtol=0)


# ── on a tiny Llama ───────────────────────────────────────────────────────────────────────────
def test_folded_model_equals_the_model_with_a_compensation_hook():
    dense, pruned = _dense_and_pruned()
    batches = _batches()
    layer = 1  # the layer right before the cut
    m_mat, c = fit_layer(pruned, dense, batches, layer, cmath.target_positions(KEPT, NUM_LAYERS)[layer], ridge=DEFAULT_COMPENSATE_RIDGE)
    assert not torch.allclose(m_mat, torch.eye(m_mat.shape[0], dtype=m_mat.dtype))

    hooked = copy.deepcopy(pruned)
    down = find_layer_stack(hooked)[1][layer].mlp.down_proj
    down.register_forward_hook(lambda mod, args, out: (out.double() @ m_mat.T + c).to(out.dtype))
    folded = copy.deepcopy(pruned)
    add_zero_biases(folded, biased_mlp_linears(folded))
    fold(folded, layer, m_mat, c)

    before, expected, got = _logits(pruned, batches), _logits(hooked, batches), _logits(folded, batches)
    assert (expected - before).abs().max() > 1e-3  # the compensation changes the model...
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # ...and the fold is that change


def test_compensation_removes_the_mean_shift_it_measures_and_matches_brute_force():
    dense, pruned = _dense_and_pruned(seed=5)
    batches = _batches(seed=1)
    targets = cmath.target_positions(KEPT, NUM_LAYERS)
    untouched = copy.deepcopy(pruned)

    # brute force of the measured shifts (every layer but the last, whose dense target is the final layer)
    shifts = measure_shifts(pruned, dense, batches, targets)["norms"]
    for j in range(len(KEPT) - 1):
        brute = (_tokens(pruned, batches, j) - _tokens(dense, batches, targets[j])).mean(0).norm()
        assert shifts[j] == pytest.approx(float(brute), rel=1e-6, abs=1e-9)
    assert shifts[0] == pytest.approx(0.0, abs=1e-6)  # before the cut nothing differs

    record = compensate_cut(pruned, dense, batches, kept=KEPT, num_layers=NUM_LAYERS, layers=1)
    (j,) = record.layers
    assert j == max(range(len(shifts)), key=shifts.__getitem__)
    assert record.mean_shift_before == pytest.approx(shifts)
    assert record.mean_shift_before[j] > 1e-3
    assert record.mean_shift_after[j] < 1e-5 * record.mean_shift_before[j] + 1e-6
    assert record.mean_shift_after[j] == pytest.approx(
        float((_tokens(pruned, batches, j) - _tokens(dense, batches, targets[j])).mean(0).norm()), abs=1e-6
    )
    assert pruned.config.mlp_bias is True and record.layers_original == [KEPT[j]]

    # the folded weights are the paper-formula fit on brute-force token matrices
    m = _tokens(untouched, batches, j, mlp_out=True)
    h, y = _tokens(untouched, batches, j), _tokens(dense, batches, targets[j])
    stats = cmath.RegressionStats.zeros(m.shape[1])
    stats.update(m, y - h + m, torch.ones(m.shape[0]))
    m_mat, c = cmath.fit_projection(stats, DEFAULT_COMPENSATE_RIDGE)
    w, b = cmath.fold_into_linear(find_layer_stack(untouched)[1][j].mlp.down_proj.weight, None, m_mat, c)
    got = find_layer_stack(pruned)[1][j].mlp.down_proj
    torch.testing.assert_close(got.weight.data, w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.bias.data, b, rtol=1e-4, atol=1e-5)


def test_two_layers_are_fitted_in_turn_and_both_shifts_vanish():
    dense, pruned = _dense_and_pruned(seed=6)
    record = compensate_cut(pruned, dense, _batches(seed=2), kept=KEPT, num_layers=NUM_LAYERS, layers=2, ridge=0.5)
    assert len(record.layers) == 2
    for j in record.layers:
        assert record.mean_shift_after[j] < 1e-4 * record.mean_shift_before[j] + 1e-6


def test_round_trip_through_save_pretrained_keeps_the_logits(tmp_path):
    dense, pruned = _dense_and_pruned(seed=7)
    batches = _batches(seed=3)
    compensate_cut(pruned, dense, batches, kept=KEPT, num_layers=NUM_LAYERS, layers=2)
    pruned.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["mlp_bias"] is True
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert reloaded.config.mlp_bias is True and reloaded.model.layers[0].mlp.gate_proj.bias is not None
    torch.testing.assert_close(_logits(reloaded.eval(), batches), _logits(pruned, batches), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_architectures_without_mlp_bias_are_refused(arch):
    with pytest.raises(ConfigError, match="--compensate.*mlp_bias"):
        biased_mlp_linears(tiny_model(arch, num_hidden_layers=2, vocab_size=VOCAB))


def test_config_default_ridge_is_the_library_default():
    assert DEFAULT_COMPENSATE_RIDGE == cmath.DEFAULT_RIDGE


# ── the CLI ───────────────────────────────────────────────────────────────────────────────────
def test_compress_with_compensate_writes_a_standard_checkpoint_and_its_record(tiny_llama_dir, tmp_path):
    out = tmp_path / "ckpt"
    argv = ["compress", "--model", str(tiny_llama_dir), "--data", str(SHARED_DATA / "sst2" / "train.jsonl"), "--max-examples", "24"]
    argv += ["--max-length", "64", "--batch-size", "4", "--max-steps", "2", "--probe-steps", "2", "--drop-layers", "2"]
    argv += ["--compensate", "--compensate-layers", "2", "--scorer-batches", "3", "--no-ledger", "--no-plot", "--out", str(out), "-q"]
    assert main(argv) == 0
    m = Manifest.read(out)
    rec = m.compensation
    assert rec.calibration_batches == 3 and len(rec.layers) == 2 and "compensate_seconds" in m.timings
    assert len(rec.mean_shift_before) == m.num_layers_after == 4
    assert rec.layers_original == [m.layers_kept[j] for j in rec.layers]
    for j in rec.layers:
        assert rec.mean_shift_after[j] < 1e-3 * rec.mean_shift_before[j] + 1e-6
    assert Manifest.from_json(m.to_json()).compensation == rec  # the record survives the manifest round trip
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.mlp_bias is True and model.config.num_hidden_layers == 4
    assert all(layer.mlp.down_proj.bias is not None for layer in model.model.layers)
    # LoRA recovery ran on top and was merged: the compensated layers' biases are non-zero, the others zero
    biased = {j for j, layer in enumerate(model.model.layers) if layer.mlp.down_proj.bias.abs().max() > 0}
    assert biased == set(rec.layers)


def test_old_manifests_without_the_field_still_read():
    record = Manifest().to_dict()
    del record["compensation"]
    assert Manifest.from_dict(record).compensation is None


@pytest.mark.slow
def test_compensated_checkpoint_exports_to_onnx_and_matches_torch(tmp_path, tokenizer):
    """~30 s: the exporter's own check (prefill and decode logits, greedy tokens) passes with the MLP biases."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")

    dense = tiny_model("llama", num_hidden_layers=3, seed=1)
    pruned = drop_layers(copy.deepcopy(dense), [1])
    record = compensate_cut(pruned, dense, _batches(), kept=[0, 2], num_layers=3, layers=2)
    assert all(record.mean_shift_after[j] < 1e-6 for j in record.layers)
    ckpt = tmp_path / "ckpt"
    pruned.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    validation = export_onnx(OnnxExportConfig(str(ckpt), out=str(tmp_path / "onnx"), new_tokens=4))["validation"]
    assert validation["greedy_tokens_identical"] and validation["max_abs_diff_prefill_logits"] < 1e-4
