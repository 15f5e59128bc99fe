"""The study report's mix table (issue 23): does a recovery with general rows keep the model general, and what does
it cost the task?

Per task and seed, every arm that scored general held-out rows (`--mix-data`, the igia-general / igia-mix /
igia-mixself arms of study_arms.py) beside the no-mix control: task accuracy and its paired Δ vs the control, the
general held-out loss at each stage and its ratio to the dense model's (target ≤ 1.15), and the repeated 4-gram rate
of the greedy answers on the task's and on the general held-out prompts. The control is igia-general@20% (the
no-mix recovery, row for row, scored on the same general rows), or igia@20% where only that ran.
"""

from __future__ import annotations

from paired_tables import accuracy_points, compare, delta_text, runs_by_arm

MIX_NOTE = (
    "General rows: a seeded tenth of GSM8K (`bundled:gsm8k`, MIT) held out and scored at every stage (loss on its reference "
    "answers; greedy answers to its first 16 prompts). igia-general@20% trains exactly as igia@20% (`--mix-ratio 0`) and "
    "only scores them; igia-mix@20% makes 25% of the recovery rows GSM8K rows; igia-mixself@20% the dense model's own "
    "answers to GSM8K prompts (`--mix-completions dense`). Same steps and batch in every arm: the mix replaces task rows "
    "seen, it does not add steps."
)
MIX_ARMS = ["igia-general@20%", "igia-mix@20%", "igia-mixself@20%"]
CONTROLS = ["igia-general@20%", "igia@20%"]
GENERAL_TARGET = 1.15  # general held-out loss / the dense model's, at most (issue 23)
TASK_TOLERANCE = 1.0  # points of task accuracy below the no-mix recovery, at most


def _points(record: dict, key: str) -> dict[str, dict]:
    return {p["stage"]: p for p in (record.get("ledger") or {}).get(key, [])}


def _rate(point: dict | None) -> str:
    rate = ((point or {}).get("generation") or {}).get("repeated_4gram_rate")
    return "–" if rate is None else f"{rate:.2f}"


def general_ratio(record: dict) -> float | None:
    """Recovered general held-out loss / the dense model's (None without general rows)."""
    general = _points(record, "general_points")
    if "dense" not in general or "recovered" not in general:
        return None
    return general["recovered"]["loss"] / general["dense"]["loss"]


def mix_row(task: str, seed: int, arm: str, record: dict, control: dict | None) -> str:
    general, task_points = _points(record, "general_points"), _points(record, "points")
    ratio = general_ratio(record)
    losses = " → ".join(f"{general[s]['loss']:.3f}" for s in ("dense", "pruned", "recovered") if s in general) or "–"
    vs_control = "–" if control is None or control is record else delta_text(compare(record, control))
    meets = "–" if ratio is None else ("yes" if ratio <= GENERAL_TARGET else "no")
    if control is record:
        meets = f"the no-mix control ({meets} on general)"
    elif control is not None and meets == "yes":
        meets = "yes" if compare(record, control)["delta"] >= -TASK_TOLERANCE else "general yes, task no"
    return (
        f"| {task} | {seed} | {arm} | {accuracy_points(record):.1f} | {vs_control} | {losses} | "
        f"{'–' if ratio is None else f'{ratio:.2f}×'} | {_rate(task_points.get('dense'))} → {_rate(task_points.get('recovered'))} | "
        f"{_rate(general.get('dense'))} → {_rate(general.get('recovered'))} | {meets} |"
    )


def mix_table(results: list[dict]) -> list[str]:
    """One row per (task, seed, arm) that scored general rows, each beside the same seed's no-mix control."""
    runs = runs_by_arm(results)
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        seeds = sorted({s for arm in MIX_ARMS for s in runs.get((task, arm), {})})
        for seed in seeds:
            control = next((runs[(task, c)][seed] for c in CONTROLS if seed in runs.get((task, c), {})), None)
            for arm in MIX_ARMS:
                record = runs.get((task, arm), {}).get(seed)
                if record is not None:
                    lines.append(mix_row(task, seed, arm, record, control))
    if not lines:
        return []
    return [
        "| task | seed | arm | task accuracy % | Δ vs no mix ± paired SE (McNemar p) | general held-out loss dense → pruned → "
        "recovered | recovered / dense | task answers rep-4 dense → recovered | general answers rep-4 dense → recovered "
        f"| target (general ≤ {GENERAL_TARGET}× dense, task ≥ no mix − {TASK_TOLERANCE:g} pt) |",
        "|---|---:|---|---:|---:|---|---:|---|---|---|",
        *lines,
    ]
