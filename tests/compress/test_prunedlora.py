"""PrunedLoRA (`--finetune prunedlora`): the criterion and recovery update against brute force, the
schedule, exact zeros of pruned components through training, the final rank, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback

from exporters.hub import build_model_card
from gradprune_deploy.cli import main
from gradprune_deploy.compress.finetune import TrainSettings, _attach_prunedlora, _trainer, _training_args, recovery_finetune
from gradprune_deploy.compress.prunedlora.callback import lora_modules
from gradprune_deploy.compress.prunedlora.pruning import (
    DEFAULT_DAMPING,
    component_scores,
    factor_curvature,
    factor_pruning_error,
    obs_remove,
    paper_pace_gap,
    prune_components,
    rank_schedule,
)
from gradprune_deploy.data import CompletionCollator, read_examples, tokenize_examples
from tests.conftest import SHARED_DATA, tiny_config

SST2 = SHARED_DATA / "sst2"


def _tiny_llama(seed: int = 0):
    """A tiny random Llama: hidden 32, 2 layers."""
    config = tiny_config("llama", num_hidden_layers=2)
    config.hidden_size, config.intermediate_size = 32, 64
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _features(tokenizer, n: int = 32):
    return tokenize_examples(read_examples(SST2 / "train.jsonl", limit=n), tokenizer, max_length=64)


def _damped_h(grad: torch.Tensor) -> torch.Tensor:
    g = grad.double()
    h = g.T @ g
    return h + DEFAULT_DAMPING * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)


# ── the criterion and the recovery update (pure math) ─────────────────────────────────────────
def test_pruning_error_is_the_constrained_minimum_of_the_quadratic_model():
    """E_j − ½ tr(G H⁻¹ Gᵀ) = min over Δ with Δ[:, j] = −W[:, j] of ⟨G, Δ⟩ + ½ tr(Δ H Δᵀ), solved row by row."""
    torch.manual_seed(0)
    w, g = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    h_inv = factor_curvature(g)
    h = _damped_h(g)
    assert torch.allclose(h_inv @ h, torch.eye(5, dtype=torch.float64), atol=1e-10)
    errors = factor_pruning_error(w, g, h_inv)
    newton = 0.5 * torch.trace(g @ h_inv @ g.T)
    for j in range(5):
        free = [i for i in range(5) if i != j]
        best = 0.0
        for row in range(7):
            fixed = -w[row, j]
            delta_free = -torch.linalg.solve(h[free][:, free], g[row, free] + h[free, j] * fixed)
            delta = torch.zeros(5, dtype=torch.float64)
            delta[free], delta[j] = delta_free, fixed
            best += float(g[row] @ delta + 0.5 * delta @ h @ delta)
        assert float(errors[j] - newton) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_obs_recovery_is_the_brute_force_minimiser_for_one_and_two_components():
    """Removing j1 then j2 (H⁻¹ downdated in between) equals the joint minimiser of ½ tr(Δ H Δᵀ) with both columns zeroed."""
    torch.manual_seed(1)
    w, g = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    h, h_inv = _damped_h(g), factor_curvature(g)
    for removed in ([2], [3, 0]):
        got, hi = w, h_inv
        for j in removed:
            got, hi = obs_remove(got, hi, j)
        free = [i for i in range(5) if i not in removed]
        expected = w.clone()
        # Δ_F = −H_FF⁻¹ H_FJ Δ_J with Δ_J = −W_J, for every row
        delta_free = torch.linalg.solve(h[free][:, free], h[free][:, removed] @ w[:, removed].T).T
        expected[:, free] += delta_free
        expected[:, removed] = 0.0
        assert torch.equal(got[:, removed], torch.zeros(6, len(removed), dtype=torch.float64))
        assert torch.allclose(got, expected, atol=1e-10)


def test_prune_components_drops_the_lowest_scores_and_keeps_dtype():
    torch.manual_seed(2)
    a, b = torch.randn(6, 9), torch.randn(10, 6)
    ga, gb = torch.randn(6, 9), torch.randn(10, 6)
    active = torch.tensor([True, True, False, True, True, True])
    a[2], b[:, 2] = 0.0, 0.0
    a_in, b_in = a.clone(), b.clone()
    scores = component_scores(a, b, ga, gb, active)
    assert torch.isinf(scores[2]) and torch.isfinite(scores[active]).all()
    new_a, new_b, new_active, pruned = prune_components(a, b, ga, gb, active, 2)
    assert sorted(pruned) == sorted(torch.argsort(scores)[:2].tolist())
    assert int(new_active.sum()) == 3 and not new_active[pruned].any() and not new_active[2]
    assert torch.equal(new_a[~new_active], torch.zeros(3, 9)) and torch.equal(new_b[:, ~new_active], torch.zeros(10, 3))
    assert new_a.dtype == a.dtype and torch.equal(a, a_in) and torch.equal(b, b_in)  # inputs untouched
    assert not torch.equal(new_b[:, new_active], b[:, new_active])  # the survivors were compensated
    with pytest.raises(ValueError):
        prune_components(a, b, ga, gb, active, 6)


def test_recovery_step_changes_the_loss_as_the_quadratic_model_predicts(tokenizer):
    """Brute force on a tiny Llama: prune component j of one LoRA module (B side, then A side) with the
    recovery update, recompute the loss, and compare with ⟨G, Δ⟩ + ½ tr(Δ H Δᵀ) from the gradient the
    criterion reads. The model is exact to first order (its H is an empirical Fisher, not the Hessian),
    so LoRA weights are kept small (std 0.002) and everything runs in float64; at std 0.05 the
    curvature the Fisher misses dominates and the prediction is off by up to 5x."""
    model = get_peft_model(
        _tiny_llama().double(), LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    torch.manual_seed(3)
    for m in lora_modules(model):
        m.lora_a.data.normal_(0, 0.002)
        m.lora_b.data.normal_(0, 0.002)
    batch = CompletionCollator(tokenizer.pad_token_id)(_features(tokenizer, 8))
    target = [m for m in lora_modules(model) if m.name.endswith("layers.0.self_attn.v_proj")][0]

    def loss():  # in float64 (the model's own loss upcasts logits to float32 only)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        return F.cross_entropy(logits[labels != -100], labels[labels != -100])

    model.zero_grad()
    base = loss()
    base.backward()
    ga, gb = target.lora_a.grad.clone(), target.lora_b.grad.clone()
    a0, b0 = target.lora_a.detach().clone(), target.lora_b.detach().clone()

    for side in ("B", "A"):
        weight, grad = (b0, gb) if side == "B" else (a0.T, ga.T)  # rank-last layout
        h, h_inv = _damped_h(grad), factor_curvature(grad)
        predicted, actual = [], []
        for j in range(4):
            new, _ = obs_remove(weight.double(), h_inv, j)
            delta = new - weight.double()
            predicted.append(float((grad.double() * delta).sum() + 0.5 * torch.trace(delta @ h @ delta.T)))
            with torch.no_grad():
                if side == "B":
                    target.lora_b.copy_(new)
                else:
                    target.lora_a.copy_(new.T)
                actual.append(float(loss() - base))
                target.lora_a.copy_(a0)
                target.lora_b.copy_(b0)
        predicted, actual = torch.tensor(predicted), torch.tensor(actual)
        assert actual.abs().max() > 1e-7, "the perturbation must move the loss measurably"
        assert ((predicted - actual).abs() <= 0.15 * actual.abs()).all(), (side, predicted, actual)
        assert torch.equal(torch.argsort(predicted), torch.argsort(actual)), (side, predicted, actual)


# ── the schedule ──────────────────────────────────────────────────────────────────────────────
def test_rank_schedule_regular_pace_and_short_runs_spread_over_three_quarters():
    long = rank_schedule(start_rank=64, target_rank=8, total_steps=1000)
    assert list(long) == list(range(10, 290, 10)) and set(long.values()) == {2}  # K1 = 10, K2 = 2: 28 events
    # 100 steps: 2 per event cannot reach 8 by step 75, so the 7 events (10..70) take 8 each
    assert rank_schedule(start_rank=64, target_rank=8, total_steps=100) == {s: 8 for s in range(10, 80, 10)}
    assert rank_schedule(start_rank=64, target_rank=8, total_steps=50) == {10: 19, 20: 19, 30: 18}  # window ends at 38
    assert rank_schedule(start_rank=8, target_rank=2, total_steps=5) == {4: 6}  # shorter than K1: one event at 3/4
    assert rank_schedule(start_rank=8, target_rank=8, total_steps=5) == {}
    for total in (1, 7, 10, 33, 280, 281):
        assert sum(rank_schedule(start_rank=64, target_rank=8, total_steps=total).values()) == 56
    with pytest.raises(ValueError):
        rank_schedule(start_rank=4, target_rank=8, total_steps=10)


def _at_pace(start_rank: int, target_rank: int, total_steps: int) -> bool:
    return max(rank_schedule(start_rank=start_rank, target_rank=target_rank, total_steps=total_steps).values(), default=0) <= 2


@pytest.mark.parametrize(
    ("start_rank", "target_rank", "total_steps"), [(64, 8, 100), (16, 8, 100), (64, 8, 1000), (8, 2, 5), (32, 4, 57), (9, 8, 3)]
)
def test_paper_pace_gap_is_the_brute_force_largest_rank_and_fewest_steps(start_rank, target_rank, total_steps):
    gap = paper_pace_gap(start_rank=start_rank, target_rank=target_rank, total_steps=total_steps)
    assert (gap is None) == _at_pace(start_rank, target_rank, total_steps)
    if gap is None:
        return
    max_start_rank, min_steps = gap
    assert max_start_rank == max(r for r in range(target_rank, start_rank + 1) if _at_pace(r, target_rank, total_steps))
    assert min_steps == next(n for n in range(1, 10_000) if _at_pace(start_rank, target_rank, n))
    assert all(_at_pace(start_rank, target_rank, n) for n in range(min_steps, min_steps + 50))  # and every longer run
    assert (max_start_rank, min_steps) == {(64, 8, 100): (22, 373)}.get((start_rank, target_rank, total_steps), gap)


def test_a_schedule_faster_than_the_paper_warns_with_the_fix(caplog):
    s = TrainSettings(lora_r=8, lora_alpha=16, prunedlora_start_rank=64)
    with caplog.at_level("WARNING", logger="gradprune_deploy.compress.finetune"):
        _attach_prunedlora(_tiny_llama(), s, total_steps=100)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "rank 64 to 8" in warning and "--prunedlora-start-rank 22 or less" in warning and "--max-steps 373 or more" in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="gradprune_deploy.compress.finetune"):
        _attach_prunedlora(_tiny_llama(), TrainSettings(lora_r=8, lora_alpha=16, prunedlora_start_rank=16), total_steps=100)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# ── training: exact zeros and the final rank ──────────────────────────────────────────────────
class _ZeroWatch(TrainerCallback):
    """After every optimizer step: every component pruned so far is exactly zero in A and B."""

    def __init__(self, pruner):
        self.pruner, self.checked, self.adam_would_move = pruner, 0, False

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        for m in self.pruner.modules:
            dead = ~self.pruner.active[m.name]
            if dead.any():
                assert torch.equal(m.lora_a[dead], torch.zeros_like(m.lora_a[dead])), (state.global_step, m.name)
                assert torch.equal(m.lora_b[:, dead], torch.zeros_like(m.lora_b[:, dead])), (state.global_step, m.name)
                self.checked += 1
                moment = optimizer.state[m.lora_b]["exp_avg"][:, dead]
                self.adam_would_move |= bool(moment.abs().sum() > 0)


def test_pruned_components_stay_exactly_zero_through_later_steps(tokenizer, tmp_path):
    s = TrainSettings(batch_size=4, max_steps=30, lora_r=2, lora_alpha=4, prunedlora_start_rank=8, sampling="sequential", warmup_ratio=0.0)
    model = _tiny_llama()
    model.config.use_cache = False
    peft_model, pruner = _attach_prunedlora(model, s, total_steps=30)
    watch = _ZeroWatch(pruner)
    args = _training_args(str(tmp_path), s, max_steps=30, max_grad_norm=1.0, learning_rate=2e-3, disable_tqdm=True)
    _trainer(peft_model, _features(tokenizer), tokenizer, args, [pruner, watch]).train()
    assert [e["step"] for e in pruner.record.events] == [10, 20]  # 3 components each, done by 3/4 of 30 steps
    assert watch.checked == 21 * len(pruner.modules)  # steps 10..30, every module
    assert watch.adam_would_move  # Adam's moments are nonzero there: without re-zeroing they would drift
    assert set(pruner.ranks().values()) == {2}


def test_recovery_finetune_ends_at_the_target_rank_and_merges(tokenizer):
    model = _tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = TrainSettings(batch_size=4, lora_r=2, lora_alpha=4, prunedlora_start_rank=8, sampling="sequential")
    merged, stats = recovery_finetune(model, _features(tokenizer), tokenizer, s, mode="prunedlora", steps=13, quiet=True)
    record = stats["prunedlora"]
    assert stats["mode"] == "prunedlora" and stats["learning_rate"] == 2e-4
    assert record["pruning_steps"] == [10] and record["rank_after_step"] == {"10": 2}  # 8 → 2 forced at step 10
    assert record["final_rank"] == record["final_rank_min"] == 2 and record["modules"] == 2 * 7
    after = merged.state_dict()
    assert set(after) == set(before) and not any("lora" in k for k in after)  # a standard checkpoint
    changed = 0
    for name, w in after.items():
        if name.endswith("proj.weight"):
            diff = (w - before[name]).double()
            # the merged update is B·A over the 2 surviving components (rtol: float32 rounding of W + ΔW)
            assert int(torch.linalg.matrix_rank(diff, rtol=1e-3)) == 2, name
            changed += int(diff.abs().max() > 0)
    assert changed == 14


# ── the CLI ───────────────────────────────────────────────────────────────────────────────────
def test_cli_compress_prunedlora_writes_a_loadable_checkpoint(tiny_llama_dir, tmp_path):
    out = tmp_path / "pruned"
    argv = ["compress", "--model", str(tiny_llama_dir), "--data", str(SST2), "--out", str(out), "--drop-layers", "2"]
    argv += ["--finetune", "prunedlora", "--prunedlora-start-rank", "8", "--lora-r", "2", "--max-examples", "32", "--max-steps", "12"]
    argv += ["--probe-steps", "2", "--batch-size", "4", "--max-length", "64", "--no-ledger", "--no-plot", "-q"]
    assert main(argv) == 0
    manifest = json.loads((out / "gradprune.json").read_text())
    finetune = manifest["finetune"]
    assert finetune["mode"] == "prunedlora" and finetune["settings"]["prunedlora_start_rank"] == 8
    assert finetune["prunedlora"]["pruning_steps"] == [9] and finetune["prunedlora"]["final_rank"] == 2  # one event at 3/4 of 12
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert model.config.num_hidden_layers == 4 and not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in k for k in model.state_dict())
    logits = model(input_ids=torch.tensor([[1, 42, 7, 9]])).logits
    assert torch.isfinite(logits).all()
    # the model card says which recovery ran, with the ranks the manifest recorded
    card = build_model_card(out, repo_id="me/pruned").text
    assert "- Recovery fine-tune: PrunedLoRA (LoRA rank 8 pruned to 2 during the run), merged into the weights, cross-entropy" in card
