"""The official code's two choices as options (--igia-reduce norm, --probe-clip-grad-norm), against brute force:
the probe inside a real Trainer vs the same LoRA steps written out by hand, gradients saved and scored by an
explicit loop, as secretflow/ACoLab's trainer.py + layer_important.py + process_important.py do."""

import copy
import json

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from gradprune_deploy.cli import main
from gradprune_deploy.compress.finetune import TrainSettings, attach_lora, run_probe
from gradprune_deploy.compress.igia.importance import step_score
from gradprune_deploy.compress.igia.probe import ProbeOptions, lora_pairs
from gradprune_deploy.data import CompletionCollator, read_examples, tokenize_examples
from tests.conftest import SHARED_DATA, tiny_model

SETTINGS = TrainSettings(
    batch_size=4, learning_rate=1e-3, max_steps=10, warmup_ratio=0.0, lora_dropout=0.0, lora_r=4, seed=3, sampling="sequential"
)
STEPS = 3


@pytest.fixture(scope="module")
def sst2_features(tokenizer):
    return tokenize_examples(read_examples(SHARED_DATA / "sst2", limit=40), tokenizer, max_length=96)


def test_step_score_norm_is_frobenius_norm_and_squared_its_square():
    torch.manual_seed(0)
    for out_dim, in_dim, r in [(7, 5, 3), (64, 32, 8), (1, 9, 2)]:
        gb, ga = torch.randn(out_dim, r), torch.randn(r, in_dim)
        product = gb.double() @ ga.double()
        assert step_score(gb, ga, "norm") == pytest.approx(float(torch.norm(product)), rel=1e-10)  # official: torch.norm(mm(b, a))
        assert step_score(gb, ga, "squared") == pytest.approx(float(product.square().sum()), rel=1e-10)
    with pytest.raises(ValueError):
        step_score(gb, ga, "abs")


def _saved_gradients(model, features, tokenizer, steps: int, clip: float | None):
    """The official trainer.py, by hand: backward, clip all LoRA gradients together (as the Trainer does,
    before on_pre_optimizer_step), save every (∇B, ∇A), step AdamW. Returns the informative steps' saved
    gradients, the zero-gradient step count and how many steps the clipping actually scaled."""
    peft_model = attach_lora(model, SETTINGS)
    peft_model.train()
    pairs = lora_pairs(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=SETTINGS.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, SETTINGS.max_steps)
    collate = CompletionCollator(tokenizer.pad_token_id)
    saved, zero, clipped, k = [], 0, 0, 0
    while len(saved) < steps:
        batch = collate(features[k * SETTINGS.batch_size : (k + 1) * SETTINGS.batch_size])
        peft_model(**batch).loss.backward()
        if clip is not None:
            clipped += int(float(torch.nn.utils.clip_grad_norm_(params, clip)) > clip)
        if all(p.lora_a.grad.count_nonzero() == 0 for p in pairs):
            zero += 1
        else:
            saved.append({p.key: (p.lora_b.grad.detach().double().clone(), p.lora_a.grad.detach().double().clone()) for p in pairs})
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        k += 1
    return saved, zero, clipped


def _official_scores(saved, reduce: str, num_layers: int) -> torch.Tensor:
    """layer_important.py: aa[layer] += torch.norm(torch.mm(b, a)) over every linear and step (norm);
    the paper's formula squares it (squared)."""
    scores = torch.zeros(num_layers, dtype=torch.float64)
    for step in saved:
        for (layer, _name), (gb, ga) in step.items():
            norm = torch.norm(torch.mm(gb, ga))
            scores[layer] += norm if reduce == "norm" else norm**2
    return scores


def _official_merge_f(saved, layer: int) -> dict[str, torch.Tensor]:
    """process_important.py: lora_dict[name] += torch.square(torch.mm(b, a)), whatever the layer score did."""
    f = {}
    for step in saved:
        for (i, name), (gb, ga) in step.items():
            if i == layer:
                f[name] = f.get(name, 0) + torch.square(torch.mm(gb, ga))
    return f


@pytest.mark.parametrize(("reduce", "clip"), [("norm", None), ("squared", 0.05), ("norm", 0.05), ("norm", 1.0)])
def test_probe_variants_match_the_official_computation(sst2_features, tokenizer, reduce, clip):
    base = tiny_model("llama", seed=11)
    reference = copy.deepcopy(base)
    options = ProbeOptions(reduce=reduce, clip_grad_norm=clip)
    record, stats = run_probe(base, sst2_features, tokenizer, SETTINGS, probe_steps=STEPS, options=options)
    saved, zero, clipped = _saved_gradients(reference, sst2_features, tokenizer, STEPS, clip)

    assert stats["probe_steps"] == STEPS and stats["zero_gradient_steps"] == zero == 1
    assert stats["igia_reduce"] == reduce and stats["probe_clip_grad_norm"] == clip and stats["adaptive"] is None
    if clip == 0.05:
        assert clipped == STEPS + zero  # the clipping really scaled every step: the comparison below is not vacuous
    assert torch.allclose(record.scores(), _official_scores(saved, reduce, 6), rtol=2e-4)
    for layer in (0, 5):
        brute = _official_merge_f(saved, layer)
        igia = record.igia_for_layer(layer)
        assert set(igia) == set(brute)
        for name, f in igia.items():
            assert torch.allclose(f.double(), brute[name], rtol=2e-3, atol=1e-12 * float(brute[name].max()))


def test_clipping_changes_what_the_probe_reads(sst2_features, tokenizer):
    """Clipped and unclipped probes share step 1's direction but not the scale or the later steps: the scores differ."""
    unclipped, _ = run_probe(tiny_model("llama", seed=11), sst2_features, tokenizer, SETTINGS, probe_steps=STEPS)
    clipped, stats = run_probe(
        tiny_model("llama", seed=11), sst2_features, tokenizer, SETTINGS, probe_steps=STEPS, options=ProbeOptions(clip_grad_norm=0.05)
    )
    assert stats["gradient_clipping"].startswith("max_grad_norm 0.05")
    assert float(clipped.scores().sum()) < float(unclipped.scores().sum())
    assert not torch.allclose(clipped.scores() / clipped.scores().sum(), unclipped.scores() / unclipped.scores().sum(), rtol=1e-3)


def test_cli_records_the_variant_in_the_manifest(tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    sst2 = str(SHARED_DATA / "sst2")
    flags = ["--max-examples", "32", "--finetune", "none", "--batch-size", "4", "--max-length", "96", "--drop-layers", "2", "-q"]
    variant = ["--igia-reduce", "norm", "--probe-clip-grad-norm", "1.0", "--probe-steps", "2", "--no-ledger", "--no-plot"]
    assert main(["compress", "--model", str(tiny_llama_dir), "--data", sst2, "--out", str(out), *flags, *variant]) == 0
    manifest = json.loads((out / "gradprune.json").read_text())
    scoring = manifest["scoring"]
    assert scoring["igia_reduce"] == "norm" and scoring["probe_clip_grad_norm"] == 1.0 and scoring["probe_steps"] == 2
    assert scoring["gradient_clipping"].startswith("max_grad_norm 1")
    assert manifest["config"]["igia_reduce"] == "norm" and manifest["config"]["probe_clip_grad_norm"] == 1.0
    ranked = sorted(range(6), key=lambda i: (manifest["layer_scores"][i], -i))
    assert sorted(ranked[:2]) == manifest["layers_dropped"]
