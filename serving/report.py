"""The benchmark report: per-metric summaries and ratios (pure), markdown, PNG chart, files on disk.

A report is one JSON-serialisable dict (schema `REPORT_SCHEMA`):

    {"schema", "dense", "pruned", "machine", "ideal": {"dense", "pruned", "ratios"},
     "tolerance", "backends": {name: {"device", "settings", "metrics": {metric: entry},
                                      "failed_requests", "notes", ...}}}

where each metric entry is

    {"unit", "dense": {"min","median","max","n","values"}, "pruned": {...},
     "ratio": pruned median / dense median, "ideal_name", "ideal", "delta": ratio - ideal}

Files written into `<pruned checkpoint>/bench/` by default, where the Hub exporter's model card
looks for them (gradprune_deploy/checkpoint.py `find_reports`): `report.json`, `report.md` (which embeds
`report.png`), `report.png`. A run for one backend keeps the other backends' results already
in `report.json` when it is for the same dense/pruned pair, so backends can be measured one
command at a time (each backend records its own settings, time and load average).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from gradprune_deploy.formatting import fmt
from gradprune_deploy.layout import BENCH_REPORT_JSON, BENCH_REPORT_MD, BENCH_REPORT_PNG
from gradprune_deploy.utils import atomic_write_text

from .backends import BACKENDS
from .ideal import ideal_for_metric

logger = logging.getLogger(__name__)

REPORT_SCHEMA = "gradprune-bench/1"
REPORT_FILES = {"json": BENCH_REPORT_JSON, "markdown": BENCH_REPORT_MD, "png": BENCH_REPORT_PNG}

# metric → (unit, label); the order is the table order.
METRICS: dict[str, tuple[str, str]] = {
    "ttft_s": ("s", "time to first token"),
    "tpot_s": ("s", "time per output token"),
    "e2e_s": ("s", "end-to-end latency"),
    "output_tok_s": ("tok/s", "output tokens/s, concurrency 1"),
    "output_tok_s_concurrent": ("tok/s", "output tokens/s, concurrency N"),
    "tpot_s_concurrent": ("s", "time per output token, concurrency N"),
    "peak_rss_bytes": ("bytes", "peak RSS"),
    "model_rss_bytes": ("bytes", "peak RSS above the runtime's own"),
    "steady_rss_bytes": ("bytes", "RSS after the runs, above the runtime's own"),
    "cuda_peak_bytes": ("bytes", "torch.cuda.max_memory_allocated"),
    "model_weights_bytes": ("bytes", "vLLM model weights memory"),
    "gpu_memory_bytes": ("bytes", "GPU memory of the process"),
    "file_size_bytes": ("bytes", "model file size"),
}
# The metrics an extra arm (onnx --onnx-quantize) is compared on, each against the dense model.
ARM_METRICS = ("ttft_s", "tpot_s", "peak_rss_bytes", "model_rss_bytes", "file_size_bytes")


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """min / median / max over runs, with the raw values kept."""
    values = [float(v) for v in values]
    if not values:
        return {"min": None, "median": None, "max": None, "n": 0, "values": []}
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values), "values": values}


def metric_entry(metric: str, dense: Sequence[float], pruned: Sequence[float], ratios: Mapping[str, float]) -> dict[str, Any]:
    """One table row: both models summarised, the ratio of medians, and the ideal beside it."""
    d, p = summarize(dense), summarize(pruned)
    ratio = p["median"] / d["median"] if d["median"] and p["median"] is not None else None
    ideal = ideal_for_metric(metric, ratios)
    entry = {
        "unit": METRICS.get(metric, ("", ""))[0],
        "dense": d,
        "pruned": p,
        "ratio": ratio,
        "ideal_name": ideal[0] if ideal else None,
        "ideal": ideal[1] if ideal else None,
    }
    entry["delta"] = ratio - entry["ideal"] if ratio is not None and entry["ideal"] is not None else None
    return entry


def backend_metrics(samples: Mapping[str, Mapping[str, Sequence[float]]], ratios: Mapping[str, float]) -> dict[str, Any]:
    """{"dense": {metric: values}, "pruned": {...}} → {metric: entry}, for metrics both models have."""
    names = [m for m in METRICS if samples["dense"].get(m) and samples["pruned"].get(m)]
    names += sorted(set(samples["dense"]) & set(samples["pruned"]) - set(names) - {m for m in METRICS})
    return {m: metric_entry(m, samples["dense"][m], samples["pruned"][m], ratios) for m in names}


def arm_metrics(
    samples: Mapping[str, Mapping[str, Sequence[float]]], ideals: Mapping[str, Mapping[str, tuple[str, float]]]
) -> dict[str, dict[str, Any]]:
    """Each arm but dense (its label → metric → entry) as a ratio to dense, beside that arm's own ideal
    (`ideals[label][metric]` = (name, value), from serving/ideal.py `onnx_arm_ideals`)."""
    out: dict[str, dict[str, Any]] = {}
    for label, arm_ideal in ideals.items():
        out[label] = {}
        for metric in ARM_METRICS:
            if not samples["dense"].get(metric) or not samples.get(label, {}).get(metric):
                continue
            d, a = summarize(samples["dense"][metric]), summarize(samples[label][metric])
            ratio = a["median"] / d["median"] if d["median"] else None
            name, ideal = arm_ideal.get(metric, (None, None))
            delta = ratio - ideal if ratio is not None and ideal is not None else None
            out[label][metric] = {
                "unit": METRICS[metric][0],
                "dense": d,
                "arm": a,
                "ratio": ratio,
                "ideal_name": name,
                "ideal": ideal,
                "delta": delta,
            }
    return out


def tpot_check(report: Mapping[str, Any]) -> dict[str, Any]:
    """Per backend: is the measured time-per-output-token ratio within tolerance of the ideal?"""
    tolerance = report.get("tolerance", 0.05)
    out = {}
    for name, backend in report.get("backends", {}).items():
        entry = backend.get("metrics", {}).get("tpot_s")
        if entry and entry.get("delta") is not None:
            out[name] = {
                "ratio": entry["ratio"],
                "ideal": entry["ideal"],
                "delta": entry["delta"],
                "within_tolerance": abs(entry["delta"]) <= tolerance,
            }
    return out


def tpot_decomposition(entry: Mapping[str, Any], dense: Mapping[str, Any], pruned: Mapping[str, Any]) -> dict[str, Any] | None:
    """Split the measured time per output token into per-layer and fixed (non-layer) parts.

    Two models that differ only in layer count give two points of t = fixed + layers × per_layer;
    the fixed part is everything that does not scale with layers (embedding gather, final norm,
    lm_head, sampling, Python / scheduler overhead). Its measured share of the dense time is set
    beside the share the cost model predicts (non-layer bytes / all bytes read per token): a
    measured share well above the ideal means overhead, not weights, dominates what pruning cannot remove.
    """
    dl, pl = dense["num_layers"], pruned["num_layers"]
    td, tp = entry["dense"]["median"], entry["pruned"]["median"]
    if dl == pl or not td or tp is None:
        return None
    per_layer = (td - tp) / (dl - pl)
    fixed = td - dl * per_layer
    return {
        "per_layer_s": per_layer,
        "fixed_s": fixed,
        "fixed_share_measured": fixed / td,
        "fixed_share_ideal": 1 - dense["layer_bytes"] / dense["decode_bytes_per_token"],
    }


def merge_reports(old: Mapping[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Keep old backends' results when the old report is for the same dense/pruned pair."""
    if not old or old.get("schema") != REPORT_SCHEMA or (old.get("dense"), old.get("pruned")) != (new["dense"], new["pruned"]):
        return new
    merged = dict(new)
    merged["backends"] = {**{k: v for k, v in old.get("backends", {}).items() if k not in new["backends"]}, **new["backends"]}
    merged["checks"] = {"tpot_vs_ideal": tpot_check(merged)}
    return merged


# -- rendering -----------------------------------------------------------------------------------


def _fmt_measure(value: float | None, unit: str) -> str:
    """A value in its unit: ms or s, MiB, tok/s; "–" when there is none."""
    if value is not None and unit == "s":
        return f"{value * 1000:.1f} ms" if value < 10 else f"{value:.1f} s"
    if value is not None and unit == "bytes":
        return f"{value / 2**20:.0f} MiB"
    return fmt(value, ".1f" if unit == "tok/s" else ".4g")


def _span(summary: Mapping[str, Any], unit: str) -> str:
    if summary["n"] <= 1:
        return _fmt_measure(summary["median"], unit)
    return f"{_fmt_measure(summary['median'], unit)} ({_fmt_measure(summary['min'], unit)}–{_fmt_measure(summary['max'], unit)})"


def _backend_lines(name: str, backend: Mapping[str, Any]) -> list[str]:
    """One backend's section: its settings, the metric table, the TPOT split, failures and notes."""
    s = backend.get("settings", {})
    lines = [
        "",
        f"### {name} ({backend.get('device', '?')}{', ' + backend['device_name'] if backend.get('device_name') else ''})",
        "",
        f"input {s.get('input_len')} tokens, output {s.get('output_len')} tokens, {s.get('num_prompts')} prompts × "
        f"{s.get('runs')} runs (+{s.get('warmup')} warm-up), dense and pruned interleaved"
        + (f"; concurrency {s['concurrency']} with {s['num_requests']} requests" if s.get("concurrency") else ""),
        "",
        "| metric | dense | pruned | ratio | ideal | ratio − ideal |",
        "|---|---|---|---|---|---|",
    ]
    for metric, e in backend["metrics"].items():
        unit, label = e["unit"], METRICS.get(metric, ("", metric))[1]
        ratio = fmt(e["ratio"], ".3f")
        ideal = f"{e['ideal']:.3f} ({e['ideal_name']})" if e["ideal"] is not None else "–"
        delta = fmt(e["delta"], "+.3f")
        lines.append(f"| {label} | {_span(e['dense'], unit)} | {_span(e['pruned'], unit)} | {ratio} | {ideal} | {delta} |")
    lines += _arm_lines(backend)
    split = backend.get("tpot_decomposition")
    if split:
        lines += [
            "",
            f"Time per output token = {split['fixed_s'] * 1000:.2f} ms fixed + {split['per_layer_s'] * 1000:.3f} ms × layers "
            f"(from the two models); the fixed part is {split['fixed_share_measured']:.0%} of the dense time, against "
            f"{split['fixed_share_ideal']:.0%} of the bytes read (embedding row, final norm, lm_head).",
        ]
    failed = backend.get("failed_requests")
    if failed is not None:
        lines += ["", f"Failed requests: dense {failed.get('dense', 0)}, pruned {failed.get('pruned', 0)}."]
    for note in backend.get("notes", []):
        lines.append(f"- {note}")
    return lines


def _arm_lines(backend: Mapping[str, Any]) -> list[str]:
    """Every arm side by side (dense, pruned, pruned quantised): value, then ratio to dense · ideal."""
    arms = backend.get("arms")
    if not arms:
        return []
    labels = list(arms)
    lines = [
        "",
        "Each arm against the dense float32 graph: value, ratio to dense, and the ideal ratio from the graphs' weight bytes "
        "(bytes read per token for time per output token, stored bytes for memory and file size, prefill FLOPs for the first token).",
        "",
        "| metric | dense | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for metric in ARM_METRICS:
        entries = [arms[label].get(metric) for label in labels]
        first = next((e for e in entries if e), None)
        if first is None:
            continue
        cells = [f"{_span(e['arm'], e['unit'])} ({fmt(e['ratio'], '.3f')} · ideal {fmt(e['ideal'], '.3f')})" if e else "–" for e in entries]
        lines.append(f"| {METRICS[metric][1]} | {_span(first['dense'], first['unit'])} | " + " | ".join(cells) + " |")
    return lines


def to_markdown(report: Mapping[str, Any], *, plot: str | None = None) -> str:
    """The report as markdown: one table per backend, the ideal ratios, the machine.

    Checkpoints are named by their directory name only: the markdown goes on a public model card.
    """
    ratios = report["ideal"]["ratios"]
    dense, pruned = report["ideal"]["dense"], report["ideal"]["pruned"]
    lines = [
        "## Serving benchmark: dense vs pruned",
        "",
        f"Dense `{Path(report['dense']).name}` ({dense['num_layers']} layers, {dense['params_total'] / 1e6:.1f}M params) vs "
        f"pruned `{Path(report['pruned']).name}` ({pruned['num_layers']} layers, {pruned['params_total'] / 1e6:.1f}M params).",
        "",
        f"Ideal pruned/dense ratios from the checkpoints: weight bytes read per decoded token "
        f"**{ratios['decode_bytes']:.3f}**, FLOPs per decoded token {ratios['decode_flops']:.3f}, prefill FLOPs "
        f"{ratios['prefill_flops']:.3f}, stored weight bytes {ratios['weight_bytes']:.3f}, layers only {ratios['layers_only']:.3f}.",
        "Values are median (min–max) over runs; ratio = pruned median / dense median; a rate's ideal is 1/cost ratio.",
    ]
    for name, backend in report["backends"].items():
        lines += _backend_lines(name, backend)
    checks = tpot_check(report)
    if checks:
        lines += [
            "",
            f"Time per output token vs ideal (tolerance ±{report.get('tolerance', 0.05)}): "
            + "; ".join(
                f"{k} {v['ratio']:.3f} vs {v['ideal']:.3f} ({'ok' if v['within_tolerance'] else 'MISS'})" for k, v in checks.items()
            ),
        ]
    m = report.get("machine", {})
    lines += [
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('ram_gib', '?')} GiB RAM"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; {m.get('platform', '')}.",
        f"Command: `{report.get('command', '')}`",
        "",
    ]
    if plot:
        lines += [f"![pruned/dense ratios, measured and ideal]({plot})", ""]
    return "\n".join(lines)


def save_plot(report: Mapping[str, Any], path: str | Path) -> Path:
    """One bar per (backend, metric): the measured pruned/dense ratio, the ideal as a black tick."""
    rows = [
        (f"{b}\n{METRICS.get(m, ('', m))[1]}", e["ratio"], e["ideal"])
        for b, backend in report["backends"].items()
        for m, e in backend["metrics"].items()
        if e["ratio"] is not None
    ]
    fig = Figure(figsize=(7, 0.42 * max(len(rows), 3) + 1.2), dpi=120)  # no pyplot: no global state, no GUI backend
    ax = fig.subplots()
    palette = {name: backend.colour for name, backend in BACKENDS.items()}
    for i, (label, ratio, ideal) in enumerate(rows):
        ax.barh(i, ratio, color=palette.get(label.split("\n")[0], "#7f7f7f"), height=0.6)
        ax.text(ratio, i, f" {ratio:.2f}", va="center", fontsize=7)
        if ideal is not None:
            ax.plot([ideal, ideal], [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0].replace("\n", ": ") for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12 * max([1.0] + [r[1] for r in rows] + [r[2] for r in rows if r[2] is not None]))
    ax.set_xlabel("pruned / dense — bar: measured; black tick: ideal", fontsize=8)
    ratios = report["ideal"]["ratios"]
    ax.set_title(
        f"Dense vs pruned ({report['ideal']['dense']['num_layers']} → {report['ideal']['pruned']['num_layers']} layers; "
        f"ideal decode {ratios['decode_bytes']:.3f})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def write_report(report: dict[str, Any], out_dir: str | Path, *, plot: bool = True) -> dict[str, Any]:
    """Merge with an existing report for the same pair, then write JSON, markdown and PNG."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / REPORT_FILES["json"]
    old = None
    if json_path.is_file():
        try:
            old = json.loads(json_path.read_text())
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON; replacing it", json_path)
    report = merge_reports(old, report)
    report["files"] = {kind: str(out_dir / name) for kind, name in REPORT_FILES.items() if kind != "png" or plot}
    # each file replaced atomically: an interrupted run leaves the previous report whole, never half of one
    if plot:
        png_tmp = out_dir / f".{REPORT_FILES['png']}.tmp-{os.getpid()}.png"
        try:
            save_plot(report, png_tmp)
            os.replace(png_tmp, out_dir / REPORT_FILES["png"])
        finally:
            png_tmp.unlink(missing_ok=True)
    atomic_write_text(out_dir / REPORT_FILES["markdown"], to_markdown(report, plot=REPORT_FILES["png"] if plot else None))
    atomic_write_text(json_path, json.dumps(report, indent=2, default=str) + "\n")
    logger.info("wrote %s, %s%s", json_path, REPORT_FILES["markdown"], f", {REPORT_FILES['png']}" if plot else "")
    return report
