"""The CLI end to end on a tiny random Llama, and every bad input: one `error:` line, exit 2, nothing written."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from gradprune_deploy.cli import COMMANDS, build_parser, load_command, main
from gradprune_deploy.compress.config import CompressConfig
from gradprune_deploy.config_schema import build_config, read_yaml_recipe
from gradprune_deploy.errors import ConfigError
from serving.bench_config import BenchConfig
from serving.serve import ServeConfig
from tests.conftest import SHARED_DATA

SST2 = str(SHARED_DATA / "sst2")
FAST = ["--max-examples", "48", "--max-steps", "3", "--probe-steps", "2", "--batch-size", "4", "--max-length", "96", "-q"]


def test_compress_end_to_end_via_console_script(tiny_llama_dir, tmp_path):
    out = tmp_path / "pruned"
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run(
        [
            str(bin_dir / "gradprune"),
            "compress",
            "--model",
            str(tiny_llama_dir),
            "--data",
            SST2,
            "--out",
            str(out),
            "--drop-layers",
            "2",
            *FAST,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["num_layers"] == [6, 4]
    manifest = json.loads((out / "gradprune.json").read_text())
    assert manifest["num_layers_after"] == 4 and len(manifest["layer_scores"]) == 6
    assert manifest["layers_dropped"] == summary["layers_dropped"]
    assert manifest["scoring"]["probe_steps"] == 2 and manifest["merge"]["enabled"]
    assert set(manifest["merge"]["per_layer"]) <= {str(i) for i in manifest["layers_dropped"]}  # only dropped layers merged
    assert manifest["params_after"] < manifest["params_before"]
    assert (out / "layer_importance.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".pruned.tmp-*"))  # no temporary leftovers

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert model.config.num_hidden_layers == 4 and not info["missing_keys"] and not info["unexpected_keys"]

    inspect = subprocess.run([str(bin_dir / "gradprune"), "inspect", str(out)], capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0 and "6 → 4" in inspect.stdout


def test_yaml_recipe_and_flag_precedence(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tiny_llama_dir}\ndata: {SST2}\ndrop_layers: 1\nfinetune: none\nmax_examples: 32\n"
        "probe_steps: 2\nbatch_size: 4\nmax_length: 96\n"
    )
    out = tmp_path / "o"
    assert main(["compress", "--config", str(recipe), "--out", str(out), "--drop-layers", "3", "-q"]) == 0
    manifest = json.loads((out / "gradprune.json").read_text())
    assert manifest["num_layers_after"] == 3 and manifest["finetune"]["mode"] == "none"


def _bad_pickle_dir(tmp_path, tiny_llama_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return d


def _remote_code_dir(tmp_path):
    d = tmp_path / "remote"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"model_type": "my-custom-lm", "auto_map": {"AutoConfig": "x.Config"}, "num_hidden_layers": 2})
    )
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    return d


def _corrupt_dir(tmp_path, tiny_llama_dir):
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (d / "model.safetensors").write_bytes(b"garbage, not safetensors")
    return d


def _data(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# Each bad input: (model, data, extra flags) from (the tiny checkpoint, sst2, tmp_path); None keeps the default.
BAD_INPUTS = {
    "missing_model": lambda ckpt, tmp: (str(tmp / "nope"), None, []),
    "corrupt_model": lambda ckpt, tmp: (str(_corrupt_dir(tmp, ckpt)), None, []),
    "pickled": lambda ckpt, tmp: (str(_bad_pickle_dir(tmp, ckpt)), None, []),
    "remote_code": lambda ckpt, tmp: (str(_remote_code_dir(tmp)), None, []),
    "ratio_zero": lambda ckpt, tmp: (None, None, ["--drop-ratio", "0"]),
    "ratio_one": lambda ckpt, tmp: (None, None, ["--drop-ratio", "1.0"]),
    "drop_all": lambda ckpt, tmp: (None, None, ["--drop-layers", "6"]),
    "over_protected": lambda ckpt, tmp: (None, None, ["--drop-layers", "3", "--protect-first", "2", "--protect-last", "2"]),
    "empty_data": lambda ckpt, tmp: (None, _data(tmp, "empty.jsonl", ""), []),
    "malformed_data": lambda ckpt, tmp: (None, _data(tmp, "bad.jsonl", '{"prompt": "a", "completion": "b"}\n{not json\n'), []),
    "label_less": lambda ckpt, tmp: (None, _data(tmp, "nolabel.jsonl", '{"prompt": "a"}\n'), []),
    "too_long": lambda ckpt, tmp: (None, None, ["--max-length", "16"]),
    "bad_recipe_key": lambda ckpt, tmp: (None, None, ["--config", _data(tmp, "r.yaml", "drop_ratioo: 0.3\n")]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_error_nothing_written(case, tiny_llama_dir, tmp_path, capsys):
    model, data, extra = BAD_INPUTS[case](tiny_llama_dir, tmp_path)
    model, data = model or str(tiny_llama_dir), data or SST2
    out = tmp_path / "out"
    code = main(["compress", "--model", model, "--data", data, "--out", str(out), *FAST, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: "), err
    assert len(err[-1]) < 400
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_existing_output_is_refused_then_overwritten(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = [
        "compress",
        "--model",
        str(tiny_llama_dir),
        "--data",
        SST2,
        "--out",
        str(out),
        "--finetune",
        "none",
        "--drop-layers",
        "1",
        *FAST,
    ]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(args + ["--overwrite"]) == 0
    assert (out / "gradprune.json").is_file() and not (out / "keep.txt").exists()


def test_unknown_command_and_help(capsys):
    assert main(["frobnicate"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown command 'frobnicate'")
    assert main([]) == 0
    assert "compress" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_in_the_table_resolves_and_prints_help(command, capsys):
    """The command table is the CLI: each entry's config and function import, and --help prints (a bare
    `%` in a help string once crashed `compress --help`)."""
    spec = load_command(command)
    assert callable(spec.run) and spec.config is build_parser(command)[1]
    assert main([*command.split(), "--help"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"usage: gradprune {command}") and not captured.err


def test_usage_errors_are_one_line_naming_the_flag(capsys):
    assert main(["compress", "--out", "x", "--drop-layers", "two"]) == 2
    assert capsys.readouterr().err == "error: --drop-layers: expected an integer or auto, got 'two'\n"
    assert main(["serve", "ckpt", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: unrecognized arguments: --no-such-flag")


def test_yaml_booleans_are_only_true_and_false(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("overwrite: false\nplot: True\nlearning_rate: 2e-4\nsplit: on\nseed: 1_000\n")
    assert read_yaml_recipe(recipe) == {"overwrite": False, "plot": True, "learning_rate": 2e-4, "split": "on", "seed": 1000}
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    recipe.write_text('overwrite: "false"\n')
    assert main(["compress", "--out", str(out), "--config", str(recipe)]) == 2
    assert "--overwrite: expected true or false" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_python_api_shares_the_typed_validation():
    with pytest.raises(ConfigError, match=r"^--drop-layers: expected an integer or auto, got 'two'$"):
        CompressConfig(out="o", drop_layers="two")
    with pytest.raises(ConfigError, match=r"^--overwrite: expected true or false"):
        CompressConfig(out="o", overwrite="false")
    with pytest.raises(ConfigError, match=r"^--finetune: expected one of lora, full, prunedlora, none, got 'bogus'$"):
        CompressConfig(out="o", finetune="bogus")
    with pytest.raises(ConfigError, match=r"^--port: expected an integer, got 8000.5$"):
        ServeConfig("ckpt", port=8000.5)
    with pytest.raises(ConfigError, match=r"^--plot: expected true or false, got 1$"):
        BenchConfig(dense="d", pruned="p", plot=1)
    assert CompressConfig(out="o", learning_rate=1).learning_rate == 1.0  # an int where a float goes is a number


def test_words_of_text_options_reach_the_config_as_words(tmp_path):
    """`--merge-layers none` turns the merge off (the word is a value of a text option, not "unset")."""
    parser, cls = build_parser("compress")
    for words, expected in ((["--merge-layers", "none"], "none"), (["--merge-layers", "2"], "2"), ([], "1")):
        config = build_config(cls, parser.parse_args(["--out", str(tmp_path / "o"), *words]))
        assert config.merge_layers == expected
    config = build_config(cls, parser.parse_args(["--out", str(tmp_path / "o"), "--max-steps", "none"]))
    assert config.max_steps is None  # a number option's "none" still means unset


# -- command groups: --help works on anything a user can type ----------------------------------


@pytest.mark.parametrize(
    "argv",
    [["export"], ["export", "--help"], ["export", "-h"], ["export", "bogus", "--help"], ["help", "export"], ["help", "bogus"], ["--help"]],
)
def test_help_works_on_command_groups_and_anything_typed(argv, capsys):
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: gradprune") and not captured.err
    if "export" in argv:
        assert all(f"  {target}" in captured.out for target in ("hub", "onnx", "vllm"))


def test_an_unknown_group_target_is_one_line_naming_the_targets(capsys):
    assert main(["export", "bogus"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unknown export target 'bogus': choose one of "
        + ", ".join(name.split()[1] for name in COMMANDS if name.startswith("export "))
        + " (see `gradprune export --help`)"
    ]
    assert main(["help", "export", "onnx"]) == 0
    assert capsys.readouterr().out.startswith("usage: gradprune export onnx")
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("gradprune ")


# -- ranges: declared once (metadata["range"]), checked the same from the CLI, YAML and Python ---


def test_ranges_are_shared_by_cli_yaml_and_python(tmp_path, capsys):
    assert main(["serve", "ckpt", "--port", "0"]) == 2
    assert capsys.readouterr().err == "error: --port must be an integer from 1 to 65535, got 0\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("port: 70000\n")
    assert main(["serve", "ckpt", "--config", str(recipe)]) == 2
    assert capsys.readouterr().err == "error: --port must be an integer from 1 to 65535, got 70000\n"
    with pytest.raises(ConfigError, match=r"^--port must be an integer from 1 to 65535, got -1$"):
        ServeConfig(checkpoint="ckpt", port=-1)
    with pytest.raises(ConfigError, match=r"^--tolerance must be a number > 0, got inf$"):
        BenchConfig(dense="d", pruned="p", tolerance=float("inf"))
    with pytest.raises(ConfigError, match=r"^--seed must be an integer from 0 to 4294967295"):
        CompressConfig(out="x", seed=2**32)
    assert main(["serve", "--help"]) == 0
    assert "an integer from 1 to" in capsys.readouterr().out  # --help shows the range


# -- recipes: duplicate keys, alias bombs, huge values -----------------------------------------


def test_recipe_duplicate_keys_are_refused_naming_the_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora_r: 4\nseed: 1\nlora_r: 8\n")
    with pytest.raises(ConfigError, match="duplicate key 'lora_r' on line 3"):
        read_yaml_recipe(recipe)
    recipe.write_text("auto_candidates: [igia, ppl]\nx: {a: 1, a: 2}\n")  # nested mappings too
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        read_yaml_recipe(recipe)
    recipe.write_text("base: &b {lora_r: 4, seed: 1}\nrun:\n  <<: *b\n  seed: 2\n")  # a merge key's override is no duplicate
    assert read_yaml_recipe(recipe)["run"] == {"lora_r": 4, "seed": 2}


def test_an_alias_bomb_is_refused_before_it_is_built(tmp_path):
    levels = "abcdefghijkl"  # 12 levels of 9 aliases: 9**12 (282 billion) values once expanded
    text = "".join(
        f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
        for prev, name in zip([None, *levels], levels)
    )
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(text)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="alias bomb"):
        read_yaml_recipe(recipe)
    assert time.perf_counter() - started < 1.0
    recipe.write_text("[" * 3000 + "]" * 3000 + "\n")  # nesting past Python's recursion limit: one line too
    with pytest.raises(ConfigError, match="nested too deeply|not valid YAML"):
        read_yaml_recipe(recipe)


def test_an_error_about_a_huge_value_is_short(tmp_path, capsys):
    recipe = tmp_path / "big.yaml"
    recipe.write_text("lora_r: [" + ", ".join(["7"] * 9000) + "]\n" + "seed: '" + "x" * 100_000 + "'\n")
    started = time.perf_counter()
    assert main(["compress", "--out", str(tmp_path / "out"), "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - started < 5.0
    assert err.startswith("error: --lora-r: expected an integer, got list [") and "(9000 items)" in err and len(err) < 400
