"""The model card's section on what the model answers: the ledger's greedy answers to the first held-out
prompts at every stage (repeated 4-gram rate, distinct-2, exact match), two answers side by side, and, with
--mix-data, the general held-out rows' losses beside the task's."""

from __future__ import annotations

from gradprune_deploy.formatting import fmt
from gradprune_deploy.manifest import QualityLedger

EXCERPT = 240  # characters of each example answer shown


def _cell(text: str) -> str:
    """One table cell: newlines shown as ⏎, pipes escaped, cut to EXCERPT characters."""
    text = text.replace("|", "\\|").replace("\n", "⏎")
    return text[:EXCERPT] + ("…" if len(text) > EXCERPT else "")


def generation_section(ledger: QualityLedger | None) -> str:
    points = [p for p in (ledger.points if ledger else []) if p.generation]
    if not points:
        return ""
    g0 = points[0].generation
    out = [
        "## What it answers",
        "",
        f"Greedy answers to the first {g0.rows} held-out prompts ({g0.max_new_tokens} new tokens at most, the chat template "
        "as in training), at every stage. Repeated 4-gram rate: within each answer, the share of 4-grams that repeat an "
        "earlier one (0 for fluent text, towards 1 for a loop).",
        "",
        "| stage | repeated 4-gram rate | distinct-2 | exact match | mean answer tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in points:
        g = p.generation
        out.append(f"| {p.stage} | {fmt(g.repeated_4gram_rate)} | {fmt(g.distinct_2)} | {fmt(g.exact_match)} | {g.mean_tokens:.1f} |")
    with_examples = [p for p in points if p.generation.examples]
    for i in range(min(len(p.generation.examples) for p in with_examples) if with_examples else 0):
        prompt = with_examples[0].generation.examples[i]["prompt"]
        out += ["", f"Prompt: {_cell(prompt)}", "", "| stage | answer |", "|---|---|"]
        out += [f"| {p.stage} | {_cell(p.generation.examples[i]['answer'])} |" for p in with_examples]
    return "\n".join(out + _general_rows(ledger))


def _general_rows(ledger: QualityLedger) -> list[str]:
    if not ledger.general_points:
        return []
    rows = ledger.general_points[0].rows
    out = [
        "",
        f"General held-out rows (`--mix-data`, {rows} rows never trained on):",
        "",
        "| stage | loss | perplexity |",
        "|---|---:|---:|",
    ]
    return out + [f"| {p.stage} | {fmt(p.loss, '.4f')} | {fmt(p.perplexity, '.2f')} |" for p in ledger.general_points]
