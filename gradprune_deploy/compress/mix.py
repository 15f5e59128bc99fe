"""--mix-data: general rows mixed into the recovery fine-tune, so a pruned model stays a model and not
only a task classifier, and a general held-out set scored in the ledger beside the task's.

The mix source is any prompt/completion source `--data` accepts. A seeded slice of it (at most
--validation-rows, 10%) is held out as the general validation set, never trained on; the rest is the
pool. The recovery set is the task's training rows plus round(R / (1 − R) · n) pool rows (picked in a
seeded order, cycled when the pool is smaller), shuffled together, so a fraction R = --mix-ratio of the recovery rows is general.
The probe and the cut still see only the task's rows: what to drop is the task's question.

`--mix-completions dense` replaces the pool's completions by the dense model's own greedy answers,
generated before the cut (self-data distillation, Thangarasa et al. 2024, arXiv 2410.09982): the
recovery then pulls the pruned model back towards how the dense model answered, not towards a new style.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace

from ..data import Example, encode_prompt, read_examples
from ..evaluation.hf import eos_token_ids, greedy_generate
from .ledger import split_slice

logger = logging.getLogger(__name__)

GENERAL_FRACTION = 0.1  # of the mix source, held out as the general validation rows


@dataclass
class Mix:
    pool: list[Example]
    validation: list[Example]
    description: str
    added: int = 0  # rows added to the recovery (after tokenisation dropped any over --max-length)


def read_mix(source: str, *, max_rows: int, seed: int, limit: int | None = None) -> Mix:
    """The mix source split into a training pool and general held-out rows (a seeded slice)."""
    rows = read_examples(source, limit=limit)
    pool, held = split_slice(len(rows), fraction=GENERAL_FRACTION, max_rows=max_rows, seed=seed)
    return Mix(
        [rows[i] for i in pool],
        [rows[i] for i in held],
        f"{source}: seeded slice (seed {seed}) of {len(held)} of its {len(rows)} rows, never trained on",
    )


def mix_rows(task: int, ratio: float) -> int:
    """Pure: pool rows to add to `task` rows so that they make up `ratio` of the recovery set."""
    return round(ratio / (1 - ratio) * task) if ratio > 0 else 0


def pick(pool: list, count: int, *, seed: int) -> list:
    """Pure: `count` rows of `pool` in a seeded order, cycling when the pool is smaller."""
    if not pool:
        return []
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[order[i % len(pool)]] for i in range(count)]


def shuffled_together(task: list, extra: list, *, seed: int) -> list:
    """Pure: the task rows and the mix rows in one seeded shuffle."""
    rows = list(task) + list(extra)
    random.Random(seed + 1).shuffle(rows)
    return rows


def dense_completions(model, tokenizer, pool: list[Example], *, max_new_tokens: int, batch_size: int) -> list[Example]:
    """`pool` with each completion replaced by the model's greedy answer (chat template as in training);
    rows the model answers with nothing, or does not finish within `max_new_tokens`, are dropped."""
    was_training = model.training
    model.eval()
    eos = eos_token_ids(model, tokenizer)
    answered = []
    for start in range(0, len(pool), batch_size):
        batch = pool[start : start + batch_size]
        prompts = [encode_prompt(tokenizer, ex.prompt) for ex in batch]
        outputs = greedy_generate(model, prompts, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_ids=eos)
        for ex, tokens in zip(batch, outputs):
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            if text and len(tokens) < max_new_tokens:  # an answer cut at the limit would teach stopping mid-sentence
                answered.append(replace(ex, completion=text, choices=()))
    model.train(was_training)
    logger.info("mix: the dense model answered %d of %d pool prompts", len(answered), len(pool))
    return answered
