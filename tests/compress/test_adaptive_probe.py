"""--probe-steps auto: Kendall τ-b and the convergence rule against brute force (scipy, ties included), the
adaptive probe inside a real Trainer against a fixed-length probe judged by hand, and the CLI / YAML / Python ways in."""

import json
import math
import random

import pytest
import torch
from scipy.stats import kendalltau

from gradprune_deploy.cli import main
from gradprune_deploy.compress.config import CompressConfig
from gradprune_deploy.compress.finetune import TrainSettings, run_probe
from gradprune_deploy.compress.igia.convergence import StabilityRule, kendall_tau_b, ranking_converged
from gradprune_deploy.compress.igia.probe import ProbeOptions
from gradprune_deploy.data import read_examples, tokenize_examples
from gradprune_deploy.errors import ConfigError
from tests.conftest import SHARED_DATA, tiny_model

SETTINGS = TrainSettings(
    batch_size=4, learning_rate=1e-3, max_steps=20, warmup_ratio=0.0, lora_dropout=0.0, lora_r=4, seed=3, sampling="sequential"
)


def _scipy_tau(x, y) -> float:
    return float(kendalltau(x, y).statistic)  # variant "b" is scipy's default


def test_kendall_tau_b_matches_scipy_with_ties():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(2, 12)
        levels = rng.choice([2, 3, 5, 100])  # few levels: many ties
        x = [float(rng.randrange(levels)) for _ in range(n)]
        y = [float(rng.randrange(levels)) for _ in range(n)]
        ours, theirs = kendall_tau_b(x, y), _scipy_tau(x, y)
        assert (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(theirs, abs=1e-12), (x, y)
    assert math.isnan(kendall_tau_b([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # a constant ranking orders nothing
    assert kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0 and kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0


def _brute_cut(scores, count, first, last):
    """The `count` lowest-scoring unprotected layers, ties to the deeper layer (selection.py's rule, written out)."""
    candidates = list(range(first, len(scores) - last))
    return set(sorted(candidates, key=lambda i: (scores[i], -i))[:count])


def _brute_converged(snapshots, rule: StabilityRule) -> bool:
    if len(snapshots) < rule.patience + 1:
        return False
    for j in range(len(snapshots) - rule.patience, len(snapshots)):
        previous, current = snapshots[j - 1], snapshots[j]
        tau = _scipy_tau(previous, current)
        if math.isnan(tau) or tau < rule.tau_min - 1e-9:  # scipy's float path can land a hair below an exact 0.8
            return False
        if rule.drop_count is not None and _brute_cut(previous, rule.drop_count, rule.protect_first, rule.protect_last) != _brute_cut(
            current, rule.drop_count, rule.protect_first, rule.protect_last
        ):
            return False
    return True


def test_ranking_converged_matches_brute_force():
    rng = random.Random(1)
    outcomes = set()
    for _ in range(400):
        n = rng.randint(4, 8)
        rule = StabilityRule(
            tau_min=rng.choice([0.5, 0.8, 1.0]),
            patience=rng.randint(1, 3),
            drop_count=rng.choice([None, 1, 2]),
            protect_first=rng.choice([0, 1]),
            protect_last=rng.choice([0, 1]),
        )
        # accumulated scores, as the probe's: small integer increments (ties) that settle or keep moving
        snapshots, total = [], [0.0] * n
        for _ in range(rng.randint(1, 7)):
            total = [t + rng.choice([0, 1, 1, 2, 5]) for t in total]
            snapshots.append(list(total))
        stop, tau = ranking_converged(snapshots, rule)
        assert stop == _brute_converged(snapshots, rule), (snapshots, rule)
        if len(snapshots) >= 2:
            expected = _scipy_tau(snapshots[-2], snapshots[-1])
            assert (math.isnan(tau) and math.isnan(expected)) or tau == pytest.approx(expected, abs=1e-12)
        else:
            assert tau is None
        outcomes.add(stop)
    assert outcomes == {True, False}  # both branches exercised


def test_rule_needs_the_cut_unchanged_and_patience():
    rule = StabilityRule(tau_min=0.5, patience=2, drop_count=1)
    steady = [[1, 2, 3, 4], [2, 4, 6, 8], [3, 6, 9, 12]]
    assert ranking_converged(steady, rule) == (True, 1.0)
    assert not ranking_converged(steady[:2], rule)[0]  # one stable pair < patience 2
    moved = [*steady[:2], [3, 2.5, 9, 12]]  # τ still 2/3 ≥ 0.5, but the lowest layer changed from 0 to 1
    stop, tau = ranking_converged(moved, rule)
    assert not stop and tau == pytest.approx(2 / 3)
    assert ranking_converged(moved, StabilityRule(tau_min=0.5, patience=2, drop_count=None))[0]  # τ alone: stable


@pytest.fixture(scope="module")
def sst2_features(tokenizer):
    return tokenize_examples(read_examples(SHARED_DATA / "sst2", limit=80), tokenizer, max_length=96)


@pytest.fixture(scope="module")
def fixed_snapshots(sst2_features, tokenizer):
    """A fixed-length probe of 12 informative steps, its scores kept after every step."""
    record, _ = run_probe(
        tiny_model("llama", seed=11),
        sst2_features,
        tokenizer,
        SETTINGS,
        probe_steps=12,
        keep_factors=False,
        snapshot_steps=tuple(range(1, 13)),
    )
    return [record.snapshots[s] for s in range(1, 13)]


def _first_stop(snapshots, rule: StabilityRule) -> int:
    """Brute force: the first step ≥ the floor where the rule holds on the snapshots so far, else the cap."""
    for steps in range(rule.min_steps, rule.max_steps + 1):
        if _brute_converged(snapshots[:steps], rule):
            return steps
    return rule.max_steps


@pytest.mark.parametrize(
    "rule",
    [
        StabilityRule(tau_min=0.6, patience=2, min_steps=3, max_steps=12, drop_count=2),  # converges on this model
        StabilityRule(tau_min=-1.0, patience=2, min_steps=5, max_steps=12, drop_count=None),  # met at step 3: the floor holds it to 5
        StabilityRule(tau_min=1.0, patience=11, min_steps=2, max_steps=6, drop_count=2),  # never: stops at the cap
    ],
)
def test_adaptive_probe_stops_where_the_rule_says(sst2_features, tokenizer, fixed_snapshots, rule):
    expected = _first_stop(fixed_snapshots, rule)
    record, stats = run_probe(
        tiny_model("llama", seed=11),
        sst2_features,
        tokenizer,
        SETTINGS,
        probe_steps=rule.max_steps,
        options=ProbeOptions(until_stable=rule),
    )
    adaptive = stats["adaptive"]
    assert stats["probe_steps"] == adaptive["steps_used"] == expected
    assert adaptive["stopped"] == ("converged" if _brute_converged(fixed_snapshots[:expected], rule) else "cap")
    assert torch.allclose(record.scores(), torch.tensor(fixed_snapshots[expected - 1], dtype=torch.float64), rtol=1e-6)
    assert [s for s, _ in adaptive["tau_trace"]] == list(range(1, expected + 1))
    for (step, tau), brute in zip(adaptive["tau_trace"][1:], fixed_snapshots[1:expected]):
        assert tau == pytest.approx(_scipy_tau(fixed_snapshots[step - 2], brute), rel=1e-6)
    assert adaptive["rule"]["cut_checked"] == (rule.drop_count is not None) and adaptive["rule"]["tau_min"] == rule.tau_min
    if rule.min_steps == 5:
        assert adaptive["rule_met_at"] == 3 and expected == 5 and adaptive["stopped"] == "converged"
    if rule.tau_min == 0.6:
        assert adaptive["stopped"] == "converged" and expected < rule.max_steps  # the case this parameter set is for


def test_config_ways_in(capsys):
    c = CompressConfig(out="x", probe_steps="auto", probe_tau=0.8)
    assert (c.probe_max_steps, c.probe_tau, c.probe_patience, c.adaptive_probe) == (64, 0.8, 3, True)
    assert not CompressConfig(out="x", probe_steps=5).adaptive_probe
    for bad, fix in [
        (dict(probe_patience=2), "add --probe-steps auto"),
        (dict(probe_steps="auto", probe_max_steps=4), "--probe-max-steps 4 is below --probe-min-steps 8"),
        (dict(probe_steps="auto", probe_tau=1.5), "--probe-tau"),
        (dict(probe_steps="often"), "--probe-steps: expected an integer or auto"),
        (dict(probe_steps="auto", scorer="block-influence", merge_layers="none"), "configures the IGIA probe"),
        (dict(probe_clip_grad_norm=-1.0), "--probe-clip-grad-norm"),
        (dict(probe_clip_grad_norm=0.0), "--probe-clip-grad-norm"),
    ]:
        with pytest.raises(ConfigError, match=fix):
            CompressConfig(out="x", **bad)
    assert main(["compress", "--out", "x", "--probe-tau", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --probe-tau configures the adaptive probe")


def test_yaml_recipe_records_the_adaptive_probe(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tiny_llama_dir}\ndata: {SHARED_DATA / 'sst2'}\ndrop_layers: 2\nfinetune: none\nmax_examples: 64\n"
        "probe_steps: auto\nprobe_min_steps: 2\nprobe_max_steps: 6\nprobe_tau: 0.5\nprobe_patience: 1\n"
        "batch_size: 4\nmax_length: 96\nledger: false\nplot: false\n"
    )
    out = tmp_path / "o"
    assert main(["compress", "--config", str(recipe), "--out", str(out), "-q"]) == 0
    manifest = json.loads((out / "gradprune.json").read_text())
    adaptive = manifest["scoring"]["adaptive"]
    assert manifest["config"]["probe_steps"] == "auto" and 2 <= adaptive["steps_used"] <= 6
    assert manifest["scoring"]["probe_steps"] == adaptive["steps_used"] == len(adaptive["tau_trace"])
    assert adaptive["stopped"] in ("converged", "cap") and adaptive["rule"]["drop_count"] == 2 and adaptive["rule"]["cut_checked"]
