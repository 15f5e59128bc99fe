"""The quality ledger: held-out rows, and the model's quality on them at every stage of compress.

Validation rows come from the data's own `validation` (or `test`) split when it has one, else a
seeded slice of the training rows (`fraction`, at most `max_rows`) that is removed from training.
Each stage (dense before training, pruned after drop + merge, recovered, an optional dense
reference) is scored with the same functions as `gradprune eval`: mean completion-token loss,
and choice accuracy when every row has `choices`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data import Example, read_examples
from ..errors import DataError
from ..evaluation.degeneration import distinct_n, repeated_ngram_rate
from ..evaluation.evaluate import evaluate_model
from ..manifest import GenerationQuality, QualityLedger, QualityPoint

logger = logging.getLogger(__name__)

VALIDATION_SPLITS = ("validation", "valid", "dev", "test")
# A recovered model is "far worse" than its reference beyond either threshold (the ledger warns).
WARN_RELATIVE_LOSS_INCREASE = 0.25
WARN_ACCURACY_DROP_POINTS = 5.0
EXAMPLE_ANSWERS = 2  # answers recorded verbatim per stage
# The recovered model's answers "loop" when their repeated 4-gram rate exceeds the dense model's by this much
# (pooled over the --ledger-generate answers). Dense SmolLM2-135M-Instruct measured 0.00-0.04 on 16 prompts each of
# GSM8K, sst2 and fin_headlines (48 new tokens); a 4-token phrase looped over 48 tokens measures 0.91.
WARN_REPEAT_INCREASE = 0.2


@dataclass
class HeldOut:
    train: list[Example]
    validation: list[Example]
    description: str


def hold_out(
    train: list[Example], *, data: str, split: str, validation_split: str | None, fraction: float, max_rows: int, seed: int
) -> HeldOut:
    """Validation rows never trained on: the data's own split when it has one, else a seeded slice."""
    single_file = Path(data).expanduser().is_file()  # a file has no other splits: slice it
    candidates = [validation_split] if validation_split else [] if single_file else [s for s in VALIDATION_SPLITS if s != split]
    for name in candidates:
        try:
            rows = read_examples(data, split=name)
        except DataError:
            if validation_split:
                raise
            continue
        train_ids = {(ex.prompt, ex.completion) for ex in train}
        rows = [ex for ex in rows if (ex.prompt, ex.completion) not in train_ids][:max_rows]
        if rows:
            return HeldOut(train, rows, f"{data} split {name!r}, first {len(rows)} rows")
    rows, held = split_slice(len(train), fraction=fraction, max_rows=max_rows, seed=seed)
    if not held:
        raise DataError(f"{data}: {len(train)} training rows are too few to hold out validation rows; give more rows or --no-ledger")
    return HeldOut(
        [train[i] for i in rows],
        [train[i] for i in held],
        f"seeded slice (seed {seed}) of {len(held)} of the {len(train)} training rows, removed from training",
    )


def split_slice(n: int, *, fraction: float, max_rows: int, seed: int) -> tuple[list[int], list[int]]:
    """Pure: (train indices, held-out indices) of n rows; round(fraction·n) rows (≤ max_rows) held out,
    at least one row left for training."""
    k = min(max_rows, max(1, round(fraction * n)), n - 1)
    if k < 1:
        return list(range(n)), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:k])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def measure(
    model, tokenizer, rows: Sequence[Example], *, stage: str, batch_size: int = 8, generate_rows: int = 0, max_new_tokens: int = 48
) -> QualityPoint:
    """Completion loss (and choice accuracy when every row has choices) of `model` on `rows`; with
    `generate_rows`, also its greedy answers to the first that many prompts (`measure_generation`)."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    loss, rows_loss = evaluate_model(model, tokenizer, rows, metric="loss", batch_size=batch_size)
    point = QualityPoint(
        stage=stage, loss=loss["value"], perplexity=loss.get("perplexity"), rows=len(rows), tokens=sum(r["tokens"] for r in rows_loss)
    )
    if all(ex.choices and ex.completion in ex.choices for ex in rows):
        acc, _ = evaluate_model(model, tokenizer, rows, metric="choice", batch_size=batch_size)
        point.accuracy, point.accuracy_se = acc["value"], binomial_se(acc["value"], len(rows))
    if generate_rows:
        point.generation = measure_generation(model, tokenizer, rows[:generate_rows], max_new_tokens=max_new_tokens, batch_size=batch_size)
    point.seconds = round(time.perf_counter() - start, 3)
    model.train(was_training)
    logger.info(
        "quality %s: loss %.4f%s", stage, point.loss, f", accuracy {100 * point.accuracy:.1f}%" if point.accuracy is not None else ""
    )
    return point


def measure_generation(model, tokenizer, rows: Sequence[Example], *, max_new_tokens: int, batch_size: int) -> GenerationQuality:
    """Greedy answers to `rows`' prompts (chat template as in training): how often they loop (repeated
    4-gram rate), how varied they are (distinct-2), how often they match the reference (eval's exact rule)."""
    summary, answers = evaluate_model(model, tokenizer, rows, metric="exact", batch_size=batch_size, max_new_tokens=max_new_tokens)
    tokens = [a["tokens"] for a in answers]
    return GenerationQuality(
        rows=len(rows),
        max_new_tokens=max_new_tokens,
        mean_tokens=round(sum(map(len, tokens)) / len(tokens), 2) if tokens else 0.0,
        repeated_4gram_rate=repeated_ngram_rate(tokens, 4),
        distinct_2=distinct_n(tokens, 2),
        exact_match=summary["value"],
        examples=[
            {"prompt": ex.prompt, "reference": ex.completion, "answer": a["prediction"]} for ex, a in zip(rows, answers[:EXAMPLE_ANSWERS])
        ],
    )


def verdict(points: Sequence[QualityPoint]) -> tuple[str, bool]:
    """(one line comparing the recovered model with its reference, whether it is far worse)."""
    by_stage = {p.stage: p for p in points}
    final = by_stage.get("recovered") or by_stage.get("pruned")
    reference = by_stage.get("dense-reference") or by_stage.get("dense")
    if final is None or reference is None or final.loss is None or reference.loss is None:
        return "", False
    rel = final.loss / reference.loss - 1
    parts = [f"{final.stage} vs {reference.stage}: loss {reference.loss:.3f} → {final.loss:.3f} ({rel:+.1%})"]
    warn = rel > WARN_RELATIVE_LOSS_INCREASE
    if final.accuracy is not None and reference.accuracy is not None:
        drop = 100 * (reference.accuracy - final.accuracy)
        parts.append(f"accuracy {100 * reference.accuracy:.1f}% → {100 * final.accuracy:.1f}% ({-drop:+.1f} points)")
        warn = warn or drop > WARN_ACCURACY_DROP_POINTS
    text = ", ".join(parts)
    if warn:
        text += (
            f" — far worse than its reference (more than {WARN_RELATIVE_LOSS_INCREASE:.0%} loss or "
            f"{WARN_ACCURACY_DROP_POINTS:g} points): cut fewer layers, merge, recover longer or distill"
        )
    return text, warn


def generation_verdict(points: Sequence[QualityPoint]) -> tuple[str, bool]:
    """(one line comparing how often the final model's greedy answers repeat themselves with the reference's — the
    --dense-reference fine-tune when it was scored, else the dense model — whether they loop where it does not)."""
    by_stage = {p.stage: p for p in points if p.generation and p.generation.repeated_4gram_rate is not None}
    final = by_stage.get("recovered") or by_stage.get("pruned")
    dense = by_stage.get("dense")
    reference = by_stage.get("dense-reference") or dense
    if final is None or reference is None:
        return "", False
    before, after = reference.generation.repeated_4gram_rate, final.generation.repeated_4gram_rate
    loops = after - before > WARN_REPEAT_INCREASE
    label = "" if reference is dense else f"{reference.stage} "
    text = f"greedy answers' repeated 4-gram rate {label}{before:.2f} → {after:.2f}"
    if reference is not dense and dense is not None:
        text += f" (dense before training {dense.generation.repeated_4gram_rate:.2f})"
    if loops:
        fix = "cut fewer layers or recover longer (--mix-data general rows and --distill helped little at 60 CPU steps)"
        text += f" — the answers loop where the {reference.stage} model's do not: {fix}"
    return text, loops


def build_ledger(points: list[QualityPoint], held: HeldOut) -> QualityLedger:
    text, warn = verdict(points)
    generation, loops = generation_verdict(points)
    text = "; ".join(t for t in (text, generation) if t)
    return QualityLedger(validation=held.description, rows=len(held.validation), points=points, verdict=text, warning=warn or loops)


def held_out_of(manifest, *, data: str | None = None) -> HeldOut:
    """A compress run's split, re-derived from its manifest (the same data, split, row limit, validation split,
    fraction, cap and seed): the rows it trained on and the held-out rows its ledger was measured on.
    `data` replaces the recorded --data (the file moved)."""
    config = manifest.config
    source = data or config.get("data") or manifest.data.source
    try:
        train = read_examples(source, split=config.get("split", "train"), limit=config.get("max_examples"))
        held = hold_out(
            train,
            data=source,
            split=config.get("split", "train"),
            validation_split=config.get("validation_split"),
            fraction=config.get("validation_fraction", 0.1),
            max_rows=config.get("validation_rows", 128),
            seed=manifest.seed,
        )
    except DataError as exc:
        raise DataError(f"{exc} — the held-out rows of {source!r} are needed to measure the artefact: give --ledger-data PATH") from None
    if manifest.quality is not None and len(held.validation) != manifest.quality.rows:
        raise DataError(
            f"{source!r} gives {len(held.validation)} held-out rows, the checkpoint's ledger has {manifest.quality.rows}: "
            "the data changed since compress; give the original with --ledger-data PATH"
        )
    return held


def heldout_rows(manifest, *, data: str | None = None) -> list[Example]:
    """The held-out rows a checkpoint's ledger was measured on (`held_out_of`), so a derived artefact is scored on
    exactly those rows; none when the checkpoint has no ledger."""
    if manifest.quality is None:
        return []
    return held_out_of(manifest, data=data).validation
