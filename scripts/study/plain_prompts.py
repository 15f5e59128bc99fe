"""What each model answers to a few plain prompts (greedy, chat template as in training), side by side, verbatim.

    .venv/bin/python scripts/study/plain_prompts.py --model dense=bundled:SmolLM2-135M-Instruct \
        --model no-mix=runs/powered/sst2/igia-general@20% --model mix=runs/powered/sst2/igia-mix@20% \
        --out docs/study-records/plain-prompts-sst2.json

Prints a markdown table (newlines shown as ⏎) and writes the answers as JSON, so docs quote a file a command wrote.
One prompt at a time (no padding), `max_new_tokens` 32 by default: the same call the ledger's generation measure makes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gradprune_deploy.data import encode_prompt
from gradprune_deploy.evaluation.hf import eos_token_ids, greedy_generate
from gradprune_deploy.loading import load_model_and_tokenizer

PROMPTS = [
    "The capital of France is",
    "What is 12 * 7?",
    "Give me two tips for sleeping better.",
    "Write one sentence about the ocean.",
]


def answers(source: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    model, tokenizer = load_model_and_tokenizer(source)
    model.eval()
    eos = eos_token_ids(model, tokenizer)
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = encode_prompt(tokenizer, prompt)
            tokens = greedy_generate(model, [ids], max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_ids=eos)[0]
            out.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return out


def table(names: list[str], prompts: list[str], by_model: dict[str, list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "⏎")

    lines = ["| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, prompt in enumerate(prompts):
        lines.append(f"| {cell(prompt)} | " + " | ".join(cell(by_model[name][i]) for name in names) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=SOURCE", help="a column: its name and checkpoint")
    parser.add_argument("--prompt", action="append", default=None, help=f"default: {PROMPTS}")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True, help="the answers as JSON")
    args = parser.parse_args()
    models = dict(spec.split("=", 1) for spec in args.model if "=" in spec)
    if len(models) != len(args.model):
        parser.error("--model takes NAME=SOURCE, e.g. --model dense=bundled:SmolLM2-135M-Instruct")
    prompts = args.prompt or PROMPTS
    by_model = {name: answers(source, prompts, args.max_new_tokens) for name, source in models.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"prompts": prompts, "max_new_tokens": args.max_new_tokens, "models": models, "answers": by_model}
    args.out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print("\n".join(table(list(models), prompts, by_model)))


if __name__ == "__main__":
    main()
