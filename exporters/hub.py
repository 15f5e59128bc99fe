"""Publish a compressed checkpoint to the Hugging Face Hub (or any Hub-protocol endpoint).

One commit holds the checkpoint directory as it is plus a generated README.md (the model card,
see model_card.py), with local absolute paths in gradprune.json reduced to their last component;
the checkpoint directory itself is never modified. The token comes from
`token=`, else `HF_TOKEN`, else the login cache (`hf auth login`); it is never logged, printed or
written anywhere, and the card is scrubbed of anything token-like.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError

from gradprune_deploy.checkpoint import CheckpointInfo, inspect_checkpoint
from gradprune_deploy.config_schema import validate_fields
from gradprune_deploy.errors import ConfigError, ExportError, first_line
from gradprune_deploy.layout import MANIFEST
from gradprune_deploy.manifest import ArtefactRecord
from gradprune_deploy.verify import verify_checkpoint

from .hub_artefacts import BUILDERS, build_artefacts, card_manifest, parse_artefacts
from .model_card import build_card_text, redact

try:
    import httpx2 as httpx
except ImportError:  # older huggingface_hub releases use httpx
    import httpx

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9_.-]{1,96}$")
# Never uploaded: hidden files, caches, and anything a crashed run may have left half-written.
_SKIP = re.compile(r"(^|/)(\.|__pycache__/)|\.tmp($|-)|\.lock$")


def validate_repo_id(repo_id: str | None) -> str:
    if not repo_id:
        raise ConfigError("--repo-id is required: give NAMESPACE/NAME, e.g. your-user/smollm2-gradpruned")
    if not _REPO_ID.match(repo_id) or repo_id.endswith(".git"):
        raise ConfigError(
            f"invalid repo id {repo_id!r}: use NAMESPACE/NAME with letters, digits, '-', '_' or '.' "
            "(no '--' or '..', at most 96 characters each), e.g. your-user/smollm2-gradpruned"
        )
    return repo_id


@dataclass
class HubExportConfig:
    """Push a checkpoint directory and a generated model card to the Hub in one commit.

    The token is read from HF_TOKEN or the `hf auth login` cache; prefer those to --token, which
    can end up in your shell history.
    """

    checkpoint: str = field(metadata={"positional": True, "help": "compressed checkpoint directory"})
    repo_id: str | None = field(default=None, metadata={"help": "target repo, NAMESPACE/NAME (created if missing)"})
    private: bool = field(default=False, metadata={"help": "create the repo as private"})
    revision: str | None = field(default=None, metadata={"help": "branch to commit to (created from main if missing; default main)"})
    commit_message: str | None = field(default=None, metadata={"help": "commit message (default: 'Upload <name> (gradprune)')"})
    token: str | None = field(default=None, repr=False, metadata={"help": "Hub token (default: HF_TOKEN or the login cache)"})
    endpoint: str | None = field(default=None, metadata={"help": "Hub URL (default: HF_ENDPOINT or https://huggingface.co)"})
    with_artefacts: list[str] | None = field(
        default=None,
        metadata={
            "flag": "--with",
            "help": f"also build, validate, score and publish these in the same commit, each in its own folder: {', '.join(BUILDERS)}",
        },
    )

    def __post_init__(self):
        validate_fields(self)
        validate_repo_id(self.repo_id)
        self.with_artefacts = parse_artefacts(self.with_artefacts) or None


def _resolve_token(token: str | None) -> str:
    token = token or huggingface_hub.get_token()  # HF_TOKEN, then the `hf auth login` cache (looked up when called)
    if not token:
        raise ConfigError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass --token (nothing was uploaded)")
    return token


def _resolve_endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def build_model_card(checkpoint_dir: str | os.PathLike, *, repo_id: str) -> ModelCard:
    """The generated model card (huggingface_hub.ModelCard) for `checkpoint_dir`; reads files only."""
    return ModelCard(build_card_text(inspect_checkpoint(checkpoint_dir), repo_id=validate_repo_id(repo_id)))


def files_to_upload(checkpoint_dir: Path) -> list[str]:
    """Relative paths of the files to upload (README.md is replaced by the generated card)."""
    out = []
    for path in sorted(checkpoint_dir.rglob("*")):
        rel = path.relative_to(checkpoint_dir).as_posix()
        if path.is_file() and not _SKIP.search(rel) and rel != "README.md":
            out.append(rel)
    return out


def _explain(exc: Exception, *, endpoint: str, repo_id: str, token: str) -> ExportError:
    """One line naming the fix, without the token (HTTP errors can quote request details)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status == 401:
        msg = f"the Hub at {endpoint} rejected the token (401): check HF_TOKEN / `hf auth login` / --token"
    elif isinstance(exc, HfHubHTTPError) and status == 403:
        msg = f"the token cannot write to {repo_id} (403): use a token with write access to that namespace"
    elif isinstance(exc, HfHubHTTPError):
        msg = f"the Hub at {endpoint} refused the push ({first_line(exc)})"
    elif "xet-write-token" in str(exc) or "xet-read-token" in str(exc):
        msg = (
            f"the Hub at {endpoint} does not offer Xet storage: set HF_HUB_DISABLE_XET=1 to upload over plain HTTP/LFS; no commit was made"
        )
    elif _is_network_error(exc):
        msg = f"cannot reach the Hub at {endpoint} ({type(exc).__name__}): check the network, HF_ENDPOINT or --endpoint; no commit was made"
    else:
        msg = f"push to {repo_id} failed: {first_line(exc)}"
    return ExportError(redact(msg, token))


def _is_network_error(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_LOCAL_PATH = re.compile(r"(?<![\w:/.~-])(?:~/|/)(?:[^\s/\"',]+/)+([^\s/\"',]*)")


def public_manifest(text: str) -> str:
    """gradprune.json as uploaded: every local absolute path (data, model, --out, the command line)
    reduced to its last component, so a public repo does not publish the user's directory layout."""
    return _LOCAL_PATH.sub(lambda m: m.group(1) or ".", text)


def _commit_operations(
    info: CheckpointInfo, *, repo_id: str, token: str, artefacts: dict[str, ArtefactRecord] | None = None, workdir: Path | None = None
) -> tuple[list[CommitOperationAdd], int]:
    """The generated card plus every checkpoint file (gradprune.json with local paths reduced) and every
    built artefact's files under its own folder, and the bytes uploaded; refuses a file that holds the token."""
    artefacts = artefacts or {}
    card = build_card_text(info, repo_id=repo_id, secrets=(token,), manifest=card_manifest(info.manifest, artefacts) if artefacts else None)
    uploads = [(rel, info.path / rel) for rel in files_to_upload(info.path)]
    for name in artefacts:
        uploads += [(f"{name}/{rel}", workdir / name / rel) for rel in files_to_upload(workdir / name)]
    for _, path in uploads:  # a token must never travel inside an uploaded file
        if path.stat().st_size < 50_000_000 and token.encode() in path.read_bytes():
            raise ExportError(f"{path} contains the Hub token: remove it before pushing (nothing was uploaded)")
    operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode())]
    operations += [
        CommitOperationAdd(
            path_in_repo=rel,
            path_or_fileobj=public_manifest(path.read_text()).encode() if path.name == MANIFEST else str(path),
        )
        for rel, path in uploads
    ]
    return operations, sum(path.stat().st_size for _, path in uploads)


def export_hub(config: HubExportConfig) -> str:
    """`gradprune export hub`: create the repo if needed and commit the checkpoint + model card in one
    commit; return the commit URL.

    Everything that can be checked locally (repo id, token, the whole checkpoint read and verified,
    card) is checked before the first request, so a bad input uploads nothing.
    """
    repo_id = validate_repo_id(config.repo_id)
    info = verify_checkpoint(config.checkpoint).info  # never publish a truncated file, a NaN tensor or a missing tokenizer
    token = _resolve_token(config.token)
    endpoint = _resolve_endpoint(config.endpoint)
    with tempfile.TemporaryDirectory(prefix="gradprune-hub-") as tmp:
        artefacts = build_artefacts(info.path, config.with_artefacts or [], Path(tmp))  # each validated and scored, or refused
        operations, size = _commit_operations(info, repo_id=repo_id, token=token, artefacts=artefacts, workdir=Path(tmp))
        return _push(config, info, operations, size, repo_id=repo_id, token=token, endpoint=endpoint)


def _push(config: HubExportConfig, info: CheckpointInfo, operations, size: int, *, repo_id: str, token: str, endpoint: str) -> str:
    message = config.commit_message or f"Upload {info.path.name} (gradprune)"

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=config.private, exist_ok=True, repo_type="model")
        if config.revision and config.revision != "main":
            api.create_branch(repo_id, branch=config.revision, exist_ok=True)
        logger.info("pushing %d files (%.1f MB) to %s/%s", len(operations), size / 1e6, endpoint, repo_id)
        commit = api.create_commit(repo_id, operations=operations, commit_message=message, revision=config.revision, repo_type="model")
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line naming the fix
        raise _explain(exc, endpoint=endpoint, repo_id=repo_id, token=token) from None
    logger.info("pushed %s: %s", repo_id, commit.commit_url)
    return commit.commit_url
