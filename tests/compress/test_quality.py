"""The quality issue's math and wiring against brute force: K-layer merge, distillation loss,
the ppl scorer, the validation hold-out and the ledger, and `--scorer auto`."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from gradprune_deploy.cli import main
from gradprune_deploy.compress.distill import DistillSettings, distillation_loss, kl_on_completion
from gradprune_deploy.compress.igia.apply_merge import merge_dropped_layers
from gradprune_deploy.compress.igia.merge import layers_to_merge, merge_targets, same_sign_merge
from gradprune_deploy.compress.ledger import held_out_of, split_slice, verdict
from gradprune_deploy.compress.scorers.ppl import ppl
from gradprune_deploy.compress.surgery import drop_layers, find_layer_stack
from gradprune_deploy.data import CompletionCollator, read_examples, tokenize_examples
from gradprune_deploy.evaluation.evaluate import EvalConfig, evaluate
from gradprune_deploy.manifest import Manifest, QualityPoint
from tests.conftest import SHARED_DATA, tiny_model

SST2_TRAIN = SHARED_DATA / "sst2" / "train.jsonl"


# ── merge K ───────────────────────────────────────────────────────────────────────────────────
def test_layers_to_merge_picks_the_highest_scoring_dropped_layers():
    scores = [5.0, 0.1, 0.3, 0.2, 9.0, 0.25]
    assert layers_to_merge([1, 2, 3, 5], scores, 1) == [2]
    assert layers_to_merge([1, 2, 3, 5], scores, 2) == [2, 5]
    assert layers_to_merge([1, 2, 3, 5], scores, None) == [1, 2, 3, 5]
    assert layers_to_merge([1, 2, 3, 5], scores, 0) == []


@pytest.mark.parametrize("k", [1, 2, 3])
def test_merge_of_k_layers_touches_exactly_k_targets_and_matches_brute_force(k):
    model = tiny_model("llama", num_hidden_layers=8, seed=4)
    _, layers = find_layer_stack(model)
    dropped = [2, 3, 5, 6]
    scores = [9, 9, 0.4, 0.1, 9, 0.3, 0.2, 9]
    merged = layers_to_merge(dropped, scores, k)
    gen = torch.Generator().manual_seed(0)
    igia = {
        i: {
            name: torch.rand(mod.weight.shape, generator=gen) for name, mod in layers[i].named_modules() if isinstance(mod, torch.nn.Linear)
        }
        for i in dropped
    }
    before = copy.deepcopy(model)
    record = merge_dropped_layers(layers, igia.__getitem__, dropped, merged, keep_top_p=0.3)

    assert sorted(int(s) for s in record.targets) == merged
    # brute force: apply each merge by hand, in order, onto a copy
    expected = copy.deepcopy(before)
    _, exp_layers = find_layer_stack(expected)
    for src, dst in merge_targets(dropped, 8).items():
        if src not in merged:
            continue
        for name, mod in exp_layers[src].named_modules():
            if isinstance(mod, torch.nn.Linear):
                target = dict(exp_layers[dst].named_modules())[name]
                target.weight.data, _ = same_sign_merge(target.weight.data, mod.weight.data, igia[src][name], 0.3)
    changed = set()
    for i, (got, exp, old) in enumerate(zip(layers, exp_layers, find_layer_stack(before)[1])):
        for (n, p), (_, q), (_, o) in zip(got.named_parameters(), exp.named_parameters(), old.named_parameters()):
            assert torch.equal(p, q), (i, n)
            if not torch.equal(p, o):
                changed.add(i)
    assert changed == {merge_targets(dropped, 8)[m] for m in merged}
    assert len(record.targets) == k


# ── distillation ──────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (2.0, None), (1.5, 3)])
def test_distillation_loss_against_a_hand_computation(temperature, top_k):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 5, -100, -100]])
    ce = torch.tensor(1.25)
    alpha = 0.4
    total, kl = distillation_loss(student, teacher, labels, ce, DistillSettings(alpha, temperature, top_k))

    terms = []
    for b in range(2):
        for t in range(4):  # logits at t predict label t+1
            if labels[b, t + 1] == -100:
                continue
            zt, zs = teacher[b, t].tolist(), student[b, t].tolist()
            ids = sorted(range(7), key=lambda i: -zt[i])[:top_k] if top_k else list(range(7))
            zt_k = [zt[i] / temperature for i in ids]
            norm_t = math.log(sum(math.exp(v) for v in zt_k))
            norm_s = math.log(sum(math.exp(v / temperature) for v in zs))
            terms.append(sum(math.exp(zt_k[j] - norm_t) * ((zt_k[j] - norm_t) - (zs[i] / temperature - norm_s)) for j, i in enumerate(ids)))
    expected_kl = sum(terms) / len(terms)
    assert float(kl) == pytest.approx(expected_kl, rel=1e-5)
    assert float(total) == pytest.approx(alpha * temperature**2 * expected_kl + (1 - alpha) * 1.25, rel=1e-5)


def test_kl_is_zero_when_student_equals_teacher_and_gradient_flows():
    logits = torch.randn(1, 4, 6, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, 3]])
    assert float(kl_on_completion(logits, logits.detach(), labels)) == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(1, 4, 6, requires_grad=True)
    kl_on_completion(student, logits.detach(), labels).backward()
    assert student.grad.abs().sum() > 0
    assert torch.all(student.grad[0, 3] == 0)  # the last position predicts nothing


# ── ppl scorer ────────────────────────────────────────────────────────────────────────────────
def _batches(tokenizer, n=8, batch_size=4):
    features = tokenize_examples(read_examples(SST2_TRAIN, limit=n), tokenizer, max_length=96)
    collate = CompletionCollator(tokenizer.pad_token_id)
    return [collate(features[i : i + batch_size]) for i in range(0, len(features), batch_size)]


def _completion_loss(model, batches):
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            mask = labels != -100
            total += float(F.cross_entropy(logits[mask], labels[mask], reduction="sum"))
            tokens += int(mask.sum())
    return total / tokens


def test_ppl_scores_equal_removing_each_layer_by_hand(tokenizer):
    model = tiny_model("llama", num_hidden_layers=4, seed=2)
    batches = _batches(tokenizer)
    scores = ppl(model, batches)
    base = _completion_loss(model, batches)
    for i in range(4):
        pruned = drop_layers(copy.deepcopy(model), [i])
        assert float(scores[i]) == pytest.approx(_completion_loss(pruned, batches) - base, rel=1e-4, abs=1e-5)


# ── hold-out and ledger ───────────────────────────────────────────────────────────────────────
def test_split_slice_is_seeded_disjoint_and_bounded():
    train, held = split_slice(100, fraction=0.1, max_rows=8, seed=3)
    assert len(held) == 8 and not set(train) & set(held) and sorted(train + held) == list(range(100))
    assert split_slice(100, fraction=0.1, max_rows=8, seed=3) == (train, held)
    assert split_slice(100, fraction=0.1, max_rows=8, seed=4) != (train, held)
    assert len(split_slice(3, fraction=0.5, max_rows=10, seed=0)[0]) >= 1


def test_verdict_warns_when_far_worse():
    dense = QualityPoint(stage="dense", loss=2.0, accuracy=0.8)
    ok = QualityPoint(stage="recovered", loss=2.2, accuracy=0.78)
    bad = QualityPoint(stage="recovered", loss=6.0, accuracy=0.5)
    assert verdict([dense, ok])[1] is False
    text, warn = verdict([dense, bad])
    assert warn and "far worse" in text


def test_ledger_rows_are_never_trained_on_and_its_numbers_recompute(tiny_llama_dir, tmp_path, tokenizer):
    """compress on a single file: the seeded validation slice is held out of training; the
    ledger's dense and recovered numbers equal an independent evaluation of the two models."""
    out = tmp_path / "ckpt"
    code = main(
        [
            "compress",
            "--model",
            str(tiny_llama_dir),
            "--data",
            str(SST2_TRAIN),
            "--max-examples",
            "40",
            "--validation-fraction",
            "0.25",
            "--max-length",
            "64",
            "--batch-size",
            "4",
            "--max-steps",
            "3",
            "--probe-steps",
            "2",
            "--drop-layers",
            "2",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert code == 0
    m = Manifest.read(out)
    rows = read_examples(SST2_TRAIN, limit=40)
    train_idx, held_idx = split_slice(40, fraction=0.25, max_rows=128, seed=0)
    assert m.data.examples == len(train_idx) == 30 and m.quality.rows == len(held_idx) == 10
    held = held_out_of(m)  # the split re-derived from the manifest alone (exporters, the study's dense control)
    assert [ex.prompt for ex in held.train] == [rows[i].prompt for i in train_idx]
    assert [ex.prompt for ex in held.validation] == [rows[i].prompt for i in held_idx]
    held_file = tmp_path / "held.jsonl"
    held_file.write_text(
        "".join(
            json.dumps({"prompt": rows[i].prompt, "completion": rows[i].completion, "choices": list(rows[i].choices)}) + "\n"
            for i in held_idx
        )
    )
    points = {p.stage: p for p in m.quality.points}
    assert set(points) == {"dense", "pruned", "recovered"}
    for ckpt, stage in ((tiny_llama_dir, "dense"), (out, "recovered")):
        loss = evaluate(EvalConfig(str(ckpt), data=str(held_file), metric="loss", save=False))
        acc = evaluate(EvalConfig(str(ckpt), data=str(held_file), metric="choice", save=False))
        assert points[stage].loss == pytest.approx(loss["value"], rel=1e-4)
        assert points[stage].accuracy == pytest.approx(acc["value"])


def test_auto_picks_the_proposal_its_criterion_ranks_best(tiny_llama_dir, tmp_path):
    """--scorer auto judging raw cuts (--heal-steps 0): the four scorers propose different cuts with
    different validation losses, and the checkpoint is the proposal with the lowest one."""
    out = tmp_path / "auto"
    code = main(
        [
            "compress",
            "--model",
            str(tiny_llama_dir),
            "--data",
            str(SST2_TRAIN),
            "--max-examples",
            "40",
            "--max-length",
            "64",
            "--batch-size",
            "4",
            "--max-steps",
            "2",
            "--probe-steps",
            "2",
            "--drop-layers",
            "1",
            "--scorer",
            "auto",
            "--heal-steps",
            "0",
            "--finetune",
            "none",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert code == 0
    m = Manifest.read(out)
    assert [p.scorer for p in m.proposals] == ["igia", "block-influence", "last-n", "ppl"]
    assert len({round(p.raw.loss, 6) for p in m.proposals}) > 1  # the choice matters
    best = min(m.proposals, key=lambda p: p.raw.loss)
    assert m.layers_dropped == best.dropped
    assert m.scorer == f"auto → {best.scorer}"
    recovered_or_pruned = m.quality.point("pruned")
    assert recovered_or_pruned.loss == pytest.approx(best.raw.loss, rel=1e-5)


def _auto_cut(model_dir, out, max_drop: float) -> int:
    return main(
        [
            "compress",
            "--model",
            str(model_dir),
            "--data",
            str(SST2_TRAIN),
            "--max-examples",
            "40",
            "--max-length",
            "64",
            "--batch-size",
            "4",
            "--scorer",
            "last-n",
            "--drop-layers",
            "auto",
            "--max-quality-drop",
            str(max_drop),
            "--heal-steps",
            "0",
            "--finetune",
            "none",
            "--out",
            str(out),
            "-q",
        ]
    )


def test_drop_layers_auto_keeps_the_largest_cut_within_the_quality_budget(tiny_llama_dir, tmp_path):
    """--drop-layers auto grows the cut one layer at a time (last-n: no probe, deterministic cuts)
    and stops at the first candidate over budget; the checkpoint is the last candidate within it."""
    assert _auto_cut(tiny_llama_dir, tmp_path / "loose", 10.0) == 0  # everything within: the deepest cut
    loose = Manifest.read(tmp_path / "loose")
    dense = loose.quality.point("dense").loss
    losses = [p.raw.loss for p in loose.proposals]
    assert [len(p.dropped) for p in loose.proposals] == [1, 2, 3, 4, 5] and loose.num_layers_after == 1

    budget = max(losses[:2]) / dense - 1 + 1e-6  # the first two cuts fit by construction
    assert _auto_cut(tiny_llama_dir, tmp_path / "tight", budget) == 0
    tight = Manifest.read(tmp_path / "tight")
    first_over = next((i for i, loss in enumerate(losses) if loss > dense * (1 + budget)), len(losses))
    assert len(tight.proposals) == min(first_over + 1, 5)
    assert [p.within_budget for p in tight.proposals] == [loss <= dense * (1 + budget) for loss in losses[: len(tight.proposals)]]
    assert tight.layers_dropped == loose.proposals[first_over - 1].dropped
    assert tight.quality.point("pruned").loss == pytest.approx(losses[first_over - 1], rel=1e-5)
