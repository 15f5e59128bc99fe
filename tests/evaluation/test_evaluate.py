"""`gradprune eval`: metrics against brute-force references on a tiny random model, result files,
the CLI contract, bad input, and (slow/vllm) SmolLM2 and vLLM agreement."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from gradprune_deploy.cli import main
from gradprune_deploy.data import Example, encode_example, encode_prompt, read_examples
from gradprune_deploy.errors import ConfigError, DataError, ModelLoadError, OutputExistsError
from gradprune_deploy.evaluation import evaluate as evaluate_module
from gradprune_deploy.evaluation.evaluate import EvalConfig, evaluate, evaluate_model, result_filename
from gradprune_deploy.evaluation.hf import eos_token_ids, greedy_generate
from gradprune_deploy.evaluation.metrics import exact_match, extract_final_answer, mean_token_loss
from gradprune_deploy.evaluation.vllm import vllm_endpoint, vllm_greedy_generate
from gradprune_deploy.loading import load_model_and_tokenizer
from tests.conftest import SHARED_DATA, tiny_model

ROWS = [  # unequal prompt lengths and choice lengths (1-3 tokens), so padding is exercised
    {"id": "a", "prompt": "Is the sky blue?", "completion": "yes", "choices": ["yes", "no", "maybe"]},
    {
        "id": "b",
        "prompt": "Review: a long, meandering and ultimately pointless film about nothing much.",
        "completion": "negative",
        "choices": ["positive", "negative"],
    },
    {"id": "c", "prompt": "2+2?", "completion": "no", "choices": ["yes", "no", "maybe"]},
    {
        "id": "d",
        "prompt": "Headline: shares surge after record quarterly profit",
        "completion": "positive",
        "choices": ["positive", "negative"],
    },
    {
        "id": "e",
        "prompt": "Q: does fenofibrate reduce sleep apnoea indices in a four-week trial?",
        "completion": "maybe",
        "choices": ["yes", "no", "maybe"],
    },
]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama whose greedy generations are visible, prompt-dependent text.

    A plain random tiny model with tied embeddings just repeats its last prompt token ("\n"),
    which would make generation tests pass vacuously; shrinking the embeddings and growing the
    residual branches makes the layers, not the embedding echo, decide the next token.
    """
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.05)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(3.0)
            layer.self_attn.o_proj.weight.mul_(3.0)
    out = tmp_path_factory.mktemp("lively-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(lively_dir):
    return load_model_and_tokenizer(lively_dir)


@pytest.fixture
def ckpt(lively_dir, tmp_path):
    """A private copy of the tiny checkpoint: eval writes its result file into it."""
    return Path(shutil.copytree(lively_dir, tmp_path / "ckpt"))


@pytest.fixture
def toy_data(tmp_path) -> Path:
    folder = tmp_path / "toy"
    write_jsonl(folder / "test.jsonl", ROWS)
    return folder


def unpadded_logprob(model, ids, n_prompt) -> tuple[float, int]:
    """Brute force: one unpadded sequence, full logits, sum of the completion tokens' log-probs."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(n_prompt, len(ids))), len(ids) - n_prompt


# ------------------------------------------------------------------ choice


@pytest.mark.parametrize("length_normalize", [False, True])
def test_choice_scores_match_unpadded_brute_force(tiny, length_normalize):
    model, tokenizer = tiny
    examples = [Example(r["prompt"], r["completion"], tuple(r["choices"]), r["id"]) for r in ROWS]
    summary, rows = evaluate_model(model, tokenizer, examples, metric="choice", batch_size=3, length_normalize=length_normalize)
    for ex, row in zip(examples, rows):
        for choice in ex.choices:
            total, n = unpadded_logprob(model, *encode_example(tokenizer, Example(ex.prompt, choice)))
            expected = total / n if length_normalize else total
            assert row["scores"][choice] == pytest.approx(expected, abs=2e-4), (ex.id, choice)
        assert row["pred"] == max(ex.choices, key=lambda c: row["scores"][c])
    hits = sum(r["pred"] == r["gold"] for r in rows)
    assert summary["value"] == pytest.approx(hits / len(rows))
    assert sum(n for preds in summary["confusion"].values() for n in preds.values()) == len(rows)
    for row in rows:
        assert summary["confusion"][row["gold"]][row["pred"]] >= 1


def test_choice_does_not_depend_on_batch_size(tiny):
    model, tokenizer = tiny
    examples = [Example(r["prompt"], r["completion"], tuple(r["choices"]), r["id"]) for r in ROWS]
    _, one = evaluate_model(model, tokenizer, examples, metric="choice", batch_size=1)
    _, many = evaluate_model(model, tokenizer, examples, metric="choice", batch_size=5)
    for a, b in zip(one, many):
        assert a["pred"] == b["pred"]
        for choice in a["scores"]:
            assert a["scores"][choice] == pytest.approx(b["scores"][choice], abs=2e-4)


def test_evaluate_writes_the_result_into_the_checkpoint(ckpt, toy_data):
    result = evaluate(EvalConfig(str(ckpt), data=str(toy_data), limit=4, batch_size=2))
    path = ckpt / "eval_toy_test_choice.json"
    assert result["saved_to"] == str(path) and path.is_file()
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert result["metric"] == "choice" and result["n"] == 4 and result["backend"] == "hf"
    assert result["model"] == str(ckpt.resolve()) and result["split"] == "test" and result["seconds"] >= 0
    assert 0.0 <= result["value"] <= 1.0 and set(result["confusion"]) <= {"yes", "no", "negative", "positive", "maybe"}


def test_evaluate_honours_out_dir_and_no_save(ckpt, toy_data, tmp_path):
    out = tmp_path / "results"
    result = evaluate(EvalConfig(str(ckpt), data=str(toy_data / "test.jsonl"), metric="loss", limit=2, out_dir=str(out)))
    assert Path(result["saved_to"]) == out / "eval_toy_test_loss.json"
    assert not list(ckpt.glob("eval_*.json"))
    assert evaluate(EvalConfig(str(ckpt), data=str(toy_data), metric="loss", limit=2, save=False))["saved_to"] is None
    assert not list(ckpt.glob("eval_*.json"))


# ------------------------------------------------------------------ loss


def test_loss_is_the_token_weighted_mean_nll(tiny):
    model, tokenizer = tiny
    examples = [Example(r["prompt"], r["completion"], (), r["id"]) for r in ROWS]
    summary, _ = evaluate_model(model, tokenizer, examples, metric="loss", batch_size=2)
    pairs = [unpadded_logprob(model, *encode_example(tokenizer, ex)) for ex in examples]
    expected = -sum(s for s, _ in pairs) / sum(n for _, n in pairs)
    assert summary["value"] == pytest.approx(expected, rel=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert summary["tokens"] == sum(n for _, n in pairs)


def test_mean_token_loss_weights_tokens():
    loss, ppl = mean_token_loss([2.0, 6.0], [1, 3])
    assert loss == pytest.approx(2.0) and ppl == pytest.approx(math.exp(2.0))


# ------------------------------------------------------------------ exact


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in ROWS]
    eos = eos_token_ids(model, tokenizer)
    batched = greedy_generate(model, prompts, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id, eos_ids=eos)
    assert len({tuple(t) for t in batched}) >= 2, "generations should depend on the prompt"
    for prompt, tokens in zip(prompts, batched):
        with torch.no_grad():
            alone = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )[0, len(prompt) :].tolist()
        cut = [t for t in alone[: alone.index(eos[0])]] if eos[0] in alone else alone
        assert tokens == cut


def test_exact_counts_a_row_whose_reference_is_the_models_own_output(tiny):
    model, tokenizer = tiny
    first = Example(ROWS[0]["prompt"], "placeholder", (), "a")
    _, rows = evaluate_model(model, tokenizer, [first], metric="exact", max_new_tokens=4)
    own = rows[0]["prediction"]
    assert own.strip(), "the tiny model should produce some visible text"
    examples = [Example(first.prompt, f"  {own.strip()}  ", (), "a"), Example(ROWS[1]["prompt"], "certainly not this", (), "b")]
    summary, rows = evaluate_model(model, tokenizer, examples, metric="exact", max_new_tokens=4, batch_size=2)
    assert [r["match"] for r in rows] == [True, False]
    assert summary["value"] == 0.5 and summary["max_new_tokens"] == 4


def test_default_max_new_tokens_covers_the_longest_reference(tiny):
    model, tokenizer = tiny
    examples = [Example("q", "one two three four five six seven", (), "x")]
    summary, _ = evaluate_model(model, tokenizer, examples, metric="exact")
    n_ref = len(tokenizer("one two three four five six seven", add_special_tokens=False)["input_ids"])
    assert summary["max_new_tokens"] == n_ref + 16


@pytest.mark.parametrize(
    ("prediction", "reference", "kwargs", "expected"),
    [
        ("  positive\n", "positive", {}, True),
        ("Positive", "positive", {}, False),
        ("Positive", "positive", {"case_fold": True}, True),
        ("She pays 3 + 15 = 18.\n#### 18", "Janet ... 16 - 3 - 4 = 9 eggs\n#### 18", {}, True),
        ("so the total is #### 1,234.", "#### 1234", {}, True),
        ("#### 17", "#### 18", {}, False),
        ("the answer is 18", "#### 18", {}, False),  # no final answer in the prediction
        ("#### 18", "#### 18", {"final_answer": "never"}, True),
        ("x #### 18", "#### 18", {"final_answer": "never"}, False),
        ("#### yes", "yes", {"final_answer": "always"}, False),  # reference without ####: whole strings
    ],
)
def test_exact_match_normalisation(prediction, reference, kwargs, expected):
    assert exact_match(prediction, reference, **kwargs) is expected


def test_extract_final_answer_takes_the_last_marker():
    assert extract_final_answer("#### 3\nmore\n#### $4,500.\nsomething else") == "4500"
    assert extract_final_answer("no marker") is None


# ------------------------------------------------------------------ vLLM client (protocol only, fake server)


class _FakeOpenAI(BaseHTTPRequestHandler):
    """Answers /v1/models and /v1/completions by greedy-generating with the tiny model from the
    token ids it is sent, and records the requests."""

    model = tokenizer = None
    requests: list = []

    def log_message(self, *args):
        pass

    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"data": [{"id": "tiny"}]})

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(payload)
        outs = greedy_generate(
            self.model, payload["prompt"], max_new_tokens=payload["max_tokens"], pad_token_id=self.tokenizer.pad_token_id, eos_ids=[]
        )
        # reversed order and a trailing eos: the client must sort by index and cut at eos
        choices = [{"index": i, "text": "", "token_ids": out + [self.tokenizer.eos_token_id, 5]} for i, out in enumerate(outs)]
        self._send({"choices": choices[::-1]})


def test_vllm_backend_sends_the_hf_prompt_ids_and_agrees_with_hf(ckpt, tiny, tmp_path):
    model, tokenizer = tiny
    # references = the model's own greedy outputs, so a backend that generates the same tokens scores 1.0
    examples = [Example(r["prompt"], "x", (), r["id"]) for r in ROWS]
    _, own = evaluate_model(model, tokenizer, examples, metric="exact", max_new_tokens=3)
    assert all(r["prediction"].strip() for r in own)
    data = write_jsonl(
        tmp_path / "own" / "test.jsonl",
        [{"id": r["id"], "prompt": r["prompt"], "completion": o["prediction"].strip()} for r, o in zip(ROWS, own)],
    )
    _FakeOpenAI.model, _FakeOpenAI.tokenizer, _FakeOpenAI.requests = model, tokenizer, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        via_vllm = evaluate(
            EvalConfig(
                str(ckpt), data=str(data), metric="exact", backend="vllm", server_url=url, batch_size=2, max_new_tokens=3, save=False
            )
        )
    finally:
        server.shutdown()
        server.server_close()
    via_hf = evaluate(EvalConfig(str(ckpt), data=str(data), metric="exact", batch_size=2, max_new_tokens=3, save=False))
    sent = [ids for request in _FakeOpenAI.requests for ids in request["prompt"]]
    assert sorted(sent) == sorted(encode_prompt(tokenizer, r["prompt"]) for r in ROWS)
    assert len(_FakeOpenAI.requests) == 3  # batch size 2 over 5 rows
    assert all(r["temperature"] == 0 and r["max_tokens"] == 3 and r["model"] == "tiny" for r in _FakeOpenAI.requests)
    assert via_hf["value"] == 1.0 and via_vllm["value"] == 1.0
    assert via_vllm["backend"] == "vllm" and via_vllm["n"] == len(ROWS)


# ------------------------------------------------------------------ bad input and the CLI


def test_missing_checkpoint_raises_the_loaders_error(toy_data, tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        evaluate(EvalConfig(str(tmp_path / "nope"), data=str(toy_data)))


def test_choice_without_choices_names_the_other_metrics(ckpt, tmp_path):
    data = write_jsonl(tmp_path / "free.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"--metric exact or --metric loss"):
        evaluate(EvalConfig(str(ckpt), data=str(data)))


def test_choice_with_a_completion_outside_its_choices_is_refused(ckpt, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "yes", "choices": ["no", "maybe"]}])
    with pytest.raises(DataError, match="not one of its choices"):
        evaluate(EvalConfig(str(ckpt), data=str(data)))


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"limit": 0}, "--limit"),
        ({"limit": -3}, "--limit"),
        ({"batch_size": 0}, "--batch-size"),
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"backend": "vllm", "metric": "choice"}, "--backend vllm"),
        ({"data": None}, "--data"),
        ({"server_url": "http://x"}, "--server-url"),
    ],
)
def test_bad_options_are_config_errors_naming_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        EvalConfig("ckpt", **{"data": "d", **kwargs})


def test_result_filename():
    assert result_filename(str(SHARED_DATA / "sst2"), "test", "choice") == "eval_sst2_test_choice.json"
    assert result_filename(str(SHARED_DATA / "sst2" / "test.jsonl"), "test", "exact") == "eval_sst2_test_exact.json"
    assert result_filename("my data/headlines.csv", "train", "loss") == "eval_headlines_train_loss.json"
    assert result_filename("bundled:gsm8k", "test", "exact") == "eval_gsm8k_test_exact.json"


def test_cli_prints_one_json_line(ckpt, toy_data, capsys):
    assert main(["eval", str(ckpt), "--data", str(toy_data), "--limit", "3", "--batch-size", "2", "--length-normalize"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metric"] == "choice" and result["n"] == 3 and result["length_normalize"] is True
    assert (ckpt / "eval_toy_test_choice.json").is_file()


@pytest.mark.parametrize("argv", [["--limit", "0"], ["--batch-size", "-1"], ["--metric", "choice", "--backend", "vllm"]])
def test_cli_bad_options_exit_2_with_one_error_line(ckpt, toy_data, capsys, argv):
    assert main(["eval", str(ckpt), "--data", str(toy_data), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_cli_missing_checkpoint_exits_2(toy_data, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing"), "--data", str(toy_data)]) == 2
    assert capsys.readouterr().err.startswith("error: model ")


# ------------------------------------------------------------------ real model


@pytest.mark.slow
def test_smollm2_choice_scores_are_batch_invariant(smollm2_dir):
    model, tokenizer = load_model_and_tokenizer(smollm2_dir)
    examples = read_examples(SHARED_DATA / "sst2", split="test", limit=16)
    s1, one = evaluate_model(model, tokenizer, examples, metric="choice", batch_size=1)
    s8, eight = evaluate_model(model, tokenizer, examples, metric="choice", batch_size=8)
    assert [r["pred"] for r in one] == [r["pred"] for r in eight]
    for a, b in zip(one, eight):
        for c in a["scores"]:
            assert a["scores"][c] == pytest.approx(b["scores"][c], abs=1e-3)
    assert s1["value"] == s8["value"]
    # real log-likelihoods of one-word labels after a chat prompt: finite, negative, not absurd
    assert all(-40 < s < 0 for r in one for s in r["scores"].values())


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_exact_agrees_with_transformers(smollm2_dir):
    """Greedy generations through vLLM's server vs transformers, float32 in both, on 8 sst2 rows.

    Tolerance: at least 7 of 8 rows generate identical token ids (a near-tie between two tokens
    may flip under different kernels), and exact-match accuracy differs by at most 1/8.
    """
    pytest.importorskip("vllm")
    pytest.importorskip("gradprune_deploy.runtime.vllm_server")
    model, tokenizer = load_model_and_tokenizer(smollm2_dir, dtype="float32")
    examples = read_examples(SHARED_DATA / "sst2", split="test", limit=8)
    hf, hf_rows = evaluate_model(model, tokenizer, examples, metric="exact", batch_size=4, max_new_tokens=8)
    eos = eos_token_ids(model, tokenizer)
    with vllm_endpoint(str(smollm2_dir), server_url=None, dtype="float32", max_model_len=2048) as (url, served):
        vl, vl_rows = evaluate_model(
            None,
            tokenizer,
            examples,
            metric="exact",
            batch_size=4,
            max_new_tokens=8,
            generate=lambda p, n: vllm_greedy_generate(url, served, p, max_new_tokens=n, eos_ids=eos),
        )
    same = sum(a["tokens"] == b["tokens"] for a, b in zip(hf_rows, vl_rows))
    assert same >= 7, [(a["prediction"], b["prediction"]) for a, b in zip(hf_rows, vl_rows)]
    assert abs(hf["value"] - vl["value"]) <= 1 / 8 + 1e-9


# ------------------------------------------------------------------ inputs longer than the context


@pytest.fixture(scope="module")
def short_context(tokenizer):
    """A tiny model that attends over 64 positions only (context.py's rule cuts longer rows)."""
    model = tiny_model("llama", num_hidden_layers=2)
    model.config.max_position_embeddings = 64
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


HUGE_PROMPT = "the quick brown fox jumps over the lazy dog " * 4000  # ~36k tokens: unbounded attention would need ~100 GB


def test_a_prompt_longer_than_the_context_is_cut_from_the_left_keeping_the_completion(short_context):
    model, tokenizer = short_context
    long_row, short_row = Example(HUGE_PROMPT + "Answer:", "yes", ("yes", "no"), "long"), Example("Answer:", "no", ("yes", "no"), "short")
    started = time.perf_counter()
    loss, _ = evaluate_model(model, tokenizer, [long_row, short_row], metric="loss", batch_size=2)
    choice, rows = evaluate_model(model, tokenizer, [long_row, short_row], metric="choice", batch_size=2)
    assert time.perf_counter() - started < 60  # bounded by the context, not by the prompt
    assert loss["truncated_rows"] == 1 and choice["truncated_rows"] == 1
    for ex, row in zip([long_row, short_row], rows):  # brute force: the last 64 tokens, unpadded, the completion kept whole
        for choice_text in ex.choices:
            ids, n_prompt = encode_example(tokenizer, Example(ex.prompt, choice_text))
            cut = max(0, len(ids) - 64)
            expected, _ = unpadded_logprob(model, ids[cut:], n_prompt - cut)
            assert row["scores"][choice_text] == pytest.approx(expected, abs=1e-4)


def test_generation_prompts_are_cut_to_leave_room_for_the_new_tokens(short_context):
    model, tokenizer = short_context
    seen = []

    def generate(prompts, max_new):
        seen.extend(len(p) + max_new for p in prompts)
        return [[] for _ in prompts]

    rows = [Example(HUGE_PROMPT, "yes", (), "long"), Example("Hi", "yes", (), "short")]
    summary, _ = evaluate_model(model, tokenizer, rows, metric="exact", max_new_tokens=8, generate=generate)
    assert summary["truncated_rows"] == 1 and max(seen) == 64  # the long prompt fills exactly the context
    with pytest.raises(ConfigError, match="--max-new-tokens 64 leaves no room"):
        evaluate_model(model, tokenizer, rows, metric="exact", max_new_tokens=64, generate=generate)
    summary, _ = evaluate_model(model, tokenizer, rows, metric="exact", generate=generate)  # the default never fills it
    assert summary["max_new_tokens"] <= 32


def test_a_completion_that_alone_fills_the_context_is_refused_naming_the_row(short_context):
    model, tokenizer = short_context
    with pytest.raises(DataError, match="row 'big': its completion alone is"):
        evaluate_model(model, tokenizer, [Example("Q", "yes " * 100, (), "big")], metric="loss")


# ------------------------------------------------------------------ no clobbering an earlier result


def test_an_earlier_result_is_replaced_only_with_overwrite_and_refused_before_any_work(ckpt, toy_data, monkeypatch):
    first = evaluate(EvalConfig(str(ckpt), data=str(toy_data), metric="loss", limit=2))
    path = Path(first["saved_to"])
    before = path.read_bytes()

    def no_work(*args, **kwargs):
        raise AssertionError("evaluated although the result would be refused")

    monkeypatch.setattr(evaluate_module, "_run_backend", no_work)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        evaluate(EvalConfig(str(ckpt), data=str(toy_data), metric="loss", limit=1))
    assert path.read_bytes() == before  # the earlier (larger) run is kept
    monkeypatch.undo()
    again = evaluate(EvalConfig(str(ckpt), data=str(toy_data), metric="loss", limit=1, overwrite=True))
    assert again["n"] == 1 and json.loads(path.read_text())["n"] == 1
