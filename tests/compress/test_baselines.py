"""Baseline layer scorers against brute-force references on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.masking_utils import create_causal_mask

from gradprune_deploy.compress.gradmap.ranking import ranks_from_removal_order
from gradprune_deploy.compress.gradmap.score import gradmap
from gradprune_deploy.compress.scorers.block_influence import block_influence
from gradprune_deploy.compress.scorers.common import layer_gradients
from gradprune_deploy.compress.scorers.data_free import last_n, random_scores
from gradprune_deploy.compress.scorers.registry import SCORERS
from gradprune_deploy.compress.scorers.taylor import taylor
from gradprune_deploy.compress.surgery import drop_layers
from gradprune_deploy.data import CompletionCollator, read_examples, tokenize_examples
from gradprune_deploy.errors import DataError
from tests.conftest import (
    SHARED_DATA,  # noqa: E402
    tiny_model,
)


@pytest.fixture(scope="module")
def batches(tokenizer):
    """Two right-padded batches of real sst2 rows (unequal lengths, so padding is exercised)."""
    examples = read_examples(SHARED_DATA / "sst2", split="train", limit=5)
    features = tokenize_examples(examples, tokenizer, max_length=128)
    collate = CompletionCollator(tokenizer.pad_token_id)
    out = [collate(features[:3]), collate(features[3:])]
    assert (out[0]["attention_mask"] == 0).any(), "the first batch should contain padding"
    return out


def _loss_sum_float64(model, batches):
    """Sum of each batch's mean completion-token loss, computed in float64 (HF's own .loss is float32)."""
    total = 0.0
    for b in batches:  # (called under no_grad)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits.double()
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100))
    return total


def _reference_grads(model, batches):
    """Per layer, [p.grad] after .backward() on a copy, the textbook way."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    for b in batches:
        ref(**b, use_cache=False).loss.backward()
    return [[p.grad.clone() for p in layer.parameters()] for layer in ref.model.layers], ref


# ------------------------------------------------------------------ block influence


def _manual_block_influence(model, batches):
    """Run the decoder layers one by one (embedding, rotary, causal mask by hand)."""
    inner = model.model
    sums = torch.zeros(len(inner.layers), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for b in batches:
            ids, mask = b["input_ids"], b["attention_mask"]
            h = inner.embed_tokens(ids)
            pos = torch.arange(ids.shape[1]).unsqueeze(0)
            rope = inner.rotary_emb(h, position_ids=pos)
            causal = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=mask, past_key_values=None, position_ids=pos)
            keep = mask.bool()
            for i, layer in enumerate(inner.layers):
                out = layer(h, attention_mask=causal, position_ids=pos, position_embeddings=rope)
                cos = torch.nn.functional.cosine_similarity(h.double(), out.double(), dim=-1)
                sums[i] += (1 - cos)[keep].sum()
                h = out
            count += int(keep.sum())
    return sums / count


def test_block_influence_matches_manual_layer_run(batches):
    model = tiny_model("llama", num_hidden_layers=4)
    scores = block_influence(model, batches)
    assert scores.dtype == torch.float64 and scores.shape == (4,)
    torch.testing.assert_close(scores, _manual_block_influence(model, batches), rtol=1e-6, atol=1e-9)


def test_block_influence_ranks_an_identity_layer_least_important(batches):
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():  # zero both residual branches of layer 2: output == input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = block_influence(model, batches)
    assert scores[2] == pytest.approx(0.0, abs=1e-9)
    assert int(scores.argmin()) == 2 and bool((scores[[0, 1, 3]] > 1e-4).all())


# ------------------------------------------------------------------ taylor


def test_taylor_matches_backward_reference(batches):
    model = tiny_model("llama", num_hidden_layers=4)
    ref_grads, ref = _reference_grads(model, batches)
    expected = torch.tensor(
        [
            sum(float((p.detach().double() * g.double()).abs().sum()) for p, g in zip(layer.parameters(), grads))
            for layer, grads in zip(ref.model.layers, ref_grads)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(taylor(model, batches), expected, rtol=1e-5, atol=0)


def test_layer_gradient_of_one_weight_matches_finite_difference(batches):
    model = tiny_model("llama", num_hidden_layers=3).double()
    grads = layer_gradients(model, batches)
    layer, (row, col) = 1, (5, 7)
    weight = model.model.layers[layer].mlp.down_proj.weight
    index = [n for n, _ in model.model.layers[layer].named_parameters()].index("mlp.down_proj.weight")
    # RMSNorm computes in float32 even in a float64 model, so a tiny step drowns in rounding; at
    # 1e-3 the central difference's own error (third order) is ~1e-5 relative.
    eps = 1e-3
    with torch.no_grad():
        original = weight[row, col].item()
        weight[row, col] = original + eps
        up = float(_loss_sum_float64(model, batches))
        weight[row, col] = original - eps
        down = float(_loss_sum_float64(model, batches))
        weight[row, col] = original
    numeric = (up - down) / (2 * eps)
    assert float(grads[layer][index][row, col]) == pytest.approx(numeric, rel=1e-3)


# ------------------------------------------------------------------ gradmap


def _mean_abs(grads):
    return float(sum(g.double().abs().sum() for g in grads) / sum(g.numel() for g in grads))


def test_gradmap_single_pass_is_mean_absolute_gradient(batches):
    model = tiny_model("llama", num_hidden_layers=4)
    ref_grads, _ = _reference_grads(model, batches)
    expected = torch.tensor([_mean_abs(g) for g in ref_grads], dtype=torch.float64)
    torch.testing.assert_close(gradmap(model, batches, iterative=False), expected, rtol=1e-5, atol=0)


def _brute_force_gradmap_order(model, batches, decisions):
    """Greedy removal by physically deleting layers (surgery) and recomputing gradients."""
    removed = []
    for _ in range(decisions):
        pruned = drop_layers(copy.deepcopy(model), removed)
        kept = [i for i in range(model.config.num_hidden_layers) if i not in removed]
        grads, _ = _reference_grads(pruned, batches)
        metric = {old: _mean_abs(g) for old, g in zip(kept, grads)}
        removed.append(min(metric, key=metric.get))
    return removed


def test_gradmap_iterative_matches_physically_pruned_models(batches):
    model = tiny_model("llama", num_hidden_layers=5)
    scores = gradmap(model, batches)
    order = [int(i) for i in torch.argsort(scores)]
    assert sorted(scores.tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert order[:4] == _brute_force_gradmap_order(model, batches, decisions=4)


def test_gradmap_max_decisions_is_a_prefix_of_the_full_run(batches):
    model = tiny_model("llama", num_hidden_layers=5)
    full = torch.argsort(gradmap(model, batches)).tolist()
    two = gradmap(model, batches, max_decisions=2)
    assert torch.argsort(two).tolist()[:2] == full[:2]
    assert sorted(two.tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_ranks_from_removal_order():
    scores = ranks_from_removal_order([3, 0], {1: 0.5, 2: 0.1, 4: 0.9}, 5)
    assert scores.tolist() == [1.0, 3.0, 2.0, 0.0, 4.0]


# ------------------------------------------------------------------ last-n, random


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_last_n_drops_the_deepest_layers_but_keeps_the_final_one(k):
    model = tiny_model("llama", num_hidden_layers=6)
    scores = last_n(model, [])
    assert scores.tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 6.0]
    dropped = sorted(torch.argsort(scores)[:k].tolist())
    assert dropped == list(range(6 - 1 - k, 6 - 1))


def test_random_is_a_seeded_permutation():
    model = tiny_model("llama", num_hidden_layers=6)
    a, b, c = random_scores(model, [], seed=0), random_scores(model, [], seed=0), random_scores(model, [], seed=1)
    assert a.dtype == torch.float64 and sorted(a.tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ------------------------------------------------------------------ contract shared by all scorers


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scorer_leaves_the_model_unchanged(name, arch, batches):
    model = tiny_model(arch, num_hidden_layers=3)
    model.train()
    model.model.layers[1].eval()  # a mixed train/eval state must come back as it was
    model.model.embed_tokens.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    scores = SCORERS[name](model, batches, seed=0)

    assert scores.shape == (3,) and scores.dtype == torch.float64 and bool(torch.isfinite(scores).all())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize("name", ["block-influence", "taylor", "gradmap"])
def test_data_scorers_need_batches(name):
    with pytest.raises(DataError):
        SCORERS[name](tiny_model("llama", num_hidden_layers=2), [], seed=0)


@pytest.mark.parametrize("name", ["taylor", "gradmap"])
def test_gradient_scorers_need_completion_tokens(name, batches):
    no_labels = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in batches]
    with pytest.raises(DataError, match="completion"):
        SCORERS[name](tiny_model("llama", num_hidden_layers=2), no_labels, seed=0)
