"""Small shared helpers: progress bars with an env switch, optional-dependency checks, atomic output."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import MissingDependencyError, OutputExistsError

logger = logging.getLogger(__name__)


def progress_disabled() -> bool:
    """GRADPRUNE_DISABLE_PROGRESS_BARS=1 silences every bar (the huggingface_hub convention)."""
    return os.environ.get("GRADPRUNE_DISABLE_PROGRESS_BARS", "0").lower() in ("1", "true", "yes")


def tqdm(*args, **kwargs):
    """tqdm that honours GRADPRUNE_DISABLE_PROGRESS_BARS."""
    from tqdm.auto import tqdm as _tqdm

    kwargs.setdefault("disable", progress_disabled())
    return _tqdm(*args, **kwargs)


def is_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, extra: str) -> None:
    """Raise a one-line error naming the extra that provides `module`."""
    if not is_available(module):
        raise MissingDependencyError(
            f"`{module}` is not installed: pip install 'gradprune-deploy[{extra}]'"
        )


def check_output_dir(out: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse an existing, non-empty output unless overwrite; return it as an absolute Path."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out} already exists: choose another --out or pass --overwrite")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success rename it to `out`.

    On any exception the temporary directory is removed and `out` is left as it was, so a
    failed run never leaves a half-written checkpoint behind.
    """
    out = check_output_dir(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        # Only reached with overwrite=True: move the old output aside, then swap in the new one.
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)
    logger.info("wrote %s", out)
