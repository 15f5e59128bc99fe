"""The vLLM backend of `gradprune eval --metric exact`: greedy generation through vLLM's
OpenAI-compatible server.

Choice of endpoint: `/v1/completions` with the prompt sent as TOKEN IDS — the very ids the
transformers backend feeds to `generate` (data.encode_prompt: chat template + generation
prompt). Sending text (to /v1/completions) or messages (to /v1/chat/completions) would let the
server re-tokenise or re-template, which can add a BOS token or differ at the template
boundary; ids rule that out, so the two backends see identical inputs. Generation is greedy
(`temperature=0`), the server returns the generated ids (`return_token_ids`), and both backends
cut at the first eos id and decode with the same tokenizer (`skip_special_tokens=True`).

The server comes from `gradprune_deploy.runtime.vllm_server.start_server(model_dir, ...)` (a context manager
yielding an object with `.base_url` and `.model`), or is an already running one (`server_url`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

from ..errors import ServingError
from ..runtime.vllm_server import start_server
from .hf import cut_at_eos

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 600


def api_root(base_url: str) -> str:
    """'http://host:port' from 'http://host:port', '.../' or '.../v1'."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _post_json(url: str, payload: dict, *, timeout: float = REQUEST_TIMEOUT_S) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise ServingError(f"vLLM server at {url} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise ServingError(f"vLLM server at {url} is not reachable ({exc}): check --server-url or that the server is up") from None


def served_model_name(base_url: str) -> str:
    """The first model an already running server serves (GET /v1/models)."""
    url = api_root(base_url) + "/v1/models"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            models = json.loads(response.read()).get("data", [])
    except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
        raise ServingError(f"no OpenAI-compatible server answers at {url} ({exc}): check --server-url") from None
    if not models:
        raise ServingError(f"the server at {base_url} serves no model")
    return models[0]["id"]


@contextlib.contextmanager
def vllm_endpoint(model_dir: str, *, server_url: str | None, dtype: str, max_model_len: int) -> Iterator[tuple[str, str]]:
    """Yield (base_url, served model name): the given server, or one started for `model_dir`."""
    if server_url:
        yield api_root(server_url), served_model_name(server_url)
        return
    with start_server(model_dir, dtype=dtype, max_model_len=max_model_len) as server:
        yield api_root(server.base_url), server.model


def vllm_greedy_generate(
    base_url: str, model_name: str, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_ids: Sequence[int]
) -> list[list[int]]:
    """Greedy continuations of token-id prompts in one request; eos and after removed."""
    payload = {
        "model": model_name,
        "prompt": [list(map(int, p)) for p in prompts],
        "max_tokens": max_new_tokens,
        "temperature": 0.0,
        "n": 1,
        "return_token_ids": True,
        "skip_special_tokens": True,
    }
    body = _post_json(api_root(base_url) + "/v1/completions", payload)
    choices = sorted(body.get("choices", []), key=lambda c: c["index"])
    if len(choices) != len(prompts):
        raise ServingError(f"vLLM returned {len(choices)} completions for {len(prompts)} prompts")
    outputs = []
    for choice in choices:
        token_ids = choice.get("token_ids")
        if token_ids is None:
            raise ServingError("the vLLM server did not return token ids (return_token_ids): use vLLM >= 0.10")
        outputs.append(cut_at_eos(token_ids, eos_ids))
    return outputs
