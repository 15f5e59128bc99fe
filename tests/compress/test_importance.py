"""IGIA math against brute force, and the probe inside a real Trainer against a manual loop."""

import copy

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from gradprune_deploy.compress.finetune import TrainSettings, attach_lora, run_probe
from gradprune_deploy.compress.igia.importance import igia_matrix, igia_step_total, layer_scores
from gradprune_deploy.compress.igia.probe import lora_pairs
from gradprune_deploy.data import CompletionCollator, read_examples, tokenize_examples
from tests.conftest import SHARED_DATA, tiny_model


def test_step_total_equals_dense_square_sum():
    torch.manual_seed(0)
    for out_dim, in_dim, r in [(7, 5, 3), (64, 32, 8), (1, 9, 2)]:
        gb, ga = torch.randn(out_dim, r), torch.randn(r, in_dim)
        dense = float((gb.double() @ ga.double()).square().sum())
        assert igia_step_total(gb, ga) == pytest.approx(dense, rel=1e-10)


def test_igia_matrix_is_sum_of_squared_products():
    torch.manual_seed(1)
    factors = [(torch.randn(6, 2), torch.randn(2, 4)) for _ in range(3)]
    brute = torch.zeros(6, 4, dtype=torch.float64)
    for gb, ga in factors:
        for i in range(6):
            for j in range(4):
                brute[i, j] += float(sum(gb[i, k] * ga[k, j] for k in range(2))) ** 2
    assert torch.allclose(igia_matrix(factors).double(), brute, rtol=1e-5)
    assert igia_matrix(factors).sum().item() == pytest.approx(sum(igia_step_total(b, a) for b, a in factors), rel=1e-5)


def test_layer_scores_sum_linears_per_layer():
    totals = {(0, "q"): 1.0, (0, "k"): 2.0, (2, "q"): 5.0}
    assert layer_scores(totals, 3).tolist() == [3.0, 0.0, 5.0]


@pytest.fixture(scope="module")
def sst2_features(tokenizer):
    return tokenize_examples(read_examples(SHARED_DATA / "sst2", limit=40), tokenizer, max_length=96)


def _manual_probe(model, features, tokenizer, settings: TrainSettings, steps: int, total_steps: int):
    """Brute force: the same LoRA fine-tune written out by hand; G_t = ∇B·∇A read from autograd,
    F accumulated densely for every linear."""
    peft_model = attach_lora(model, settings)
    peft_model.train()
    pairs = lora_pairs(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, total_steps)
    collate = CompletionCollator(tokenizer.pad_token_id)
    dense = {p.key: torch.zeros_like(p.lora_b.detach() @ p.lora_a.detach(), dtype=torch.float64) for p in pairs}
    informative = zero = k = 0
    while informative < steps:
        batch = collate(features[k * settings.batch_size : (k + 1) * settings.batch_size])
        peft_model(**batch).loss.backward()
        if all(p.lora_a.grad.count_nonzero() == 0 for p in pairs):
            zero += 1
        else:
            for p in pairs:
                dense[p.key] += (p.lora_b.grad.double() @ p.lora_a.grad.double()).square()
            informative += 1
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        k += 1
    return dense, zero


def test_probe_in_trainer_matches_manual_dense_accumulation(sst2_features, tokenizer):
    settings = TrainSettings(
        batch_size=4, learning_rate=1e-3, max_steps=10, warmup_ratio=0.0, lora_dropout=0.0, lora_r=4, seed=3, sampling="sequential"
    )
    steps = 4
    base = tiny_model("llama", seed=11)
    reference = copy.deepcopy(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}

    record, stats = run_probe(base, sst2_features, tokenizer, settings, probe_steps=steps)
    dense, zero = _manual_probe(reference, sst2_features, tokenizer, settings, steps, total_steps=10)

    assert stats["probe_steps"] == steps and stats["zero_gradient_steps"] == zero == 1  # B = 0 on step 1
    # low-memory layer scores (r×r products) == dense brute force
    brute_scores = layer_scores({k: float(v.sum()) for k, v in dense.items()}, 6)
    assert torch.allclose(record.scores(), brute_scores, rtol=2e-4)
    # element-level F materialised from the stored factors == dense accumulation, for any layer
    for layer in (0, 3, 5):
        igia = record.igia_for_layer(layer)
        assert set(igia) == {name for (i, name) in dense if i == layer}
        for name, f in igia.items():
            assert torch.allclose(f.double(), dense[(layer, name)], rtol=2e-3, atol=1e-12 * float(dense[(layer, name)].max()))
    # the probe leaves the base weights untouched and removes the LoRA wrappers
    after = base.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
