"""The transformers backend of `gradprune eval`: completion log-likelihoods and greedy generation.

Both pad on the LEFT, so every row ends at the last column: the completion tokens of all rows
then sit in the last `k` columns and only those `k` logit rows are materialised
(`logits_to_keep`), which keeps a batch of 49k-vocabulary logits small. Position ids are
counted from each row's first real token, so a padded row sees exactly the positions it would
see alone; tests check padded scores against unpadded ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import GenerationConfig

logger = logging.getLogger(__name__)


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [batch, longest], padded on the left."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... from each row's first real token (padding gets 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def completion_logprobs(model, items: Sequence[tuple[Sequence[int], int]], *, pad_token_id: int) -> list[tuple[float, int]]:
    """One forward pass over `items` = (token ids of prompt + completion, number of prompt tokens).

    Returns, per item, (sum of log p(token | everything before it) over the completion tokens,
    number of completion tokens). The completion is every token after the prompt, exactly the
    tokens that carry labels in fine-tuning (data.tokenize_examples).
    """
    n_completion = [len(ids) - n_prompt for ids, n_prompt in items]
    if min(n_completion) < 1 or min(n_prompt for _, n_prompt in items) < 1:
        raise ValueError("every item needs at least one prompt token and one completion token")
    device = _device(model)
    input_ids, attention_mask = left_pad([ids for ids, _ in items], pad_token_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    keep = max(n_completion)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        logits_to_keep=keep + 1,
        use_cache=False,
    )
    # Column j of `logits` (j < keep) is position width-keep-1+j and predicts token width-keep+j.
    logprobs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, -keep:]
    token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [batch, keep]
    counts = torch.tensor(n_completion, device=device)
    is_completion = torch.arange(keep, device=device).unsqueeze(0) >= (keep - counts).unsqueeze(1)
    sums = (token_logprobs.double() * is_completion).sum(-1)
    return [(float(s), int(n)) for s, n in zip(sums.tolist(), n_completion)]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the generation config's eos ids plus the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def cut_at_eos(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    out = []
    for token in tokens:
        if token in eos_ids:
            break
        out.append(int(token))
    return out


@torch.inference_mode()
def greedy_generate(
    model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_token_id: int, eos_ids: Sequence[int]
) -> list[list[int]]:
    """Greedy continuations of `prompts` (token ids), one left-padded batch; eos and after removed."""
    device = _device(model)
    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, eos_token_id=list(eos_ids) or None
    )
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config)
    new_tokens = out[:, input_ids.shape[1] :].tolist()
    return [cut_at_eos(tokens, eos_ids) for tokens in new_tokens]
