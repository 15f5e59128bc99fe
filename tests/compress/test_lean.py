"""compress without whole-model copies: a judged cut swaps the layer list (copying only the merge target)
and puts the model back bit-identical; the teacher is the one second model (in a lower dtype or on the
CPU when asked); --compensate captures the dense outputs before the cut instead of keeping a dense copy;
--dtype auto, sharded saves, and per-stage time and peak memory in the manifest."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM

from gradprune_deploy.cli import main
from gradprune_deploy.compress import pipeline
from gradprune_deploy.compress.config import CompressConfig
from gradprune_deploy.compress.cut import apply_cut, cut_applied, judge_cut
from gradprune_deploy.compress.distill import frozen_copy, teacher_forward
from gradprune_deploy.compress.finetune import attach_lora, recovery_finetune, train_settings
from gradprune_deploy.compress.gradmap.compensate import capture_dense, compensate_cut
from gradprune_deploy.compress.gradmap.compensation import target_positions
from gradprune_deploy.compress.ledger import measure
from gradprune_deploy.compress.scoring import Scores, batches_of
from gradprune_deploy.compress.surgery import find_layer_stack
from gradprune_deploy.data import read_examples, tokenize_examples
from gradprune_deploy.errors import ConfigError
from gradprune_deploy.loading import load_model_and_tokenizer, resolve_dtype
from gradprune_deploy.manifest import Manifest
from gradprune_deploy.utils import peak_rss_mb
from tests.conftest import SHARED_DATA, tiny_model

SST2_TRAIN = SHARED_DATA / "sst2" / "train.jsonl"
DROPPED = [2, 3]  # merge K=1: layer 3 (the higher score) → layer 1
SCORES = torch.tensor([9.0, 9.0, 0.1, 0.5, 9.0, 9.0], dtype=torch.float64)


@pytest.fixture(scope="module")
def rows(tokenizer):
    examples = read_examples(SST2_TRAIN, limit=24)
    return tokenize_examples(examples[:16], tokenizer, max_length=64), examples[16:]


def _igia_scores(model) -> Scores:
    """Scores with an IGIA record (random F per linear of every layer) so the cut merges."""
    gen = torch.Generator().manual_seed(0)
    layers = find_layer_stack(model)[1]
    igia = {
        i: {name: torch.rand(m.weight.shape, generator=gen) for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        for i, layer in enumerate(layers)
    }
    return Scores("igia", SCORES.clone(), record=types.SimpleNamespace(igia_for_layer=igia.__getitem__))


def _state(model) -> dict:
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "layer_idx": [layer.self_attn.layer_idx for layer in find_layer_stack(model)[1]],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
    }


def _assert_untouched(model, before: dict, stack) -> None:
    after = model.state_dict()
    assert after.keys() == before["weights"].keys()
    assert all(torch.equal(after[k], v) for k, v in before["weights"].items())
    assert find_layer_stack(model)[1] is stack and model.config.num_hidden_layers == len(stack)
    assert model.config.to_dict() == before["config"]
    assert [layer.self_attn.layer_idx for layer in stack] == before["layer_idx"]
    assert [p.requires_grad for p in model.parameters()] == before["requires_grad"]
    assert [m.training for m in model.modules()] == before["training"]
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and not hasattr(model, "peft_config")


def _judge_on_a_copy(model, scores, config, settings, features, validation, tokenizer):
    """The brute force (the old path): the cut on a deep copy of the whole model, the heal merged."""
    candidate = copy.deepcopy(model)
    apply_cut(candidate, scores, DROPPED, config.merge_count, config.keep_top_p)
    raw = measure(candidate, tokenizer, validation, stage="cut", batch_size=config.batch_size)
    if not config.heal_steps:
        return raw, None
    candidate, _ = recovery_finetune(candidate, features, tokenizer, settings, mode="lora", steps=config.heal_steps, quiet=True)
    return raw, measure(candidate, tokenizer, validation, stage="healed", batch_size=config.batch_size)


@pytest.mark.parametrize("arch,heal_steps", [("llama", 0), ("gemma3", 0), ("llama", 2)])
def test_judging_a_cut_leaves_the_model_bit_identical_and_matches_a_copy(arch, heal_steps, rows, tokenizer, tmp_path):
    features, validation = rows
    model = tiny_model(arch, num_hidden_layers=6, seed=3)
    scores, stack = _igia_scores(model), find_layer_stack(model)[1]
    config = CompressConfig(out=str(tmp_path / "x"), drop_layers="2", heal_steps=heal_steps, batch_size=4, max_length=64)
    settings = train_settings(config)
    before = _state(model)

    judged = dict(config=config, settings=settings, features=features, validation=validation, tokenizer=tokenizer)
    proposal = judge_cut(model, scores, DROPPED, **judged)
    _assert_untouched(model, before, stack)

    raw, healed = _judge_on_a_copy(model, scores, config, settings, features, validation, tokenizer)
    assert proposal.raw.loss == raw.loss  # the same weights, the same forward passes
    if heal_steps:
        assert proposal.healed.loss == pytest.approx(healed.loss, rel=1e-5)  # LoRA unmerged vs merged: rounding only
        assert proposal.healed.loss != proposal.raw.loss
    _assert_untouched(model, before, stack)


def test_a_failure_inside_a_judged_cut_still_restores_the_model(tokenizer):
    model = tiny_model("llama", num_hidden_layers=6, seed=4)
    stack, before = find_layer_stack(model)[1], _state(model)
    settings = train_settings(CompressConfig(out="x"))
    with pytest.raises(RuntimeError, match="heal failed"), cut_applied(model, _igia_scores(model), DROPPED, 1, 0.2) as merge:
        assert merge.enabled and merge.targets == {"3": 1}
        assert len(find_layer_stack(model)[1]) == 4 and model.config.num_hidden_layers == 4
        assert find_layer_stack(model)[1][1] is not stack[1]  # the merge target is the one copied layer
        assert find_layer_stack(model)[1][0] is stack[0]
        attach_lora(model, settings)
        raise RuntimeError("heal failed")
    _assert_untouched(model, before, stack)


def test_frozen_copy_in_bfloat16_on_the_cpu(tokenizer):
    model = tiny_model("llama", seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = frozen_copy(model, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teacher.parameters())
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight  # the tie survives
    assert teacher.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers are moved, never cast
    assert all(torch.equal(model.state_dict()[k], v) and v.dtype == torch.float32 for k, v in before.items())
    batch = batches_of(tokenize_examples(read_examples(SST2_TRAIN, limit=4), tokenizer, max_length=64), tokenizer, 4)[0]
    logits = teacher_forward(teacher, batch)
    assert logits.dtype == torch.bfloat16
    with torch.no_grad():
        dense = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits.float(), dense, atol=0.05, rtol=0.05)
    assert frozen_copy(model) is not model  # "same"/"same": a plain frozen deep copy


def test_compensation_from_outputs_captured_before_the_cut_equals_a_dense_copy(tokenizer):
    """The pipeline's order (capture, then merge + drop in place, then compensate) against the old one
    (a dense copy kept beside the pruned model): the same record and the same weights, bit for bit."""
    dense = tiny_model("llama", num_hidden_layers=6, seed=6)
    dense.config.mlp_bias = False
    batches = batches_of(tokenize_examples(read_examples(SST2_TRAIN, limit=8), tokenizer, max_length=48), tokenizer, 4)
    kept = [i for i in range(6) if i not in DROPPED]
    scores = _igia_scores(dense)

    old_dense, old_pruned = copy.deepcopy(dense), copy.deepcopy(dense)
    apply_cut(old_pruned, scores, DROPPED, 1, 0.2)
    old = compensate_cut(old_pruned, old_dense, batches, kept=kept, num_layers=6, layers=2)

    captured = capture_dense(dense, batches, target_positions(kept, 6))
    apply_cut(dense, scores, DROPPED, 1, 0.2)
    new = compensate_cut(dense, captured, batches, kept=kept, num_layers=6, layers=2)
    assert new == old
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), old_pruned.state_dict().values()))


def test_resolve_dtype(tmp_path):
    assert resolve_dtype("float16", tmp_path) == "float16"
    assert resolve_dtype("auto", None) == "float32"  # a GGUF
    assert resolve_dtype("auto", tmp_path) == "float32"  # no config.json
    for raw, expected in (({"dtype": "bfloat16"}, "bfloat16"), ({"torch_dtype": "float16"}, "float16"), ({"dtype": "float64"}, "float32")):
        (tmp_path / "config.json").write_text(json.dumps(raw))
        assert resolve_dtype("auto", tmp_path) == expected


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_shard_size="5"), "--max-shard-size"),
        (dict(max_shard_size="1.5GB"), "--max-shard-size"),
        (dict(teacher_dtype="bfloat16"), "--teacher-dtype and --teacher-device configure the distillation teacher: add --distill"),
        (dict(teacher_device="cpu"), "add --distill"),
        (dict(teacher_device="cuda"), "--teacher-device"),
        (dict(dtype="float64"), "--dtype"),
    ],
)
def test_bad_memory_options(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CompressConfig(out="x", **kwargs)


STAGES = ("load", "probe", "score", "merge", "surgery", "finetune", "save", "total")


def test_bfloat16_auto_dtype_sharded_save_and_per_stage_peaks(tmp_path, tokenizer):
    """A bf16 checkpoint with --dtype auto stays bf16 through probe, merge, recovery and save; a tiny
    --max-shard-size writes several shards and an index that transformers reloads; the manifest has the
    time and the peak memory of every stage."""
    source = tmp_path / "bf16"
    tiny_model("llama", seed=7).to(torch.bfloat16).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "out"
    argv = ["compress", "--model", str(source), "--data", str(SST2_TRAIN), "--max-examples", "24", "--max-length", "64"]
    argv += ["--batch-size", "4", "--max-steps", "2", "--probe-steps", "2", "--drop-layers", "2", "--dtype", "auto"]
    argv += ["--max-shard-size", "1MB", "--no-ledger", "--no-plot", "--out", str(out), "-q"]
    assert main(argv) == 0

    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 4 and all(p.dtype == torch.bfloat16 for p in reloaded.parameters())
    ours, _ = load_model_and_tokenizer(out, dtype="bfloat16")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), reloaded.state_dict().values()))

    m = Manifest.read(out)
    assert m.merge.enabled and m.finetune.steps == 2
    for stage in STAGES:
        assert m.timings[f"{stage}_seconds"] > 0 and m.timings[f"{stage}_peak_mb"] > 0, stage
    assert m.timings["total_peak_mb"] >= max(v for k, v in m.timings.items() if k.endswith("_peak_mb"))


def test_distill_with_a_bfloat16_teacher_on_the_cpu(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["compress", "--model", str(tiny_llama_dir), "--data", str(SST2_TRAIN), "--max-examples", "24", "--max-length", "64"]
    argv += ["--batch-size", "4", "--max-steps", "2", "--probe-steps", "2", "--drop-layers", "2", "--distill"]
    argv += ["--teacher-dtype", "bfloat16", "--teacher-device", "cpu", "--no-ledger", "--no-plot", "--out", str(out), "-q"]
    assert main(argv) == 0
    m = Manifest.read(out)
    assert m.finetune.objective == "distill"
    assert m.finetune.distill["teacher_dtype"] == "bfloat16" and m.finetune.distill["teacher_device"] == "cpu"
    assert m.timings["teacher_peak_mb"] > 0


def test_stage_peaks_nest_and_fall_back_to_the_process_peak(monkeypatch, caplog):
    timings: dict = {}
    timed = pipeline._Timed(timings)
    with timed("outer"):
        with timed("inner"):
            block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
            del block
        with timed("after"):
            pass
    assert timings["outer_peak_mb"] >= timings["inner_peak_mb"] >= timings["after_peak_mb"] + 32  # the inner reset kept the outer peak
    assert timed.run_peak_mb() >= timings["outer_peak_mb"]

    monkeypatch.setattr(pipeline, "reset_peak_rss", lambda: False)
    fallback = pipeline._Timed({})
    with caplog.at_level("WARNING"), fallback("stage"):
        pass
    assert "clear_refs is not writable" in caplog.text
    assert fallback.timings["stage_peak_mb"] == pytest.approx(peak_rss_mb(), abs=1.0)  # VmHWM as it is, never reset
