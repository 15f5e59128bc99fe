"""verify.verify_checkpoint reads the whole checkpoint: sizes against the headers, every tensor finite,
the tokenizer loadable. Real tiny checkpoints saved by transformers, damaged the way copies and
diverged runs damage them; plus the bundled SmolLM2, which must pass (no false alarm)."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from gradprune_deploy.errors import ModelLoadError
from gradprune_deploy.safetensors_header import promised_file_size, read_safetensors_header
from gradprune_deploy.verify import TOKENIZER_FILES, count_non_finite, first_non_finite, verify_checkpoint
from tests.conftest import tiny_model

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@pytest.fixture
def ckpt(tmp_path, tiny_llama_dir):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, out)
    return out


def _save(tmp_path, tokenizer, *, dtype=torch.float32, **save_kwargs):
    out = tmp_path / f"ckpt-{str(dtype).split('.')[-1]}"
    tiny_model("llama").to(dtype).save_pretrained(out, **save_kwargs)
    tokenizer.save_pretrained(out)
    return out


def _poison(path, name, value=float("nan"), index=(0, 0)):
    """Write `value` into one entry of tensor `name` in the safetensors file `path` (its dtype kept)."""
    tensors = load_file(path)
    tensors[name] = tensors[name].clone()
    tensors[name][index] = value
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_good_checkpoint_passes_and_every_tensor_is_read(ckpt):
    verified = verify_checkpoint(ckpt)
    header = read_safetensors_header(ckpt / "model.safetensors")
    assert verified.tensors == len(header) > 0
    assert verified.bytes == (ckpt / "model.safetensors").stat().st_size == promised_file_size(ckpt / "model.safetensors")
    assert verified.path == ckpt.resolve() and verified.info.config["num_hidden_layers"] == 6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_pass_and_their_nan_is_found(tmp_path, tokenizer, dtype):
    out = _save(tmp_path, tokenizer, dtype=dtype)
    assert verify_checkpoint(out).tensors > 0
    _poison(out / "model.safetensors", "model.layers.3.mlp.down_proj.weight", float("inf"), (5, 7))
    with pytest.raises(ModelLoadError, match=r"tensor model\.layers\.3\.mlp\.down_proj\.weight in model\.safetensors holds 1 non-finite"):
        verify_checkpoint(out)


def test_truncated_file_is_refused_before_any_tensor_is_read(ckpt):
    weights = ckpt / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(
        ModelLoadError, match=rf"model\.safetensors is truncated \({size // 2:,} bytes on disk, its header promises {size:,}\)"
    ):
        verify_checkpoint(ckpt, flag="CHECKPOINT")
    with pytest.raises(ModelLoadError, match=r"^CHECKPOINT .*re-run `gradprune compress`"):
        verify_checkpoint(ckpt, flag="CHECKPOINT")


def test_a_file_longer_than_its_header_is_refused(ckpt):
    with open(ckpt / "model.safetensors", "ab") as fh:
        fh.write(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="model.safetensors is longer than its header says"):
        verify_checkpoint(ckpt)


def test_a_nan_anywhere_names_the_tensor_and_the_fix(ckpt):
    _poison(ckpt / "model.safetensors", "model.layers.5.self_attn.k_proj.weight", index=(31, 63))
    with pytest.raises(
        ModelLoadError, match=r"k_proj\.weight in model\.safetensors holds 1 non-finite values \(NaN/inf\).*--learning-rate"
    ):
        verify_checkpoint(ckpt)


def test_sharded_checkpoint_every_shard_is_read_and_checked(tmp_path, tokenizer):
    out = _save(tmp_path, tokenizer, max_shard_size="1MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    verified = verify_checkpoint(out)
    assert verified.tensors == len(index["weight_map"]) and len(verified.info.weight_files) == len(shards)

    last = out / shards[-1]
    name = next(n for n, f in index["weight_map"].items() if f == shards[-1] and n.endswith("weight") and "norm" not in n)
    _poison(last, name)
    with pytest.raises(ModelLoadError, match=rf"tensor {name} in {shards[-1]} holds 1 non-finite"):
        verify_checkpoint(out)
    with open(last, "r+b") as fh:
        fh.truncate(last.stat().st_size - 1)
    with pytest.raises(ModelLoadError, match=rf"{shards[-1]} is truncated"):
        verify_checkpoint(out)
    last.unlink()
    with pytest.raises(ModelLoadError, match=rf"shard\(s\) {shards[-1]} listed in model.safetensors.index.json are missing"):
        verify_checkpoint(out)


def test_a_checkpoint_without_a_tokenizer_is_refused_naming_the_files(ckpt):
    for path in ckpt.iterdir():
        if path.name.startswith("tokenizer") or path.name in ("chat_template.jinja", "special_tokens_map.json"):
            path.unlink()
    with pytest.raises(ModelLoadError, match=r"has no tokenizer \(none of tokenizer\.json, .*copy the tokenizer files from the base model"):
        verify_checkpoint(ckpt)
    assert "tokenizer.json" in TOKENIZER_FILES


def test_a_tokenizer_that_does_not_load_is_refused(ckpt):
    (ckpt / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')  # JSON, not a tokenizer
    with pytest.raises(ModelLoadError, match=r"the tokenizer does not load \(.*\): copy the tokenizer files from the base model"):
        verify_checkpoint(ckpt)


def test_header_level_damage_is_still_refused(ckpt):
    """verify_checkpoint runs the header checks first (inspect_checkpoint, check_weights_cover_model)."""
    tensors = load_file(ckpt / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".layers.2." not in k}, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing layer\(s\) \[2\]"):
        verify_checkpoint(ckpt)


@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float8_e5m2])
def test_count_non_finite_matches_brute_force(dtype):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(257, 33, generator=generator, dtype=torch.float64)
    assert count_non_finite(values.to(dtype)) == 0
    for k, bad in enumerate((float("nan"), float("inf"), -float("inf"))):
        values.view(-1)[k * 1000 + 17] = bad
    expected = int((~torch.isfinite(values)).sum())  # brute force, in float64
    assert count_non_finite(values.to(dtype)) == expected == 3


def test_count_non_finite_large_finite_values_are_not_a_false_alarm():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # a sum in their own dtype overflows, a float64 sum does not
        assert count_non_finite(torch.full((4096,), torch.finfo(dtype).max, dtype=dtype)) == 0
    f64 = torch.full((4,), torch.finfo(torch.float64).max, dtype=torch.float64)  # a float64 sum overflows: counted entry by entry
    assert count_non_finite(f64) == 0
    assert count_non_finite(torch.tensor([1, 2, 3])) == 0 and count_non_finite(torch.tensor([True])) == 0


def test_first_non_finite_on_a_model():
    model = tiny_model("llama", num_hidden_layers=2)
    assert first_non_finite(model.state_dict().items()) is None
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[:2] = float("nan")
    assert first_non_finite(model.state_dict().items()) == ("model.layers.1.mlp.up_proj.weight", 2 * 64)


def test_the_bundled_smollm2_passes_and_how_long_it_takes(smollm2_dir, capsys):
    start = time.perf_counter()
    verified = verify_checkpoint(smollm2_dir)
    seconds = time.perf_counter() - start
    assert verified.tensors == len(read_safetensors_header(smollm2_dir / "model.safetensors"))
    assert verified.bytes > 500e6  # float32, 134.5M parameters
    with capsys.disabled():
        print(f"\nverify_checkpoint(SmolLM2-135M float32, {verified.bytes / 1e6:.0f} MB): {seconds:.2f} s", flush=True)
