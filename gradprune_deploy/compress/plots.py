"""layer_importance.png (layout.LAYER_PLOT): every layer's score, the dropped layers marked.

Drawn with matplotlib's object API (a Figure, no pyplot), so it touches no global backend state."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch


def plot_layer_scores(scores: Sequence[float], dropped: Sequence[int], path: str | Path, *, title: str = "", scorer: str = "igia") -> Path:
    dropped = set(dropped)
    fig = Figure(figsize=(max(6, len(scores) * 0.28), 3.6), dpi=120)
    ax = fig.subplots()
    colors = ["#d62728" if i in dropped else "#1f77b4" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    positive = all(s > 0 for s in scores)
    if positive and max(scores) / min(scores) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{scorer} score" + (" (log)" if ax.get_yscale() == "log" else ""))
    ax.set_xticks(range(len(scores)))
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(
        handles=[Patch(color="#1f77b4", label="kept"), Patch(color="#d62728", label=f"dropped ({len(dropped)})")], fontsize=8, loc="best"
    )
    ax.set_title(title or f"Layer importance ({scorer}); {len(dropped)} of {len(scores)} layers dropped", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
