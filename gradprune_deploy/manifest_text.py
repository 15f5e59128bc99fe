"""How a manifest reads to a person: the ledger table, the artefact and probe lines, the summary that
`compress` prints and `gradprune inspect` shows (manifest.py is the schema; this is only its text)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config_schema import validate_fields
from .errors import GradPruneError
from .formatting import fmt as _fmt
from .formatting import help_field as _f
from .manifest import ArtefactRecord, Manifest, QualityLedger, QualityPoint


def quality_table(ledger: QualityLedger) -> list[str]:
    """The ledger as aligned text lines (inspect and the compress summary print them)."""
    lines = [f"held-out quality on {ledger.rows} validation rows ({ledger.validation}):", *_point_rows(ledger.points)]
    if ledger.general_points:
        lines += [f"general held-out rows ({ledger.general_validation}):", *_point_rows(ledger.general_points)]
    if ledger.verdict:
        lines.append(("  WARNING: " if ledger.warning else "  ") + ledger.verdict)
    answers = [p for p in ledger.points if p.generation and p.generation.examples]
    if answers:
        first = answers[0].generation.examples[0]
        lines.append(f"  greedy answers to {first['prompt'][:60]!r}:")
        lines += [f"    {p.stage:<14} {p.generation.examples[0]['answer'][:90]!r}" for p in answers]
    return lines


def _point_rows(points: list[QualityPoint]) -> list[str]:
    has_acc = any(p.accuracy is not None for p in points)
    has_gen = any(p.generation for p in points)
    header = f"  {'stage':<16} {'loss':>8} {'ppl':>9}" + (f" {'accuracy':>16}" if has_acc else "")
    lines = [header + (f" {'rep-4':>6} {'exact':>6}" if has_gen else "")]
    for p in points:
        acc = (
            (f" {100 * p.accuracy:>8.1f} ± {100 * (p.accuracy_se or 0):.1f}" if p.accuracy is not None else f" {'–':>16}")
            if has_acc
            else ""
        )
        gen = ""
        if has_gen:
            g = p.generation
            gen = f" {_fmt(g.repeated_4gram_rate, '.3f'):>6} {_fmt(g.exact_match, '.3f'):>6}" if g else f" {'–':>6} {'–':>6}"
        lines.append(f"  {p.stage:<16} {_fmt(p.loss):>8} {_fmt(p.perplexity, '.2f'):>9}{acc}{gen}")
    return lines


def artefact_line(a: ArtefactRecord) -> str:
    """One line per derived artefact: size, agreement with its source, where its quality is in the ledger."""
    v = a.validation
    agree = v.get("greedy_token_agreement")
    parts = [f"{a.size_bytes / 2**20:,.1f} MiB"]
    if agree is not None:
        parts.append(f"greedy tokens {agree:.1%} equal to the source")
    if v.get("max_abs_logit_diff") is not None:
        parts.append(f"max |Δ logits| {v['max_abs_logit_diff']:.3g}")
    return f"artefact        {a.stage}: " + ", ".join(parts) + ("" if a.quality else " (no ledger rows)")


def _probe_line(scoring: dict[str, Any]) -> str:
    line = (
        f"probe           {scoring.get('probe_steps')} informative steps (+{scoring.get('zero_gradient_steps')} "
        f"zero-gradient), {scoring.get('seconds', 0):.1f} s"
    )
    adaptive = scoring.get("adaptive")
    if isinstance(adaptive, dict):
        trace = adaptive.get("tau_trace") or []  # [step, τ-b] pairs
        tau = f", last τ-b {trace[-1][1]:.3f}" if trace and trace[-1][1] is not None else ""
        line += f"; auto: {adaptive.get('stopped')} after {adaptive.get('steps_used')} steps{tau}"
    if scoring.get("igia_reduce", "squared") != "squared" or scoring.get("probe_clip_grad_norm") is not None:
        line += f"; IGIA {scoring.get('igia_reduce')}, clip {scoring.get('probe_clip_grad_norm')}"
    return line


def summarize(m: Manifest) -> str:
    """A human summary of a manifest (what `gradprune inspect` prints)."""
    ratio = f" ({m.params_after / m.params_before:.1%})" if m.params_before else ""
    lines = [
        f"base model      {m.base_model}",
        f"data            {m.data.source} ({m.data.examples} training rows, {m.data.validation_rows} held out)",
        f"scorer          {m.scorer}",
        f"layers          {m.num_layers_before} → {m.num_layers_after}",
        f"dropped         {m.layers_dropped}",
        f"parameters      {m.params_before:,} → {m.params_after:,}{ratio}",
    ]
    for p in m.proposals:
        how = "healed" if p.healed else "raw cut"
        budget = "" if p.within_budget is None else (", within budget" if p.within_budget else ", over budget")
        loss = p.judged.loss if p.judged else None
        lines.append(f"proposal        {p.scorer} drops {p.dropped}: {how} validation loss {_fmt(loss)}{budget}")
    if m.scorer == "igia" and m.scoring.get("probe_steps") is not None:
        lines.append(_probe_line(m.scoring))
    if m.merge.enabled:
        into = ", ".join(f"{src}→{dst}" for src, dst in m.merge.targets.items())
        lines.append(
            f"merge           {into}: top {m.merge.keep_top_p:.0%} by {m.merge.criterion.upper()}, same sign; "
            f"{m.merge.merged_entries_total:,} entries added"
        )
    if m.compensation:
        c = m.compensation
        shifts = ", ".join(f"{c.mean_shift_before[j]:.3g}→{c.mean_shift_after[j]:.3g}" for j in c.layers)
        lines.append(f"compensation    {c.folded_into} of original layers {c.layers_original}: mean shift {shifts}")
    ft = m.finetune
    if ft.mode != "none":
        lines.append(
            f"fine-tune       {ft.mode} {ft.objective}, {ft.steps} steps, loss {_fmt(ft.first_logged_loss)} → "
            f"{_fmt(ft.last_logged_loss)}, {ft.seconds:.1f} s"
        )
    lines += [artefact_line(a) for a in m.artefacts]
    if m.quality:
        lines += quality_table(m.quality)
    lines.append(f"total time      {m.timings.get('total_seconds', 0):.1f} s")
    lines.append(f"command         {m.command}")
    return "\n".join(lines)


@dataclass
class InspectConfig:
    """Show the gradprune.json of a compressed checkpoint."""

    checkpoint: str = _f(None, "checkpoint directory", positional=True)
    json: bool = _f(False, "print the whole manifest as JSON")

    def __post_init__(self):
        validate_fields(self)
        if not self.checkpoint:
            raise GradPruneError("give the checkpoint directory: gradprune inspect DIR")


def inspect(config: InspectConfig) -> str:
    manifest = Manifest.read(config.checkpoint)
    return manifest.to_json().rstrip() if config.json else summarize(manifest)
