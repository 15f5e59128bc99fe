"""Greedy generation with onnxruntime over a `gradprune export onnx` directory.

The export holds one graph, `model.onnx`, that takes `input_ids`, `attention_mask`, `position_ids`
and the KV cache of every layer (`input.past_key_values.layers.N.keys/values`) and returns
`logits` and the grown cache (`output.past_key_values.layers.N.keys/values`). Prefill is that
graph with an empty cache (past length 0); each decode step feeds one token per sequence and the
cache from the step before. Batch, prompt length and past length are all dynamic.

    lm = OnnxCausalLM("exported/")                       # provider="cuda" with onnxruntime-gpu
    new_tokens = lm.generate(ids, attention_mask, max_new_tokens=32)
    lm.last_timings.ttft_s, lm.last_timings.tpot_s       # prefill vs per-token decode time

Greedy decoding follows transformers' `generate(do_sample=False)` exactly: a sequence that emits
EOS keeps receiving the pad token, and generation stops when every sequence has finished.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MissingDependencyError, ModelLoadError
from ..layout import ONNX_GRAPH, ONNX_METADATA
from ..utils import optional_import

logger = logging.getLogger(__name__)

_PAST = re.compile(r"past_key_values\.layers\.(\d+)\.(keys|values)$")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass
class GenerationTimings:
    """Wall-clock seconds of the last `generate` call: the prefill run and each decode step."""

    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        """Time to first token: the prefill graph run plus choosing the token."""
        return self.prefill_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None when only one token was generated)."""
        return sum(self.decode_s) / len(self.decode_s) if self.decode_s else None


@dataclass
class DecodeState:
    """What the next decode step needs: the cache, the attention mask so far, who has finished."""

    cache: list[np.ndarray]
    attention_mask: np.ndarray
    finished: np.ndarray


def _providers(provider: str) -> list[str]:
    available = optional_import("onnxruntime", "onnx").get_available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise MissingDependencyError(
                "onnxruntime has no CUDA provider here: pip install 'gradprune-deploy[onnx-gpu]' "
                f"(onnxruntime-gpu) on a machine with a CUDA GPU (available: {', '.join(available)})"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"unknown provider {provider!r}: use 'cpu' or 'cuda'")


def positions_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids as transformers' generate makes them: cumsum(mask) - 1, padding set to 1 (masked anyway)."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)


class OnnxCausalLM:
    """A causal LM exported by `gradprune export onnx`, run with onnxruntime (greedy, KV cache)."""

    def __init__(self, export_dir: str | os.PathLike, provider: str = "cpu", *, intra_op_threads: int | None = None):
        ort = optional_import("onnxruntime", "onnx")
        self.export_dir = Path(export_dir)
        graph = self.export_dir / ONNX_GRAPH
        if not graph.is_file():
            raise ModelLoadError(f"{graph} not found: pass a directory written by `gradprune export onnx`")
        meta_path = self.export_dir / ONNX_METADATA
        self.metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(str(graph), sess_options=options, providers=_providers(provider))
        self.provider = provider
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._past_names = sorted((n for n in inputs if _PAST.search(n)), key=self._cache_key)
        self._present_names = sorted((o.name for o in self.session.get_outputs() if _PAST.search(o.name)), key=self._cache_key)
        if not self._past_names or len(self._past_names) != len(self._present_names):
            raise ModelLoadError(f"{graph} has no KV-cache inputs/outputs: re-export it with `gradprune export onnx`")
        first = inputs[self._past_names[0]]
        self.num_layers = len(self._past_names) // 2
        self.num_kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.cache_dtype = _ORT_DTYPES.get(first.type, np.float32)
        self._output_names = ["logits", *self._present_names]
        gen = self.metadata.get("generation", {})
        self.eos_token_id = gen.get("eos_token_id")
        self.pad_token_id = gen.get("pad_token_id")
        self.last_timings = GenerationTimings()

    @staticmethod
    def _cache_key(name: str) -> tuple[int, int]:
        m = _PAST.search(name)
        return int(m.group(1)), 0 if m.group(2) == "keys" else 1

    # ── graph runs ────────────────────────────────────────────────────────
    def _run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feed.update(zip(self._past_names, cache))
        logits, *present = self.session.run(self._output_names, feed)
        return logits, present

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.cache_dtype) for _ in self._past_names]

    @staticmethod
    def _as_batch(input_ids, attention_mask, pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Arrays from arrays or (possibly ragged) lists; ragged lists are left-padded."""
        if isinstance(input_ids, np.ndarray) or (input_ids and not isinstance(input_ids[0], (list, tuple, np.ndarray))):
            ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
            mask = np.ones_like(ids) if attention_mask is None else np.atleast_2d(np.asarray(attention_mask, dtype=np.int64))
            return ids, mask
        width = max(len(seq) for seq in input_ids)
        ids = np.full((len(input_ids), width), pad_token_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, seq in enumerate(input_ids):
            ids[row, width - len(seq) :] = seq
            mask[row, width - len(seq) :] = 1 if attention_mask is None else attention_mask[row]
        return ids, mask

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """Logits for every position of the (left-padded) batch: one prefill run, float32."""
        ids, mask = self._as_batch(input_ids, attention_mask, self.pad_token_id or 0)
        logits, _ = self._run(ids, mask, positions_from_mask(mask), self.empty_cache(ids.shape[0]))
        return logits.astype(np.float32)

    def prefill(self, input_ids, attention_mask=None) -> tuple[np.ndarray, DecodeState]:
        """Run the prompt; return the last position's logits (batch × vocab) and the decode state."""
        ids, mask = self._as_batch(input_ids, attention_mask, self.pad_token_id or 0)
        logits, cache = self._run(ids, mask, positions_from_mask(mask), self.empty_cache(ids.shape[0]))
        return logits[:, -1].astype(np.float32), DecodeState(cache, mask, np.zeros(ids.shape[0], dtype=bool))

    def decode(self, tokens: np.ndarray, state: DecodeState) -> np.ndarray:
        """Feed one token per sequence; return the next logits (batch × vocab); `state` is advanced."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        positions = state.attention_mask.sum(axis=-1, keepdims=True).astype(np.int64)
        state.attention_mask = np.concatenate([state.attention_mask, np.ones_like(tokens)], axis=-1)
        logits, state.cache = self._run(tokens, state.attention_mask, positions, state.cache)
        return logits[:, -1].astype(np.float32)

    def generate(
        self,
        input_ids,
        attention_mask=None,
        max_new_tokens: int = 32,
        *,
        eos_token_id: int | Sequence[int] | None = -1,
        pad_token_id: int | None = None,
    ) -> np.ndarray:
        """Greedy decoding; returns only the new tokens, batch × (≤ max_new_tokens), int64.

        `eos_token_id=-1` (default) uses the export's generation config; None never stops early.
        Timings of this call are left in `self.last_timings`.
        """
        eos = self.eos_token_id if eos_token_id == -1 else eos_token_id
        eos = np.asarray([] if eos is None else np.atleast_1d(eos), dtype=np.int64)
        pad = pad_token_id if pad_token_id is not None else (self.pad_token_id if self.pad_token_id is not None else 0)
        timings = GenerationTimings()
        start = time.perf_counter()
        logits, state = self.prefill(input_ids, attention_mask)
        out: list[np.ndarray] = []
        while True:
            token = np.where(state.finished, pad, logits.argmax(axis=-1)).astype(np.int64)
            if not out:
                timings.prefill_s = time.perf_counter() - start
            out.append(token)
            state.finished |= np.isin(token, eos)
            if len(out) >= max_new_tokens or state.finished.all():
                break
            start = time.perf_counter()
            logits = self.decode(token, state)
            timings.decode_s.append(time.perf_counter() - start)
        self.last_timings = timings
        return np.stack(out, axis=1)
