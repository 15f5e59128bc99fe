"""gradprune.json: the one schema of how a checkpoint was made, and what it is worth.

`Manifest` is written by `compress` and read by every consumer (`inspect`, the Hub model card,
`bench`, `eval`); nobody else parses the file. Nested records are dataclasses too, so a field
renamed here is renamed for every reader. `Manifest.from_json` reads schema 1 (the flat dict of
gradprune-deploy 0.1) by converting it, and refuses a newer schema with a clear message.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundled import KNOWN_DATASET_IDS, KNOWN_HUB_IDS  # re-exported: readers import them from here
from .config_schema import validate_fields
from .errors import GradPruneError
from .formatting import fmt as _fmt
from .formatting import help_field as _f
from .layout import MANIFEST

MANIFEST_NAME = MANIFEST  # the name readers import from here; layout.py owns it
SCHEMA_VERSION = 2
# the CompressConfig fields that make up the requested cut (Manifest.budget)
BUDGET_FIELDS = ("drop_ratio", "drop_layers", "target_params", "max_quality_drop", "quality_metric", "protect_first", "protect_last")


@dataclass
class DataRecord:
    """The training data and the held-out rows the quality ledger was measured on."""

    source: str | None = _f(None, "--data as given (a path, a Hub dataset id, or bundled:gsm8k)")
    split: str = _f("train", "split trained on")
    examples: int = _f(0, "rows read for training (after --max-examples and the validation hold-out)")
    tokenized: int = _f(0, "rows left after tokenisation (prompts longer than --max-length are dropped)")
    max_length: int = _f(0, "tokens per example")
    chat_template: bool = _f(False, "whether the tokenizer's chat template formatted the rows")
    loss: str = _f("completion tokens only", "which tokens carry the loss")
    validation: str | None = _f(None, "where the held-out validation rows came from (a split, or a seeded slice)")
    validation_rows: int = _f(0, "held-out validation rows (never trained on)")


@dataclass
class MergeRecord:
    """GradPruner's same-sign merge of some dropped layers into the nearest preceding kept layer."""

    enabled: bool = _f(False, "whether any layer was merged")
    layers_requested: str | None = _f(None, "--merge-layers as given (K, all or none)")
    criterion: str = _f("igia", "what picks each dropped weight's top-p entries")
    keep_top_p: float | None = _f(None, "fraction of each merged linear's entries (top by the criterion) considered")
    targets: dict[str, int] = _f({}, "merged layer (original index) → kept layer it was added into (original index)")
    merged_entries_total: int = _f(0, "weights added in all")
    per_layer: dict[str, Any] = _f({}, "per merged layer: target, entries, merged entries, per-linear stats")


@dataclass
class FinetuneRecord:
    """The recovery fine-tune of the pruned model."""

    mode: str = _f("none", "lora (merged into the weights at the end), prunedlora (LoRA pruned to its target rank, merged), full, or none")
    objective: str = _f("ce", "ce (cross-entropy) or distill (logit KD from a teacher mixed with CE)")
    steps: int = _f(0, "optimizer steps")
    learning_rate: float | None = _f(None, "peak learning rate")
    seconds: float = _f(0.0, "wall time of the fine-tune")
    train_loss: float | None = _f(None, "mean training loss over the run")
    first_logged_loss: float | None = _f(None, "first logged training loss")
    last_logged_loss: float | None = _f(None, "last logged training loss")
    distill: dict[str, Any] | None = _f(None, "teacher, alpha, temperature, top-k (distill only)")
    prunedlora: dict[str, Any] | None = _f(None, "start and target rank, pruning steps and final rank (prunedlora only)")
    settings: dict[str, Any] = _f({}, "batch size, accumulation, LoRA rank, warm-up, seed, ...")


@dataclass
class QualityPoint:
    """Held-out quality of one model at one stage, on the validation rows."""

    stage: str | None = _f(None, "dense (before any training), pruned (after drop + merge), recovered, or dense-reference")
    loss: float | None = _f(None, "mean completion-token negative log-likelihood")
    perplexity: float | None = _f(None, "exp(loss)")
    accuracy: float | None = _f(None, "choice accuracy (rows with `choices` only)")
    accuracy_se: float | None = _f(None, "binomial standard error of the accuracy")
    rows: int = _f(0, "validation rows scored")
    tokens: int = _f(0, "completion tokens scored")
    seconds: float = _f(0.0, "evaluation wall time")


@dataclass
class QualityLedger:
    """What the pruned checkpoint is worth, measured on held-out rows at every stage."""

    validation: str | None = _f(None, "where the rows came from")
    rows: int = _f(0, "validation rows")
    points: list[QualityPoint] = _f([], "one per stage, in pipeline order")
    verdict: str = _f("", "one line comparing the recovered model with its reference")
    warning: bool = _f(False, "true when the recovered model is far worse than its reference")

    def point(self, stage: str) -> QualityPoint | None:
        return next((p for p in self.points if p.stage == stage), None)


@dataclass
class ProposalRecord:
    """One candidate cut `--scorer auto` or `--drop-layers auto` judged on the validation rows."""

    scorer: str = _f("", "the scorer whose ranking proposed the cut")
    dropped: list[int] = _f([], "original indices the cut removes")
    raw: QualityPoint | None = _f(None, "quality right after the cut (drop + merge)")
    healed: QualityPoint | None = _f(None, "quality after a --heal-steps LoRA heal (None without one)")
    seconds: float = _f(0.0, "wall time of the judgement")
    within_budget: bool | None = _f(None, "--drop-layers auto: whether the judged quality stayed within --max-quality-drop")

    @property
    def judged(self) -> QualityPoint:
        """The point the cut is ranked by: healed when there was a heal, else raw."""
        return self.healed or self.raw


@dataclass
class CompensationRecord:
    """--compensate: GradMAP's projection compensation of the pruned layers with the largest mean shift."""

    method: str = _f("", "what was fitted")
    layers: list[int] = _f([], "pruned-model indices of the compensated layers")
    layers_original: list[int] = _f([], "their original indices")
    dense_targets: list[int] = _f([], "original layer whose dense output each compensated layer was fitted to")
    folded_into: str = _f("", "the linear the projection is folded into")
    config_field: str = _f("", "the config field that gives it a bias")
    mlp_bias_linears: list[str] = _f([], "linears of every layer that carry a bias under that field")
    ridge: float = _f(0.0, "ridge toward identity, relative to the MLP output variance")
    calibration_batches: int = _f(0, "batches the fit and the mean shifts were measured on")
    calibration_tokens: int = _f(0, "tokens in those batches")
    mean_shift_before: list[float] = _f([], "per pruned layer: mean-shift norm against the dense model, before")
    mean_shift_after: list[float] = _f([], "the same, after the compensation")
    calibration_loss: dict[str, float | None] = _f({}, "completion loss on the calibration rows: dense, pruned, compensated")


@dataclass
class Manifest:
    """gradprune.json: everything `gradprune compress` did, with the numbers, in one record."""

    schema_version: int = _f(SCHEMA_VERSION, "version of this schema")
    tool: str = _f("gradprune-deploy", "the writer")
    method: str | None = _f(None, "GradPruner (ICLR 2026), or the baseline scorer used")
    base_model: str | None = _f(None, "--model as given")
    base_model_id: str | None = _f(None, "the base model's Hub id, when known")
    architecture: str | None = _f(None, "transformers class, e.g. LlamaForCausalLM")
    model_type: str | None = _f(None, "config.model_type")
    data: DataRecord = _f(None, "training data and validation hold-out", init=True)
    scorer: str = _f("igia", "layer-importance metric")
    layer_scores: list[float] = _f([], "one per original layer; higher = more important")
    removal_order: list[int] = _f([], "layers from least to most important")
    budget: dict[str, Any] = _f({}, "the requested cut (ratio, count, params, quality budget, protections)")
    num_layers_before: int = _f(0, "decoder layers before")
    num_layers_after: int = _f(0, "decoder layers after")
    layers_dropped: list[int] = _f([], "original indices removed")
    layers_kept: list[int] = _f([], "original indices kept, in order (renumbered 0..n-1)")
    params_before: int = _f(0, "parameters before")
    params_after: int = _f(0, "parameters after")
    params_per_layer: list[int] = _f([], "parameters of each original layer")
    scoring: dict[str, Any] = _f({}, "probe or scorer statistics (steps, seconds, overhead)")
    proposals: list[ProposalRecord] = _f([], "--scorer auto / --drop-layers auto: every candidate cut and its numbers")
    merge: MergeRecord = _f(None, "the same-sign merge")
    finetune: FinetuneRecord = _f(None, "the recovery fine-tune")
    compensation: CompensationRecord | None = _f(
        None, "--compensate: layers corrected, mean-shift norms before/after on the calibration rows (None without it)"
    )
    quality: QualityLedger | None = _f(None, "held-out quality before and after (None with --no-ledger)")
    seed: int = _f(0, "random seed")
    world_size: int = _f(1, "processes (DDP)")
    command: str = _f("", "the command line that made it")
    config: dict[str, Any] = _f({}, "the whole CompressConfig")
    timings: dict[str, float] = _f({}, "seconds per phase")
    versions: dict[str, str] = _f({}, "python and library versions")

    def __post_init__(self):
        self.data = self.data or DataRecord()
        self.merge = self.merge or MergeRecord()
        self.finetune = self.finetune or FinetuneRecord()

    # ── serialisation ────────────────────────────────────────────────────
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    @classmethod
    def from_dict(cls, record: dict[str, Any], *, where: str = MANIFEST_NAME) -> Manifest:
        version = record.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise GradPruneError(
                f"{where}: schema_version {version!r} is newer than this gradprune-deploy reads "
                f"({SCHEMA_VERSION}): upgrade gradprune-deploy"
            )
        if version == 1:
            record = _upgrade_v1(record)
        try:
            return _build(cls, record)
        except (TypeError, ValueError) as exc:
            raise GradPruneError(f"{where}: does not match the manifest schema ({exc}): rewrite it with `gradprune compress`") from None

    @classmethod
    def from_json(cls, text: str, *, where: str = MANIFEST_NAME) -> Manifest:
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GradPruneError(f"{where} is not valid JSON ({exc.msg}): the manifest is corrupt") from None
        if not isinstance(record, dict):
            raise GradPruneError(f"{where}: expected a JSON object: the manifest is corrupt")
        return cls.from_dict(record, where=where)

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        self.versions = self.versions or environment_versions()
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise GradPruneError(f"{path} not found: this is not a checkpoint written by `gradprune compress`")
        return cls.from_json(path.read_text(), where=str(path))

    @classmethod
    def read_optional(cls, directory: str | Path) -> Manifest | None:
        return cls.read(directory) if (Path(directory) / MANIFEST_NAME).is_file() else None

    # ── one compress run → its record ────────────────────────────────────
    @classmethod
    def from_run(
        cls,
        config: Any,
        *,
        model: Any,
        data: DataRecord,
        scorer: str,
        layer_scores: list[float],
        removal_order: list[int],
        scoring: dict[str, Any],
        params_per_layer: list[int],
        params: tuple[int, int],
        dropped: list[int],
        proposals: list[ProposalRecord],
        merge: MergeRecord,
        finetune: FinetuneRecord,
        compensation: CompensationRecord | None,
        quality: QualityLedger | None,
        world_size: int,
    ) -> Manifest:
        """The record of one `gradprune compress` run: `config` is its CompressConfig, `model` the
        pruned model, the rest what the steps returned (`params`: before and after the cut)."""
        num_layers = len(layer_scores)
        return cls(
            method="GradPruner (ICLR 2026)" if scorer == "igia" else f"layer pruning by {scorer}",
            base_model=config.model,
            base_model_id=KNOWN_HUB_IDS.get(config.model, _hub_id_or_none(config.model)),
            architecture=type(model).__name__,
            model_type=model.config.model_type,
            data=data,
            scorer=scorer if config.scorer != "auto" else f"auto → {scorer}",
            layer_scores=[float(s) for s in layer_scores],
            removal_order=removal_order,
            budget={name: getattr(config, name) for name in BUDGET_FIELDS},
            num_layers_before=num_layers,
            num_layers_after=num_layers - len(dropped),
            layers_dropped=list(dropped),
            layers_kept=[i for i in range(num_layers) if i not in dropped],
            params_before=params[0],
            params_after=params[1],
            params_per_layer=params_per_layer,
            scoring=scoring,
            proposals=proposals,
            merge=dataclasses.replace(
                merge,
                layers_requested=config.merge_layers,
                criterion=merge.criterion if merge.enabled else config.merge_criterion,
                keep_top_p=config.keep_top_p if merge.enabled else None,
            ),
            finetune=finetune,
            compensation=compensation,
            quality=quality,
            seed=config.seed,
            world_size=world_size,
            command=command_line(),
            config=dataclasses.asdict(config),
        )

    # ── derived facts every reader wants ─────────────────────────────────
    @property
    def hub_base_model(self) -> str | None:
        return self.base_model_id or KNOWN_HUB_IDS.get(self.base_model or "")

    @property
    def hub_dataset(self) -> str | None:
        return KNOWN_DATASET_IDS.get(self.data.source or "")

    @property
    def final_quality(self) -> QualityPoint | None:
        """The ledger point measured on the model this checkpoint holds."""
        if not self.quality:
            return None
        return self.quality.point("recovered" if self.finetune.mode != "none" else "pruned")


_NESTED = {
    "data": DataRecord,
    "merge": MergeRecord,
    "finetune": FinetuneRecord,
    "quality": QualityLedger,
    "compensation": CompensationRecord,
}


def _hub_id_or_none(model: str) -> str | None:
    """--model when it reads as a Hub id (owner/name, not a local path), else None."""
    return model if "/" in model and not Path(model).exists() else None


def _build(cls, record: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(record) - names)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}")
    values = dict(record)
    if cls is Manifest:
        for key, nested in _NESTED.items():
            if isinstance(values.get(key), dict):
                values[key] = _build(nested, values[key])
        values["proposals"] = [_build(ProposalRecord, p) for p in values.get("proposals") or []]
    if cls is QualityLedger:
        values["points"] = [_build(QualityPoint, p) for p in values.get("points") or []]
    if cls is ProposalRecord:
        values.update({k: _build(QualityPoint, values[k]) for k in ("raw", "healed") if isinstance(values.get(k), dict)})
    return cls(**values)


def _upgrade_v1(old: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 (flat dict, gradprune-deploy 0.1) → schema 2."""
    new = {k: v for k, v in old.items() if k in {f.name for f in dataclasses.fields(Manifest)}}
    new["schema_version"] = SCHEMA_VERSION
    new["scoring"] = old.get("probe") or old.get("scoring") or {}
    data = old.get("data") or {}
    new["data"] = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(DataRecord)}}
    merge = old.get("merge") or {}
    new["merge"] = {k: v for k, v in merge.items() if k in {f.name for f in dataclasses.fields(MergeRecord)}}
    if merge.get("enabled"):
        new["merge"].setdefault("layers_requested", "all")
    ft = old.get("finetune") or {}
    ft_fields = {f.name for f in dataclasses.fields(FinetuneRecord)}
    new["finetune"] = {k: v for k, v in ft.items() if k in ft_fields}
    new["finetune"]["settings"] = {k: v for k, v in ft.items() if k not in ft_fields}
    return new


def environment_versions() -> dict[str, str]:
    md = importlib.metadata
    versions = {"python": platform.python_version()}
    for dist in ("gradprune-deploy", "torch", "transformers", "peft", "accelerate"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def command_line() -> str:
    prog = Path(sys.argv[0]).name
    if prog in ("gradprune", "cli.py", "__main__.py", "-m"):
        return shlex.join(["gradprune", *sys.argv[1:]])
    return shlex.join([prog, *sys.argv[1:]])


def quality_table(ledger: QualityLedger) -> list[str]:
    """The ledger as aligned text lines (inspect and the compress summary print them)."""
    has_acc = any(p.accuracy is not None for p in ledger.points)
    lines = [
        f"held-out quality on {ledger.rows} validation rows ({ledger.validation}):",
        f"  {'stage':<16} {'loss':>8} {'ppl':>9}" + (f" {'accuracy':>16}" if has_acc else ""),
    ]
    for p in ledger.points:
        acc = (
            (f" {100 * p.accuracy:>8.1f} ± {100 * (p.accuracy_se or 0):.1f}" if p.accuracy is not None else f" {'–':>16}")
            if has_acc
            else ""
        )
        lines.append(f"  {p.stage:<16} {_fmt(p.loss):>8} {_fmt(p.perplexity, '.2f'):>9}{acc}")
    if ledger.verdict:
        lines.append(("  WARNING: " if ledger.warning else "  ") + ledger.verdict)
    return lines


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
        lines.append(
            f"probe           {m.scoring.get('probe_steps')} informative steps (+{m.scoring.get('zero_gradient_steps')} "
            f"zero-gradient), {m.scoring.get('seconds', 0):.1f} s"
        )
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
