"""`--recipe paper`: the paper's setting in one switch; options the user gives win, the same from CLI, YAML and Python."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gradprune_deploy.cli import build_parser, main
from gradprune_deploy.compress.config import CompressConfig
from gradprune_deploy.compress.recipes import RECIPES, recipe_values
from gradprune_deploy.config_schema import build_config
from gradprune_deploy.errors import ConfigError
from tests.conftest import SHARED_DATA

# What the paper and its official code set (ANCHORS.md), written out here rather than read from RECIPES.
PAPER = {
    "scorer": "igia",
    "merge_layers": "3",
    "keep_top_p": 0.2,
    "merge_criterion": "igia",
    "igia_reduce": "squared",
    "probe_clip_grad_norm": None,
    "probe_steps": None,
    "probe_fraction": 0.01,
    "probe_min_steps": 1,
    "finetune": "lora",
    "lora_r": 8,
    "lora_alpha": 32,
    "learning_rate": 1e-4,
}


def _values(config: CompressConfig) -> dict:
    return {name: getattr(config, name) for name in PAPER}


def _cli(tmp_path, *words: str) -> CompressConfig:
    parser, cls = build_parser("compress")
    namespace = parser.parse_args(["--out", str(tmp_path / "o"), *words])
    return build_config(cls, namespace, namespace._recipe)


def test_the_paper_recipe_sets_exactly_the_papers_values():
    assert recipe_values("paper", finetune="lora") == PAPER
    config = CompressConfig(out="o", recipe="paper")
    assert _values(config) == PAPER and config.recipe == "paper"
    # every other option keeps its default: the recipe touches only its own fields
    plain = CompressConfig(out="o")
    changed = {f.name for f in dataclasses.fields(CompressConfig) if getattr(config, f.name) != getattr(plain, f.name)}
    assert changed == {"recipe"} | {name for name in PAPER if PAPER[name] != getattr(plain, name)}
    assert changed >= {"recipe", "merge_layers", "probe_min_steps", "lora_alpha", "learning_rate"}
    # the defaults are not the recipe (they follow the measured comparison, docs/results.md)
    assert (plain.merge_layers, plain.lora_alpha, plain.probe_min_steps) == ("1", 16, 8)


def test_an_option_given_wins_over_the_recipe_even_at_its_default_value(tmp_path):
    python = CompressConfig(out="o", recipe="paper", lora_alpha=16, merge_layers="none", probe_min_steps=8)
    assert (python.lora_alpha, python.merge_layers, python.probe_min_steps) == (16, "none", 8)
    assert python.lora_r == 8 and python.keep_top_p == 0.2 and python.learning_rate == 1e-4  # the rest from the recipe
    # full fine-tuning given: the official code's full rate, 1e-5
    assert CompressConfig(out="o", recipe="paper", finetune="full").learning_rate == 1e-5
    assert CompressConfig(out="o", recipe="paper", learning_rate=3e-4).learning_rate == 3e-4
    # positional arguments count as given too (the first field is --out)
    assert CompressConfig("o", recipe="paper", lora_r=8)._given_options == {"out", "recipe", "lora_r"}


def test_cli_yaml_and_python_agree(tmp_path):
    python = CompressConfig(out=str(tmp_path / "o"), recipe="paper", lora_alpha=16)
    cli = _cli(tmp_path, "--recipe", "paper", "--lora-alpha", "16")
    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text("recipe: paper\nlora_alpha: 16\n")
    from_yaml = _cli(tmp_path, "--config", str(yaml_file))
    assert dataclasses.asdict(python) == dataclasses.asdict(cli) == dataclasses.asdict(from_yaml)
    assert cli.lora_alpha == 16 and cli.merge_layers == "3"
    # a flag beats the YAML file's recipe value, and a YAML value beats the recipe
    yaml_file.write_text("recipe: paper\nmerge_layers: '1'\n")
    assert _cli(tmp_path, "--config", str(yaml_file)).merge_layers == "1"
    assert _cli(tmp_path, "--config", str(yaml_file), "--merge-layers", "2").merge_layers == "2"
    plain = _cli(tmp_path)
    assert plain.recipe is None and plain.merge_layers == "1" and plain.lora_alpha == 16


def test_bad_recipes_are_one_error_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"^--recipe: expected one of paper, got 'papers'$"):
        CompressConfig(out="o", recipe="papers")
    with pytest.raises(ConfigError, match=r"^--recipe: expected one of paper, got 'x'"):
        _cli(tmp_path, "--recipe", "x")
    with pytest.raises(ConfigError, match=r"^--recipe paper is GradPruner's setting .* --scorer block-influence .*: drop --scorer or"):
        CompressConfig(out="o", recipe="paper", scorer="block-influence")
    assert CompressConfig(out="o", recipe="paper", scorer="auto").merge_layers == "3"  # auto's igia proposal merges
    assert set(RECIPES) == {"paper"}


def test_the_recipe_is_recorded_in_gradprune_json_and_drives_the_run(tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    words = ["--model", str(tiny_llama_dir), "--data", str(SHARED_DATA / "sst2"), "--out", str(out), "--drop-layers", "2"]
    fast = ["--max-examples", "48", "--max-steps", "3", "--batch-size", "4", "--max-length", "96", "-q"]
    assert main(["compress", *words, *fast, "--recipe", "paper"]) == 0
    manifest = json.loads((out / "gradprune.json").read_text())
    assert manifest["config"]["recipe"] == "paper"
    assert {name: manifest["config"][name] for name in PAPER} == PAPER
    # K = 3 on a 2-layer cut merges both (min(K, n)); the probe is 1% of 3 steps, floored at 1 informative step
    assert sorted(manifest["merge"]["targets"]) == sorted(str(i) for i in manifest["layers_dropped"])
    assert manifest["scoring"]["probe_steps"] == 1
