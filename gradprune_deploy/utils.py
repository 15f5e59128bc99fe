"""Small shared helpers: progress bars with an env switch, optional-dependency checks, atomic output,
process memory (the one /proc reader)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm as _tqdm

from .errors import GradPruneError, MissingDependencyError, OutputExistsError, first_line, raise_if_interrupted

logger = logging.getLogger(__name__)


def progress_disabled() -> bool:
    """GRADPRUNE_DISABLE_PROGRESS_BARS=1 silences every bar (the huggingface_hub convention)."""
    return os.environ.get("GRADPRUNE_DISABLE_PROGRESS_BARS", "0").lower() in ("1", "true", "yes")


def tqdm(*args, **kwargs):
    """tqdm that honours GRADPRUNE_DISABLE_PROGRESS_BARS."""
    kwargs.setdefault("disable", progress_disabled())
    return _tqdm(*args, **kwargs)


def process_memory(pid: int | None = None) -> dict[str, int | str] | None:
    """One process's memory as /proc/<pid>/status tells it: {"name", "rss_bytes" (now), "peak_rss_bytes"
    (VmHWM, its own high-water RSS since exec)}; this process when pid is None; None when /proc cannot tell
    (no such process, or not Linux). The one /proc memory reader: peak_rss_mb, the bench workers and the
    vLLM process-tree sampler all read through it."""
    fields: dict[str, str] = {}
    try:
        for line in Path(f"/proc/{'self' if pid is None else pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return {
            "name": fields.get("Name", "?"),
            "rss_bytes": int(fields["VmRSS"].split()[0]) * 1024,  # kB
            "peak_rss_bytes": int(fields["VmHWM"].split()[0]) * 1024,
        }
    except (OSError, KeyError, ValueError, IndexError):  # gone, unreadable, or a kernel thread / zombie (no Vm* lines)
        return None


def peak_rss_mb(pid: int | None = None) -> float | None:
    """VmHWM, a process's own high-water RSS since exec, in MiB (this process when pid is None);
    None when /proc cannot tell. Not ru_maxrss, which Linux carries over from the parent across
    fork + exec (a parent that exported ONNX at 2 GiB would hand its peak to every child)."""
    memory = process_memory(pid)
    return memory["peak_rss_bytes"] / 2**20 if memory else None


def reset_peak_rss() -> bool:
    """Reset this process's high-water RSS (VmHWM) to its current RSS, so peak_rss_mb() reads the peak
    from now on (Linux: "5" written to /proc/self/clear_refs). False where /proc cannot (not Linux, or
    not writable): VmHWM then stays the peak since the process started."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def process_tree_pids(pid: int) -> list[int]:
    """`pid` and all its descendants (psutil if installed, else /proc); [] when `pid` is gone."""
    try:
        import psutil  # noqa: PLC0415 - optional, not a dependency: /proc below otherwise
    except ImportError:
        return _proc_tree_pids(pid)
    try:
        return [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _proc_tree_pids(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def is_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, extra: str) -> None:
    """Raise a one-line error naming the extra that provides `module`."""
    if not is_available(module):
        raise MissingDependencyError(f"`{module}` is not installed: pip install 'gradprune-deploy[{extra}]'")


def optional_import(module: str, extra: str) -> types.ModuleType:
    """Import a heavy optional dependency (vllm, onnxruntime, onnx, matplotlib, lm_eval) where it is
    used, raising one line that names the extra to install when it is missing. The one lazy import:
    everything else, the project's own modules included, is imported at the top of its file."""
    require(module, extra)
    return importlib.import_module(module)


def read_json_object(path: str | os.PathLike, error: type[GradPruneError], *, fix: str = "the checkpoint is corrupt") -> dict:
    """A JSON file that must hold an object (config.json, the tokenizer's files): its dict, or one
    `error` line naming the file: not UTF-8, not JSON, nested past Python's limits, or not an object."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start}): {fix}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}): {fix}") from None
    except RecursionError:
        raise error(f"{path} is nested too deeply to be read: {fix}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got a {type(value).__name__}: {fix}")
    return value


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def resolve_path(path: str | os.PathLike, flag: str) -> Path:
    """`path` absolute, with `~` and every symlink resolved; a symlink loop is one line naming `flag`."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: "Symlink loop" (Python < 3.13), OSError ELOOP after
        raise OutputExistsError(
            f"{flag} {path}: cannot be resolved ({first_line(exc)}): a symlink loop? fix or choose another {flag}"
        ) from None


def check_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool,
    flag: str = "--out",
    inputs: dict[str, str | os.PathLike | None] | None = None,
    may_hold_out: tuple[str, ...] = (),
) -> Path:
    """Refuse, before any work, an output that cannot be written or would be clobbered.

    An existing non-empty output needs `overwrite`; a path that exists but is not a directory (a
    file, a FIFO), one under a regular file, one under a directory this process cannot write, or a
    symlink loop is refused naming `flag`; so is one that is, contains or sits inside one of `inputs`
    ({flag: path}, see check_apart_from_inputs), with or without `overwrite`. Returns the absolute Path.
    """
    if out is None or str(out) == "":
        raise OutputExistsError(f"{flag} is required")
    out = resolve_path(out, flag)
    check_apart_from_inputs(out, inputs or {}, flag=flag, may_hold_out=may_hold_out)
    if out.exists() and not out.is_dir():
        kind = "a file" if out.is_file() else "not a directory"
        raise OutputExistsError(f"{flag} {out} is {kind}: choose a directory (a new or an empty one) for {flag}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{flag} {out} already exists: choose another {flag} or pass --overwrite")
    anchor = _first_existing(out.parent)
    if not anchor.is_dir():
        raise OutputExistsError(f"{flag} {out}: {anchor} is a file, not a directory: choose another {flag}")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{flag} {out}: cannot write in {anchor} (permission denied): choose a writable {flag}")
    return out


def check_apart_from_inputs(
    out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], *, flag: str = "--out", may_hold_out: tuple[str, ...] = ()
) -> None:
    """Refuse an output that is, contains, or sits inside one of `inputs` ({flag: path}), whatever
    --overwrite says: an output is replaced as a whole, so `--out` = `--model` would replace the model,
    and an `--out` inside `--data` would write into the data. Paths are compared with every symlink
    resolved. Inputs that are not local paths (bundled:..., Hub ids) are skipped; an input named in
    `may_hold_out` may hold the output inside it (bench reports go to PRUNED/bench by default)."""
    target = resolve_path(out, flag)
    for name, value in inputs.items():
        if not value or not Path(value).expanduser().exists():
            continue
        source = resolve_path(value, name)
        if target == source:
            relation = "is"
        elif source.is_relative_to(target):
            relation = "contains"
        elif target.is_relative_to(source) and name not in may_hold_out:
            relation = "is inside"
        else:
            continue
        raise OutputExistsError(
            f"{flag} {target} {relation} the input {name} {source}: an output never replaces or writes into an input "
            f"(--overwrite included): choose an {flag} outside it"
        )


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, overwrite: bool, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success rename it to `out`.

    Enter it first, before any slow work: creating the sibling proves `out` is writable. On any
    exception — SIGINT and SIGTERM included (the CLI turns both into an exception) — the
    temporary directory, and any parent directory created for it, is removed and `out` is left
    exactly as it was, so a failed run never leaves a half-written or clobbered output.
    """
    out = check_output_dir(out, overwrite=overwrite, flag=flag)
    created = []  # parents made here, removed again on failure
    for parent in reversed(out.parents):
        if not parent.exists():
            created.append(parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        _remove_empty(created)
        raise OutputExistsError(f"{flag} {out}: cannot create it ({exc.strerror}): choose a writable {flag}") from None
    try:
        yield tmp
        raise_if_interrupted()  # never publish a run that a (swallowed) signal stopped
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
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


def _remove_empty(directories: list[Path]) -> None:
    for directory in reversed(directories):  # deepest first
        with contextlib.suppress(OSError):
            directory.rmdir()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a file so that a reader (or a crash, or a signal) never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        raise_if_interrupted()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory that is removed however the block ends (exception or signal included)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
