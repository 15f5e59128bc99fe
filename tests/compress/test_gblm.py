"""GBLM-Pruner's metric (gblm.py), `--scorer gblm` and `--merge-criterion gblm`, against brute force
on tiny random Llama models: per-sample gradients one row at a time with .backward(), the linears'
input norms by running each decoder layer by hand (attention included)."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from gradprune_deploy.cli import main
from gradprune_deploy.compress.cut import apply_cut
from gradprune_deploy.compress.igia.merge import merge_targets
from gradprune_deploy.compress.scorers.gblm import gblm, gblm_importance
from gradprune_deploy.compress.scorers.gblm_metric import GRADIENT_SCALE, gblm_metric, layer_total
from gradprune_deploy.compress.scorers.registry import SCORERS
from gradprune_deploy.compress.scoring import Scores, batches_of
from gradprune_deploy.compress.surgery import find_layer_stack
from gradprune_deploy.data import CompletionCollator, read_examples, tokenize_examples
from gradprune_deploy.manifest import Manifest
from tests.conftest import SHARED_DATA, tiny_model

SST2_TRAIN = SHARED_DATA / "sst2" / "train.jsonl"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def batches(tokenizer):
    """Two right-padded batches of real sst2 rows (unequal lengths, so padding is exercised)."""
    features = tokenize_examples(read_examples(SST2_TRAIN, limit=5), tokenizer, max_length=128)
    collate = CompletionCollator(tokenizer.pad_token_id)
    out = [collate(features[:3]), collate(features[3:])]
    assert (out[0]["attention_mask"] == 0).any(), "the first batch should contain padding"
    return out


def _rows(batches):
    """Every row without its padding, as (input_ids [1, n], labels [1, n])."""
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            keep = b["attention_mask"][r].bool()
            yield b["input_ids"][r][keep][None], b["labels"][r][keep][None]


def _linear_inputs_by_hand(model, ids):
    """{(layer, linear name): its input [n, in]} for one unpadded row, each decoder layer computed by hand."""
    inner, cfg = model.model, model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    n = ids.shape[1]
    pos = torch.arange(n)[None]
    inputs = {}
    with torch.no_grad():
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, position_ids=pos)
        causal = torch.full((n, n), float("-inf")).triu(1)
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, n, heads, head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, n, kv_heads, head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, n, kv_heads, head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
            weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + causal, dim=-1)
            context = (weights @ v).transpose(1, 2).reshape(1, n, -1)
            h_mid = h + attn.o_proj(context)
            u = layer.post_attention_layernorm(h_mid)
            hidden = mlp.act_fn(mlp.gate_proj(u)) * mlp.up_proj(u)
            out = h_mid + mlp.down_proj(hidden)
            torch.testing.assert_close(
                out, layer(h, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin)), rtol=1e-4, atol=1e-5
            )
            for name, value in zip(LINEARS, (x, x, x, context, u, u, hidden)):
                inputs[i, name] = value[0]
            h = out
    return inputs


def _brute_force_gblm(model, batches):
    """{(layer, name): metric}: |W| * sqrt(sum x^2 / N) + |W| * 100 * sqrt(sum_n g_n^2), in float64,
    g_n from .backward() on row n alone, x from `_linear_inputs_by_hand`."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(True)
    modules = {(i, name): dict(layer.named_modules())[name] for i, layer in enumerate(ref.model.layers) for name in LINEARS}
    input_sq = {key: torch.zeros(m.in_features, dtype=torch.float64) for key, m in modules.items()}
    grad_sq = {key: torch.zeros(m.weight.shape, dtype=torch.float64) for key, m in modules.items()}
    count = 0
    for ids, labels in _rows(batches):
        if not (labels[:, 1:] != -100).any():
            continue
        ref.zero_grad()
        ref(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        for key, x in _linear_inputs_by_hand(ref, ids).items():
            input_sq[key] += (x.double() ** 2).sum(0)
            grad_sq[key] += modules[key].weight.grad.double() ** 2
        count += 1
    assert count == 5
    out = {}
    for key, m in modules.items():
        w = m.weight.detach().double().abs()
        out[key] = w * (input_sq[key] / count).sqrt()[None] + w * GRADIENT_SCALE * grad_sq[key].sqrt()
    return out


# ------------------------------------------------------------------ the pure metric


def test_metric_equals_the_official_codes_running_accumulation():
    """gblm_metric(W, sum x^2, sum g^2, N) == prune_gblm's |W|*sqrt(scaler_row) + |W|*gradients_l2, with
    scaler_row updated as WrappedGPT.add_batch does and gradients_l2 = sqrt(sum (100 g)^2)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 7, generator=gen)
    samples = [torch.randn(1, 3 + s, 7, generator=gen) for s in range(4)]  # N = 4 sequences of unequal length
    grads = [torch.randn(5, 7, generator=gen) for _ in samples]
    scaler_row, nsamples, gradients_l2 = torch.zeros(7), 0, torch.zeros(5, 7)
    for inp, grad in zip(samples, grads):
        tmp = inp.shape[0]
        scaler_row *= nsamples / (nsamples + tmp)
        nsamples += tmp
        scaler_row += torch.norm(inp.reshape(-1, 7).t(), p=2, dim=1) ** 2 / nsamples
        gradients_l2 += torch.abs((grad * 100) ** 2)
    official = weight.abs() * torch.sqrt(scaler_row.reshape(1, -1)) + weight.abs() * torch.sqrt(gradients_l2)

    input_sq = sum((s.reshape(-1, 7) ** 2).sum(0) for s in samples)
    grad_sq = sum(g**2 for g in grads)
    torch.testing.assert_close(gblm_metric(weight, input_sq, grad_sq, len(samples)), official, rtol=1e-5, atol=1e-6)
    assert layer_total({"a": official, "b": 2 * official}) == pytest.approx(3 * float(official.double().sum()))


def test_metric_refuses_mismatched_shapes_and_no_samples():
    w = torch.ones(3, 4)
    with pytest.raises(ValueError, match="shape mismatch"):
        gblm_metric(w, torch.ones(3), torch.ones(3, 4), 1)
    with pytest.raises(ValueError, match="at least one"):
        gblm_metric(w, torch.ones(4), torch.ones(3, 4), 0)


# ------------------------------------------------------------------ collection and --scorer gblm


def test_gblm_importance_and_scorer_match_brute_force(batches):
    model = tiny_model("llama", num_hidden_layers=3, seed=1)
    flags = [p.requires_grad for p in model.parameters()]
    before = copy.deepcopy(model.state_dict())
    expected = _brute_force_gblm(model, batches)

    got = gblm_importance(model, batches)
    assert sorted(got) == [0, 1, 2] and all(sorted(got[i]) == sorted(LINEARS) for i in got)
    for (i, name), metric in expected.items():
        assert got[i][name].dtype == torch.float32 and got[i][name].device.type == "cpu"
        torch.testing.assert_close(got[i][name].double(), metric, rtol=2e-4, atol=1e-7, msg=f"layer {i} {name}")

    scores = gblm(model, batches)
    assert SCORERS["gblm"] is gblm and scores.dtype == torch.float64 and scores.shape == (3,)
    per_layer = torch.tensor([sum(float(expected[i, n].sum()) for n in LINEARS) for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(scores, per_layer, rtol=1e-4, atol=0)

    # a subset of layers gives the same numbers; the model is left as it was found
    subset = gblm_importance(model, batches, layers=[2])
    assert list(subset) == [2] and all(torch.equal(subset[2][n], got[2][n]) for n in LINEARS)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not model.training
    assert not any(m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------ --merge-criterion gblm


def _brute_force_merge(model, dropped, merged, metric, p):
    """Drop + same-sign merge done by hand: for each merged layer's linears, the top round(p*numel)
    entries by `metric` (argsort), added into the preceding kept layer where the signs agree."""
    expected = copy.deepcopy(model)
    layers = expected.model.layers
    for src, dst in merge_targets(dropped, len(layers)).items():
        if src not in merged:
            continue
        for name in LINEARS:
            removed = dict(layers[src].named_modules())[name].weight.data
            kept = dict(layers[dst].named_modules())[name].weight.data
            top = torch.zeros(removed.numel(), dtype=torch.bool)
            top[metric[src, name].flatten().argsort(descending=True)[: round(p * removed.numel())]] = True
            add = top.reshape(removed.shape) & (kept * removed > 0)
            kept += torch.where(add, removed, torch.zeros_like(removed))
    keep = [i for i in range(len(layers)) if i not in dropped]
    return [expected.model.layers[i] for i in keep]


def test_merge_with_gblm_criterion_picks_top_p_by_the_gblm_metric(batches):
    model = tiny_model("llama", num_hidden_layers=5, seed=2)
    dense = copy.deepcopy(model)
    dropped, values = [2, 3], torch.tensor([9.0, 9.0, 0.1, 0.5, 9.0], dtype=torch.float64)  # merge K=1: layer 3 → layer 1
    gen = torch.Generator().manual_seed(0)
    igia = {name: torch.rand(dict(model.model.layers[3].named_modules())[name].weight.shape, generator=gen) for name in LINEARS}
    record = types.SimpleNamespace(igia_for_layer=lambda i: igia)  # what the IGIA criterion would rank by

    scores = Scores("igia", values, record=record, gblm_batches=batches)
    merge = apply_cut(model, scores, dropped, 1, 0.3)
    assert merge.criterion == "gblm" and merge.targets == {"3": 1} and sorted(scores.gblm_cache) == [3]

    expected = _brute_force_merge(dense, dropped, [3], _brute_force_gblm(dense, batches), 0.3)
    got = find_layer_stack(model)[1]
    assert len(got) == 3
    for layer_got, layer_exp in zip(got, expected):
        for (n, a), (_, b) in zip(layer_got.named_parameters(), layer_exp.named_parameters()):
            assert torch.equal(a, b), n
    by_igia = _brute_force_merge(dense, dropped, [3], {(3, n): igia[n] for n in LINEARS}, 0.3)
    assert not torch.equal(by_igia[1].mlp.up_proj.weight, got[1].mlp.up_proj.weight)  # the criterion decides

    # a second cut of a copy of the same dense model reuses the cached metric and merges the same way
    again = copy.deepcopy(dense)
    apply_cut(again, scores, dropped, 1, 0.3)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    igia_cut = apply_cut(copy.deepcopy(dense), Scores("igia", values, record=record), dropped, 1, 0.3)
    assert igia_cut.criterion == "igia"


# ------------------------------------------------------------------ the CLI


def _compress(model_dir, out, *extra: str) -> int:
    argv = ["compress", "--model", str(model_dir), "--data", str(SST2_TRAIN), "--max-examples", "12", "--max-length", "64"]
    argv += ["--batch-size", "4", "--scorer-batches", "2", "--drop-layers", "2", "--no-ledger", "--out", str(out), "-q", *extra]
    return main(argv)


def _scoring_batches(tokenizer):
    features = tokenize_examples(read_examples(SST2_TRAIN, limit=12), tokenizer, max_length=64)
    return batches_of(features, tokenizer, 4, 2)


def _load(out):
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def test_cli_scorer_gblm_drops_the_lowest_gblm_layers(tiny_llama_dir, tmp_path, tokenizer):
    out = tmp_path / "gblm"
    assert _compress(tiny_llama_dir, out, "--scorer", "gblm", "--finetune", "none") == 0
    m = Manifest.read(out)
    expected = gblm(_load(tiny_llama_dir), _scoring_batches(tokenizer))
    torch.testing.assert_close(torch.tensor(m.layer_scores, dtype=torch.float64), expected, rtol=1e-5, atol=0)
    assert m.scorer == "gblm" and m.layers_dropped == sorted(expected.argsort()[:2].tolist()) and not m.merge.enabled
    assert m.scoring["batches"] == 2 and m.config["merge_criterion"] == "igia"
    assert len(_load(out).model.layers) == 4


def test_cli_merge_criterion_gblm_writes_the_gblm_merge(tiny_llama_dir, tmp_path, tokenizer):
    out = tmp_path / "igia-gblm-merge"
    code = _compress(tiny_llama_dir, out, "--merge-criterion", "gblm", "--probe-steps", "2", "--max-steps", "2", "--finetune", "none")
    assert code == 0
    m = Manifest.read(out)
    assert m.scorer == "igia" and m.merge.enabled and m.merge.criterion == "gblm" and len(m.merge.targets) == 1
    ((src, dst),) = ((int(s), d) for s, d in m.merge.targets.items())
    dense = _load(tiny_llama_dir)
    metric = gblm_importance(dense, _scoring_batches(tokenizer), layers=[src])
    expected = _brute_force_merge(dense, m.layers_dropped, [src], {(src, n): metric[src][n] for n in LINEARS}, m.merge.keep_top_p)
    pruned = _load(out)
    assert len(pruned.model.layers) == 4
    new_index = m.layers_kept.index(dst)
    for (n, a), (_, b) in zip(pruned.model.layers[new_index].named_parameters(), expected[new_index].named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert not torch.equal(pruned.model.layers[new_index].mlp.up_proj.weight, dense.model.layers[dst].mlp.up_proj.weight)
