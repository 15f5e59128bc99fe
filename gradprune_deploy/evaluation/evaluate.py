"""`gradprune eval`: score a checkpoint on prompt/completion data and record the result.

Metrics (prompts are formatted exactly as in fine-tuning: data.encode_prompt/encode_example,
i.e. the chat template when the tokenizer has one):
- `choice`: each row's `choices` are scored as the completion of its prompt by log-likelihood
  (sum of the completion tokens' log-probs — the tokens fine-tuning puts labels on, so with a
  chat template the end-of-turn tokens count too — or their mean with --length-normalize); the
  prediction is the argmax (first choice wins a tie); accuracy = prediction == completion. All
  choices of `--batch-size` rows go through one padded forward pass.
- `exact`: greedy generation (`--max-new-tokens`, default: the longest reference in tokens + 16)
  and exact match after normalisation: strip, optional --case-fold; GSM8K-style references
  (`#### 18`) compare only the final answer after `####` (--final-answer auto|always|never,
  see metrics.py). `--backend vllm` generates through vLLM's OpenAI server instead (vllm.py).
- `loss`: mean negative log-likelihood per completion token over the set, and perplexity.

The result is a dict (the CLI prints it as one JSON line) and, when the checkpoint is a local
directory or --out-dir is given, `eval_<data>_<split>_<metric>.json` in that directory (the name comes
from layout.eval_report_name; <data> is data.data_name of --data).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoTokenizer

from ..bundled import DEFAULT_DATA, DEFAULT_MODEL
from ..config_schema import validate_fields
from ..data import Example, data_name, encode_example, encode_prompt, read_examples
from ..errors import ConfigError, DataError, OutputExistsError
from ..layout import eval_report_name
from ..loading import ModelSource, load_model_and_tokenizer, resolve_source
from ..utils import atomic_write_text, check_output_dir, tqdm
from .context import checkpoint_context, fit_example, fit_prompt, model_context
from .hf import completion_logprobs, eos_token_ids, greedy_generate
from .metrics import accuracy, argmax, choice_scores, confusion_counts, exact_match, mean_token_loss, uses_final_answer
from .vllm import vllm_endpoint, vllm_greedy_generate

logger = logging.getLogger(__name__)

GENERATION_MARGIN_TOKENS = 16


@dataclass
class EvalConfig:
    """Evaluate a checkpoint by choice log-likelihood, exact match of greedy generations, or loss."""

    checkpoint: str = field(metadata={"help": f"checkpoint directory, .gguf file, cached Hub id or {DEFAULT_MODEL}", "positional": True})
    data: str | None = field(
        default=None, metadata={"help": f"prompt/completion data: a .jsonl/.csv file, a folder of splits, or {DEFAULT_DATA}"}
    )
    split: str = field(default="test", metadata={"help": "split to read when --data is a folder or a dataset"})
    metric: Literal["choice", "exact", "loss"] = field(
        default="choice",
        metadata={
            "help": "choice: argmax log-likelihood over each row's choices; exact: greedy generation + exact match; "
            "loss: completion loss and perplexity"
        },
    )
    batch_size: int = field(default=8, metadata={"help": "rows per forward pass / generation batch / vLLM request", "range": (1, None)})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N rows", "range": (1, None)})
    length_normalize: bool = field(default=False, metadata={"help": "choice: mean log-prob per token instead of the sum"})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "exact: tokens to generate (default: longest reference + 16)", "range": (1, None)}
    )
    backend: Literal["hf", "vllm"] = field(
        default="hf", metadata={"help": "hf: transformers in-process; vllm: vLLM OpenAI server (--metric exact only)"}
    )
    case_fold: bool = field(default=False, metadata={"help": "exact: compare case-insensitively"})
    final_answer: Literal["auto", "always", "never"] = field(
        default="auto", metadata={"help": "exact: compare only the answer after '####' (auto: when the reference has one)"}
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "weights dtype: float32, bfloat16 or float16"}
    )
    out_dir: str | None = field(default=None, metadata={"help": "where to write the result JSON (default: the checkpoint directory)"})
    save: bool = field(default=True, metadata={"help": "write eval_<data>_<split>_<metric>.json"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier eval_<data>_<split>_<metric>.json result"})
    server_url: str | None = field(default=None, metadata={"help": "vllm backend: use this running server instead of starting one"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code from the checkpoint"})
    allow_pickle: bool = field(default=False, metadata={"help": "allow pickled (.bin) weights"})

    def __post_init__(self):
        validate_fields(self)  # types, choices and booleans, as for the CLI and a YAML recipe
        if not self.data:
            raise ConfigError(f"--data is required: a .jsonl/.csv file, a folder with {{split}}.jsonl, or {DEFAULT_DATA}")
        if self.backend == "vllm" and self.metric != "exact":
            raise ConfigError(
                f"--backend vllm generates text, so it serves --metric exact only; use --backend hf for --metric {self.metric}"
            )
        if self.server_url and self.backend != "vllm":
            raise ConfigError("--server-url is for --backend vllm")


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Load `config.checkpoint`, evaluate it on `config.data` and return (and save) the summary dict."""
    if config.save and config.out_dir:  # an unwritable --out-dir, or one inside the data, fails before any work
        check_output_dir(config.out_dir, overwrite=True, flag="--out-dir", inputs={"--data": config.data})
    source = resolve_source(config.checkpoint, allow_pickle=config.allow_pickle)  # a missing checkpoint fails first
    check_result_free(config, source)
    examples = read_examples(config.data, split=config.split, limit=config.limit)
    check_examples(examples, config.metric)
    summary, load_seconds, seconds = _run_backend(source, examples, config)
    summary.update(
        n=len(examples),
        data=str(config.data),
        split=config.split,
        limit=config.limit,
        backend=config.backend,
        dtype=config.dtype,
        model=str(source.path),
        model_source=str(config.checkpoint),
        seconds=round(seconds, 3),
        load_seconds=round(load_seconds, 3),
    )
    summary["saved_to"] = _save(summary, config, source)
    logger.info("%s on %s (%s, n=%d): %.4f", config.metric, config.data, config.split, len(examples), summary["value"])
    return summary


def _run_backend(source: ModelSource, examples: Sequence[Example], config: EvalConfig) -> tuple[dict[str, Any], float, float]:
    """(summary, seconds loading the model, seconds evaluating) on the configured backend."""
    started = time.perf_counter()
    if config.backend == "vllm":
        summary, _ = _evaluate_vllm(source, examples, config)
        return summary, 0.0, time.perf_counter() - started
    model, tokenizer = _load_hf(config)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    summary, _ = evaluate_model(
        model,
        tokenizer,
        examples,
        metric=config.metric,
        batch_size=config.batch_size,
        length_normalize=config.length_normalize,
        max_new_tokens=config.max_new_tokens,
        case_fold=config.case_fold,
        final_answer=config.final_answer,
    )
    return summary, load_seconds, time.perf_counter() - started


def _save(summary: dict[str, Any], config: EvalConfig, source: ModelSource) -> str | None:
    """Write the result file when asked and there is somewhere to write it; its path, or None."""
    if not config.save:
        return None
    target = _result_dir(config.checkpoint, config.out_dir, source)
    if target is None:
        logger.info("not saving the result: %s is not a checkpoint directory; pass --out-dir to keep it", config.checkpoint)
        return None
    return str(write_result(summary, target, data=config.data, split=config.split, metric=config.metric))


def check_result_free(config: EvalConfig, source: ModelSource) -> None:
    """The no-clobber rule, before any work: an earlier result of the same data, split and metric is
    replaced only with --overwrite (a model card would otherwise report whichever run came last)."""
    target = _result_dir(config.checkpoint, config.out_dir, source) if config.save else None
    path = target / result_filename(config.data, config.split, config.metric) if target is not None else None
    if path is not None and path.exists() and not config.overwrite:
        raise OutputExistsError(
            f"{path} already exists (an earlier eval of this data, split and metric): pass --overwrite to replace it, "
            "--out-dir to write elsewhere, or --no-save"
        )


def check_examples(examples: Sequence, metric: str) -> None:
    """One-line DataError for data a metric cannot use."""
    if metric != "choice":
        return
    for ex in examples:
        if not ex.choices:
            raise DataError(
                f"row {ex.id!r} has no `choices`: --metric choice needs a list of choices in every row; "
                "use --metric exact or --metric loss for free-form completions"
            )
        if ex.completion not in ex.choices:
            raise DataError(
                f"row {ex.id!r}: its completion {ex.completion!r} is not one of its choices {list(ex.choices)}: "
                "fix the data, or use --metric exact or --metric loss"
            )


def evaluate_model(
    model,
    tokenizer,
    examples: Sequence,
    *,
    metric: str,
    batch_size: int = 8,
    length_normalize: bool = False,
    max_new_tokens: int | None = None,
    case_fold: bool = False,
    final_answer: str = "auto",
    generate: Callable[[list[list[int]], int], list[list[int]]] | None = None,
    context: int | None = None,
) -> tuple[dict[str, Any], list[dict]]:
    """Evaluate a loaded model; returns (summary with `metric` and `value`, per-row records).

    `generate(prompts_ids, max_new_tokens)` replaces in-process greedy generation (the vLLM
    backend passes one); `model` may then be None. Rows longer than `context` (default: the
    model's max_position_embeddings) are cut from the left by context.py's rule.
    """
    check_examples(examples, metric)
    if context is None and model is not None:
        context = model_context(model.config)
    if metric == "choice":
        return _eval_choice(model, tokenizer, examples, batch_size=batch_size, length_normalize=length_normalize, context=context)
    if metric == "loss":
        return _eval_loss(model, tokenizer, examples, batch_size=batch_size, context=context)
    if metric == "exact":
        if generate is None:
            generate = _hf_generator(model, tokenizer)
        return _eval_exact(
            tokenizer,
            examples,
            generate,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            case_fold=case_fold,
            final_answer=final_answer,
            context=context,
        )
    raise ConfigError(f"--metric {metric!r}: choose choice, exact or loss")


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches, longest first: less padding, and memory peaks show up at once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _truncated_rows(examples, encoded_lengths: list[int], context: int | None) -> int:
    """Rows cut by the context rule (logged once; recorded in the summary)."""
    cut = sum(n > context for n in encoded_lengths) if context else 0
    if cut:
        logger.warning("%d of %d rows are longer than the model's context (%d tokens): cut from the left", cut, len(examples), context)
    return cut


def _eval_choice(model, tokenizer, examples, *, batch_size: int, length_normalize: bool, context: int | None = None):
    raw = [[encode_example(tokenizer, Example(ex.prompt, choice, id=ex.id)) for choice in ex.choices] for ex in examples]
    truncated = _truncated_rows(examples, [max(len(ids) for ids, _ in e) for e in raw], context)
    encoded = [[fit_example(ids, n, context, row=ex.id) for ids, n in e] for ex, e in zip(examples, raw)]
    results: list[list[tuple[float, int]]] = [[] for _ in examples]
    with tqdm(total=len(examples), desc="eval choice", unit="row") as bar:
        for batch in _length_sorted_batches([max(len(ids) for ids, _ in e) for e in encoded], batch_size):
            flat = completion_logprobs(model, [item for i in batch for item in encoded[i]], pad_token_id=tokenizer.pad_token_id)
            for i in batch:
                results[i], flat = flat[: len(encoded[i])], flat[len(encoded[i]) :]
            bar.update(len(batch))
    rows = []
    for ex, res in zip(examples, results):
        scores = choice_scores([s for s, _ in res], [n for _, n in res], length_normalize=length_normalize)
        pred = ex.choices[argmax(scores)]
        rows.append({"id": ex.id, "gold": ex.completion, "pred": pred, "scores": dict(zip(ex.choices, scores))})
    value = accuracy([r["pred"] == r["gold"] for r in rows])
    summary = {
        "metric": "choice",
        "value": value,
        "accuracy": value,
        "length_normalize": length_normalize,
        "confusion": confusion_counts([r["gold"] for r in rows], [r["pred"] for r in rows]),
        "truncated_rows": truncated,
    }
    return summary, rows


def _eval_loss(model, tokenizer, examples, *, batch_size: int, context: int | None = None):
    raw = [encode_example(tokenizer, ex) for ex in examples]
    truncated = _truncated_rows(examples, [len(ids) for ids, _ in raw], context)
    encoded = [fit_example(ids, n, context, row=ex.id) for ex, (ids, n) in zip(examples, raw)]
    results: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    with tqdm(total=len(examples), desc="eval loss", unit="row") as bar:
        for batch in _length_sorted_batches([len(ids) for ids, _ in encoded], batch_size):
            for i, res in zip(batch, completion_logprobs(model, [encoded[i] for i in batch], pad_token_id=tokenizer.pad_token_id)):
                results[i] = res
            bar.update(len(batch))
    rows = [{"id": ex.id, "nll": -s, "tokens": n} for ex, (s, n) in zip(examples, results)]
    loss, ppl = mean_token_loss([r["nll"] for r in rows], [r["tokens"] for r in rows])
    summary = {"metric": "loss", "value": loss, "loss": loss, "perplexity": ppl, "tokens": sum(r["tokens"] for r in rows)}
    return {**summary, "truncated_rows": truncated}, rows


def _hf_generator(model, tokenizer) -> Callable[[list[list[int]], int], list[list[int]]]:
    eos = eos_token_ids(model, tokenizer)
    return lambda prompts, max_new: greedy_generate(
        model, prompts, max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id, eos_ids=eos
    )


def default_max_new_tokens(tokenizer, examples) -> int:
    return max(len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) for ex in examples) + GENERATION_MARGIN_TOKENS


def _eval_exact(
    tokenizer, examples, generate, *, batch_size: int, max_new_tokens: int | None, case_fold: bool, final_answer: str, context=None
):
    max_new = max_new_tokens or default_max_new_tokens(tokenizer, examples)
    if max_new_tokens is None and context:
        max_new = min(max_new, max(1, context // 2))  # the default never leaves a prompt no room
    raw = [encode_prompt(tokenizer, ex.prompt) for ex in examples]
    truncated = _truncated_rows(examples, [len(p) + max_new for p in raw], context)
    prompts = [fit_prompt(p, context, max_new_tokens=max_new) for p in raw]
    outputs: list[list[int]] = [[] for _ in examples]
    with tqdm(total=len(examples), desc="eval exact", unit="row") as bar:
        for batch in _length_sorted_batches([len(p) for p in prompts], batch_size):
            for i, tokens in zip(batch, generate([prompts[i] for i in batch], max_new)):
                outputs[i] = tokens
            bar.update(len(batch))
    rows = []
    for ex, tokens in zip(examples, outputs):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        rows.append(
            {
                "id": ex.id,
                "reference": ex.completion,
                "prediction": text,
                "tokens": tokens,
                "match": exact_match(text, ex.completion, case_fold=case_fold, final_answer=final_answer),
            }
        )
    value = accuracy([r["match"] for r in rows])
    summary = {
        "metric": "exact",
        "value": value,
        "accuracy": value,
        "max_new_tokens": max_new,
        "case_fold": case_fold,
        "final_answer": final_answer,
        "final_answer_rows": sum(uses_final_answer(ex.completion, final_answer) for ex in examples),
        "truncated_rows": truncated,
    }
    return summary, rows


def _load_hf(config: EvalConfig):
    model, tokenizer = load_model_and_tokenizer(
        config.checkpoint, dtype=config.dtype, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle
    )
    if torch.cuda.is_available():
        model.to("cuda")
    return model.eval(), tokenizer


def _evaluate_vllm(source: ModelSource, examples: Sequence[Example], config: EvalConfig):
    if source.gguf_file:
        raise ConfigError(
            "--backend vllm needs a safetensors checkpoint directory, not a .gguf file: save the model with "
            f"save_pretrained first ({DEFAULT_MODEL} is already converted)"
        )
    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    context = checkpoint_context(source.path)
    max_new = config.max_new_tokens or default_max_new_tokens(tokenizer, examples)
    if config.max_new_tokens is None and context:
        max_new = min(max_new, max(1, context // 2))  # as the hf backend: the default leaves a prompt room
    longest_prompt = max(len(encode_prompt(tokenizer, ex.prompt)) for ex in examples)
    eos = [i for i in {tokenizer.eos_token_id, *_generation_eos(source.path)} if i is not None]
    max_model_len = max(2048, longest_prompt + max_new)
    max_model_len = min(max_model_len, context) if context else max_model_len  # longer prompts are cut to the context
    with vllm_endpoint(str(source.path), server_url=config.server_url, dtype=config.dtype, max_model_len=max_model_len) as (
        base_url,
        served,
    ):
        generate = lambda prompts, n: vllm_greedy_generate(base_url, served, prompts, max_new_tokens=n, eos_ids=eos)  # noqa: E731
        return evaluate_model(
            None,
            tokenizer,
            examples,
            metric="exact",
            batch_size=config.batch_size,
            max_new_tokens=max_new,
            case_fold=config.case_fold,
            final_answer=config.final_answer,
            generate=generate,
            context=context,
        )


def _generation_eos(model_dir: Path) -> list[int]:
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def result_filename(data: str, split: str, metric: str) -> str:
    """eval_<data>_<split>_<metric>.json: the data's short name (data.data_name), the name layout.py gives a report."""
    return eval_report_name(data_name(data), split, metric)


def _result_dir(checkpoint: str, out_dir: str | None, source: ModelSource) -> Path | None:
    if out_dir:
        return Path(out_dir).expanduser()
    path = Path(str(checkpoint)).expanduser()
    return path if path.is_dir() and source.gguf_file is None else None


def write_result(summary: dict[str, Any], directory: Path, *, data: str, split: str, metric: str) -> Path:
    """Write the summary as JSON (atomically: a reader never sees half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / result_filename(data, split, metric)
    atomic_write_text(path, json.dumps({**summary, "saved_to": str(path)}, indent=2, default=str) + "\n")
    logger.info("wrote %s", path)
    return path
