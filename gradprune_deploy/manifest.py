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
import math
import platform
import shlex
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundled import KNOWN_DATASET_IDS, KNOWN_HUB_IDS  # re-exported: readers import them from here
from .config_schema import check_value
from .errors import ConfigError, GradPruneError
from .formatting import help_field as _f
from .layout import MANIFEST
from .utils import read_json_object

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
    mix: dict[str, Any] | None = _f(None, "--mix-data: source, ratio, completions, pool rows, rows added to the recovery")


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
class GenerationQuality:
    """Greedy answers of one model to the first held-out prompts: do they loop, do they answer?"""

    rows: int = _f(0, "held-out prompts answered (the first --ledger-generate rows)")
    max_new_tokens: int = _f(0, "tokens generated at most per answer")
    mean_tokens: float = _f(0.0, "mean answer length in tokens")
    repeated_4gram_rate: float | None = _f(None, "within each answer, the fraction of 4-grams repeating an earlier one (pooled; loop → 1)")
    distinct_2: float | None = _f(None, "unique 2-grams / 2-grams over all answers")
    exact_match: float | None = _f(None, "answers matching the reference completion (gradprune eval --metric exact's rule)")
    examples: list[dict[str, str]] = _f([], "the first answers verbatim: prompt, reference, answer")


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
    generation: GenerationQuality | None = _f(None, "greedy answers to the first held-out prompts (None with --ledger-generate 0)")


@dataclass
class QualityLedger:
    """What the pruned checkpoint is worth, measured on held-out rows at every stage."""

    validation: str | None = _f(None, "where the rows came from")
    rows: int = _f(0, "validation rows")
    points: list[QualityPoint] = _f([], "one per stage, in pipeline order")
    general_validation: str | None = _f(None, "--mix-data: where the general held-out rows came from")
    general_points: list[QualityPoint] = _f([], "--mix-data: the same stages on the general held-out rows")
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
class ArtefactRecord:
    """A derived artefact of the checkpoint (ONNX, quantised ONNX, GGUF): what it is, how close it stays to
    the checkpoint it was made from, and its quality on the checkpoint's own held-out ledger rows."""

    stage: str = _f("", "its ledger stage name: <format>-<quantization>, e.g. onnx-int4, gguf-q8_0")
    format: str = _f("", "onnx or gguf")
    quantization: str = _f("", "float32, float16, int4, int8, f16, q8_0, ...")
    files: list[str] = _f([], "the artefact's files, relative to its folder")
    size_bytes: int = _f(0, "bytes of those files")
    source: str = _f("", "the checkpoint it was made from, as given")
    settings: dict[str, Any] = _f({}, "how it was made (quantiser, block size, opset, ...)")
    validation: dict[str, Any] = _f({}, "against the source model on fixed prompts: greedy-token agreement, max |Δ logits|, thresholds")
    quality: QualityPoint | None = _f(None, "on the checkpoint's held-out ledger rows (None when the checkpoint has no ledger)")


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
    artefacts: list[ArtefactRecord] = _f([], "derived artefacts in this folder (an export's copy of the manifest), each with its quality")
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
        return cls.from_dict(read_json_object(path, GradPruneError, fix="the manifest is corrupt"), where=str(path))  # UTF-8 JSON object

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
    if not isinstance(record, dict):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(record).__name__}")
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
        values["artefacts"] = [_build(ArtefactRecord, a) for a in values.get("artefacts") or []]
    if cls is ArtefactRecord and isinstance(values.get("quality"), dict):
        values["quality"] = _build(QualityPoint, values["quality"])
    if cls is QualityLedger:
        values["points"] = [_build(QualityPoint, p) for p in values.get("points") or []]
        values["general_points"] = [_build(QualityPoint, p) for p in values.get("general_points") or []]
    if cls is QualityPoint and isinstance(values.get("generation"), dict):
        values["generation"] = _build(GenerationQuality, values["generation"])
    if cls is ProposalRecord:
        values.update({k: _build(QualityPoint, values[k]) for k in ("raw", "healed") if isinstance(values.get(k), dict)})
    return cls(**_typed(cls, values))


def _typed(cls, values: dict[str, Any]) -> dict[str, Any]:
    """`values` checked against `cls`'s annotations (the config schema's check, plus records and dicts):
    a wrong type in a field is a ValueError naming it, not a crash in a later reader."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    checked = {}
    for name, value in values.items():
        where = f"{cls.__name__}.{name}"
        inner = typing.get_args(hints[name]) if typing.get_origin(hints[name]) in (typing.Union, types.UnionType) else ()
        tp = next((a for a in inner if a is not type(None)), hints[name])
        if value is None or not (dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict):
            probe = _nan_as_zero(value)  # a NaN loss or score is a record of what happened, not a wrong type
            try:
                result = check_value(where, hints[name], probe, none_ok=fields[name].default is None)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            checked[name] = value if probe != value else result
        elif not isinstance(value, tp if dataclasses.is_dataclass(tp) else dict):
            wanted = tp.__name__ if dataclasses.is_dataclass(tp) else "an object"
            raise ValueError(f"{where}: expected {wanted}, got {type(value).__name__}")
        else:
            checked[name] = value
    return checked


def _nan_as_zero(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return 0.0
    return [_nan_as_zero(v) for v in value] if isinstance(value, list) else value


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
