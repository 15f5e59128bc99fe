"""The model card's section on derived artefacts (ONNX float / int4 / int8, GGUF): one row per
`ArtefactRecord` in the manifest — its size, how close it stays to the checkpoint on fixed prompts, its
quality on the checkpoint's own held-out ledger rows beside the checkpoint's — and how to run each format.

Generic over `ArtefactRecord.format`: a new format needs only its entry in `RUN_SNIPPETS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gradprune_deploy.formatting import fmt
from gradprune_deploy.manifest import ArtefactRecord, Manifest, QualityPoint


def _onnx_snippet(folder: str, record: ArtefactRecord) -> str:
    return f"""With onnxruntime (`pip install 'gradprune-deploy[onnx]'`), greedy generation with the KV cache:

```python
from transformers import AutoTokenizer
from gradprune_deploy.runtime.onnx_runtime import OnnxCausalLM

lm = OnnxCausalLM("{folder}")  # {folder}/model.onnx: input_ids, attention_mask, position_ids + past keys/values
tokenizer = AutoTokenizer.from_pretrained("{folder}")
ids = tokenizer("Layer pruning is")["input_ids"]
print(tokenizer.decode(lm.generate([ids], max_new_tokens=64)[0], skip_special_tokens=True))
```"""


def _gguf_snippet(folder: str, record: ArtefactRecord) -> str:
    gguf = next((f for f in record.files if f.endswith(".gguf")), record.files[0] if record.files else "model.gguf")
    path = f"{folder}/{gguf}" if folder else gguf
    name = record.stage.replace("_", "-")
    return f"""With llama.cpp, or Ollama through a Modelfile:

```bash
llama-cli -m {path} -p "Layer pruning is" -n 64
printf 'FROM ./{path}\\n' > Modelfile
ollama create {name} -f Modelfile && ollama run {name} "Layer pruning is"
```"""


RUN_SNIPPETS: dict[str, Callable[[str, ArtefactRecord], str]] = {"onnx": _onnx_snippet, "gguf": _gguf_snippet}


def _closeness(record: ArtefactRecord) -> str:
    v = record.validation
    if v.get("greedy_token_agreement") is None and v.get("max_abs_logit_diff") is None:
        return "not validated"
    parts = []
    if v.get("greedy_token_agreement") is not None:
        parts.append(f"{v['greedy_token_agreement']:.1%} greedy tokens equal")
    if v.get("max_abs_logit_diff") is not None:
        parts.append(f"max \\|Δ logits\\| {v['max_abs_logit_diff']:.3g}")
    return ", ".join(parts)


def _quality(point: QualityPoint | None, final: QualityPoint | None) -> tuple[str, str]:
    """(loss with its change from the checkpoint's own point, accuracy likewise)."""
    if point is None:
        return "not measured", "–"
    loss = fmt(point.loss, ".4f")
    if final is not None and final.loss and point.loss is not None:
        loss += f" ({point.loss / final.loss - 1:+.1%})"
    acc = "–" if point.accuracy is None else f"{100 * point.accuracy:.1f}%"
    if point.accuracy is not None and final is not None and final.accuracy is not None:
        acc += f" ({100 * (point.accuracy - final.accuracy):+.1f} points)"
    return loss, acc


def artefact_stage_text(m: Manifest | None, stage: str | None) -> str:
    """How the ledger table describes an artefact's stage ("" when the stage is not an artefact's)."""
    record = next((a for a in m.artefacts if a.stage == stage), None) if m else None
    return f"this checkpoint exported to {record.format.upper()}, {record.quantization}" if record else ""


def artefacts_section(m: Manifest | None, *, folders: Mapping[str, str] | None = None) -> str:
    """The card section; `folders` maps a stage to where its files are published (default: the stage name)."""
    if m is None or not m.artefacts:
        return ""
    folders = folders or {}
    final = m.final_quality
    reference = f"this checkpoint's {final.stage} point, loss {fmt(final.loss, '.4f')}" if final else "no ledger point"
    out = [
        "## Quantised and exported versions",
        "",
        "Each is validated against this checkpoint (PyTorch, float32) on fixed prompts — greedy-token agreement, "
        "teacher-forced, and the largest logit difference — and scored on the same held-out rows as the ledger "
        f"above ({reference}).",
        "",
        "| version | files | size | against this checkpoint | held-out loss | accuracy |",
        "|---|---|---:|---|---:|---:|",
    ]
    for a in m.artefacts:
        loss, acc = _quality(a.quality, final)
        folder = folders.get(a.stage, a.stage)
        files = ", ".join(f"`{folder}/{f}`" for f in a.files)
        out.append(f"| **{a.stage}** | {files} | {a.size_bytes / 2**20:,.1f} MiB | {_closeness(a)} | {loss} | {acc} |")
    for fmt_name in dict.fromkeys(a.format for a in m.artefacts):
        snippet = RUN_SNIPPETS.get(fmt_name)
        record = next(a for a in m.artefacts if a.format == fmt_name)
        if snippet:
            out += ["", snippet(folders.get(record.stage, record.stage), record)]
    return "\n".join(out)
