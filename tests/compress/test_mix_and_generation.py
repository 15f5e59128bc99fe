"""--mix-data (general rows in the recovery, a general held-out set in the ledger) and the ledger's
generation measures, against brute force and against an independent evaluation of the written models."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gradprune_deploy.cli import main
from gradprune_deploy.compress.ledger import generation_verdict, split_slice
from gradprune_deploy.compress.mix import dense_completions, mix_rows, pick, read_mix, shuffled_together
from gradprune_deploy.data import encode_prompt, read_examples
from gradprune_deploy.evaluation.degeneration import distinct_n, repeated_ngram_rate, repeated_ngrams
from gradprune_deploy.evaluation.evaluate import EvalConfig, evaluate
from gradprune_deploy.evaluation.hf import eos_token_ids
from gradprune_deploy.manifest import GenerationQuality, Manifest, QualityPoint
from gradprune_deploy.manifest_text import quality_table
from tests.conftest import SHARED_DATA

SST2_TRAIN = SHARED_DATA / "sst2" / "train.jsonl"
FIN_TRAIN = SHARED_DATA / "fin_headlines" / "train.jsonl"


# ── degeneration measures ────────────────────────────────────────────────────────────────────
def _brute_repeats(tokens, n):
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return sum(1 for i, g in enumerate(grams) if g in grams[:i]), len(grams)


@pytest.mark.parametrize(
    "tokens",
    [[], [1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4], [5] * 9, [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 1, 2, 1, 3, 1, 2, 1, 2]],
)
def test_repeated_ngrams_against_brute_force(tokens):
    for n in (1, 2, 4):
        assert repeated_ngrams(tokens, n) == _brute_repeats(tokens, n)


def test_repeated_ngram_rate_pools_answers_and_a_loop_approaches_one():
    loop = [7, 8, 9, 10] * 12
    fluent = list(range(40))
    assert repeated_ngram_rate([fluent], 4) == 0.0
    assert repeated_ngram_rate([loop], 4) == pytest.approx(41 / 45)
    assert repeated_ngram_rate([fluent, loop], 4) == pytest.approx(41 / (37 + 45))
    assert repeated_ngram_rate([[1, 2]], 4) is None


def test_distinct_n_is_corpus_unique_over_total():
    answers = [[1, 2, 3], [1, 2, 4], []]
    grams = [(1, 2), (2, 3), (1, 2), (2, 4)]
    assert distinct_n(answers, 2) == len(set(grams)) / len(grams)
    assert distinct_n([[1]], 2) is None


def test_generation_verdict_flags_a_model_that_loops_where_the_dense_one_does_not():
    def point(stage, rate):
        return QualityPoint(stage=stage, loss=1.0, generation=GenerationQuality(rows=4, repeated_4gram_rate=rate))

    text, loops = generation_verdict([point("dense", 0.05), point("pruned", 0.9), point("recovered", 0.6)])
    assert loops and "0.05 → 0.60" in text and "--mix-data" in text
    text, loops = generation_verdict([point("dense", 0.05), point("recovered", 0.1)])
    assert not loops and "0.05 → 0.10" in text
    assert generation_verdict([QualityPoint(stage="dense", loss=1.0)]) == ("", False)
    # with --dense-reference scored, the same fine-tune without the cut is the reference (as for the loss verdict)
    text, loops = generation_verdict([point("dense", 0.05), point("dense-reference", 0.55), point("recovered", 0.6)])
    assert not loops and text == "greedy answers' repeated 4-gram rate dense-reference 0.55 → 0.60 (dense before training 0.05)"
    text, loops = generation_verdict([point("dense", 0.3), point("dense-reference", 0.1), point("recovered", 0.4)])
    assert loops and "loop where the dense-reference model's do not" in text


# ── the mix, pure ────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("task,ratio,expected", [(30, 0.25, 10), (30, 0.5, 30), (9, 0.1, 1), (100, 0.75, 300)])
def test_mix_rows_make_up_the_ratio(task, ratio, expected):
    assert mix_rows(task, ratio) == expected
    assert expected / (task + expected) == pytest.approx(ratio, abs=0.05)


def test_pick_cycles_a_small_pool_in_a_seeded_order_and_shuffle_keeps_every_row():
    pool = list("abcde")
    got = pick(pool, 12, seed=3)
    assert Counter(got) == Counter({c: 3 for c in "ab"} | {c: 2 for c in "cde"}) or sorted(Counter(got).values()) == [2, 2, 2, 3, 3]
    assert got[:5] == got[5:10] and sorted(got[:5]) == pool
    assert pick(pool, 12, seed=3) == got and pick([], 3, seed=0) == []
    task = [f"t{i}" for i in range(7)]
    rows = shuffled_together(task, got, seed=3)
    assert Counter(rows) == Counter(task + got) and rows != task + got


def test_read_mix_holds_out_a_seeded_slice_never_in_the_pool():
    rows = read_examples(FIN_TRAIN)
    mix = read_mix(str(FIN_TRAIN), max_rows=20, seed=1)
    pool, held = split_slice(len(rows), fraction=0.1, max_rows=20, seed=1)
    assert not set(pool) & set(held) and len(pool) + len(held) == len(rows) and len(held) == 20
    assert mix.validation == [rows[i] for i in held] and mix.pool == [rows[i] for i in pool]


# ── end to end on a tiny model ───────────────────────────────────────────────────────────────
def _compress(out, model_dir, *extra):
    args = ["compress", "--model", str(model_dir), "--data", str(SST2_TRAIN), "--max-examples", "40", "--validation-fraction", "0.25"]
    args += ["--max-length", "64", "--batch-size", "4", "--max-steps", "3", "--probe-steps", "2", "--drop-layers", "2"]
    return main([*args, "--ledger-generate", "3", "--ledger-new-tokens", "6", "--out", str(out), "-q", *extra])


def test_compress_with_mix_data_records_the_general_ledger_and_generation(tiny_llama_dir, tmp_path):
    out = tmp_path / "mixed"
    assert _compress(out, tiny_llama_dir, "--mix-data", str(FIN_TRAIN), "--mix-ratio", "0.5", "--validation-rows", "8") == 0
    m = Manifest.read(out)
    assert m.data.mix["rows_planned"] == mix_rows(m.data.tokenized, 0.5) and 0 < m.data.mix["rows_added"] <= m.data.mix["rows_planned"]
    assert m.data.mix["general_validation_rows"] == 8
    general = {p.stage: p for p in m.quality.general_points}
    assert set(general) == {"dense", "pruned", "recovered"} and all(p.rows == 8 for p in general.values())
    # the general ledger's recovered loss is an independent `gradprune eval` of the written checkpoint
    mix = read_mix(str(FIN_TRAIN), max_rows=8, seed=0)
    held = tmp_path / "general.jsonl"
    held.write_text("".join(json.dumps({"prompt": ex.prompt, "completion": ex.completion}) + "\n" for ex in mix.validation))
    loss = evaluate(EvalConfig(str(out), data=str(held), metric="loss", save=False))
    assert general["recovered"].loss == pytest.approx(loss["value"], rel=1e-4)
    # generation: three greedy answers per stage, recorded verbatim, the same as eval's exact metric gives
    for p in m.quality.points:
        assert p.generation.rows == 3 and p.generation.max_new_tokens == 6 and len(p.generation.examples) == 2
    exact = evaluate(EvalConfig(str(out), data=str(held), metric="exact", max_new_tokens=6, limit=3, save=False))
    assert general["recovered"].generation.exact_match == pytest.approx(exact["value"])
    text = "\n".join(quality_table(m.quality))
    assert "general held-out rows" in text and "rep-4" in text and "greedy answers to" in text


def test_mix_ratio_zero_scores_the_general_rows_and_trains_exactly_as_without_a_mix(tiny_llama_dir, tmp_path):
    """--mix-ratio 0: the no-mix recovery, weight for weight, with the general held-out rows in its ledger (the study's
    no-mix arm beside a mixed one, scored on the same general rows)."""
    plain, scored = tmp_path / "plain", tmp_path / "scored"
    assert _compress(plain, tiny_llama_dir, "--validation-rows", "8") == 0
    assert _compress(scored, tiny_llama_dir, "--mix-data", str(FIN_TRAIN), "--mix-ratio", "0", "--validation-rows", "8") == 0
    a, b = load_file(plain / "model.safetensors"), load_file(scored / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = Manifest.read(scored)
    assert m.data.mix["rows_planned"] == 0 and m.data.mix["rows_added"] == 0
    assert [p.stage for p in m.quality.general_points] == ["dense", "pruned", "recovered"]
    assert [p.loss for p in m.quality.points] == [p.loss for p in Manifest.read(plain).quality.points]


def test_dense_completions_are_the_models_finished_greedy_answers(smollm2_dir, tokenizer):
    """Self-data: each pool row's completion becomes SmolLM2's own greedy answer to its prompt; answers not
    finished within the limit are dropped (brute force: transformers' generate, one prompt at a time)."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    pool = read_examples(FIN_TRAIN, limit=4)
    limit = 24
    answered = dense_completions(model, tokenizer, pool, max_new_tokens=limit, batch_size=1)
    expected = []
    for ex in pool:
        ids = torch.tensor([encode_prompt(tokenizer, ex.prompt)])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=limit, pad_token_id=tokenizer.pad_token_id
        )[0, ids.shape[1] :].tolist()
        finished = [i for i, t in enumerate(out) if t in eos_token_ids(model, tokenizer)]
        if finished:
            expected.append((ex.prompt, tokenizer.decode(out[: finished[0]], skip_special_tokens=True).strip()))
    assert [(ex.prompt, ex.completion) for ex in answered] == expected
    assert all(not ex.choices for ex in answered)


def test_mix_dense_completions_and_no_generation(tiny_llama_dir, tmp_path):
    out = tmp_path / "self"
    code = _compress(out, tiny_llama_dir, "--mix-data", str(FIN_TRAIN), "--mix-completions", "dense", "--mix-new-tokens", "4")
    assert code == 0
    assert Manifest.read(out).data.mix["completions"] == "dense"
    out2 = tmp_path / "nogen"
    assert _compress(out2, tiny_llama_dir, "--ledger-generate", "0") == 0
    m = Manifest.read(out2)
    assert all(p.generation is None for p in m.quality.points) and m.data.mix is None and not m.quality.general_points


@pytest.mark.parametrize(
    "extra,flag",
    [
        (["--mix-data", str(FIN_TRAIN), "--mix-ratio", "1"], "--mix-ratio"),
        (["--mix-data", str(FIN_TRAIN), "--finetune", "none"], "--mix-data"),
        (["--ledger-generate", "-1"], "--ledger-generate"),
        (["--mix-data", "/nonexistent/general.jsonl"], "general.jsonl"),
    ],
)
def test_bad_mix_options_are_one_line(tiny_llama_dir, tmp_path, capsys, extra, flag):
    out = tmp_path / "bad"
    assert _compress(out, tiny_llama_dir, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and flag in err[0]
    assert not out.exists()
