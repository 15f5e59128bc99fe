"""`gradprune`: one table of subcommands; each is a config dataclass + one library function.

The dataclass is the CLI (see config_schema.py) and the YAML recipe schema (`--config recipe.yaml`).
Only the chosen subcommand's modules are imported, so `gradprune --help` stays fast.
A GradPruneError (a bad input) becomes one `error: ...` line on stderr and exit status 2; SIGINT
and SIGTERM unwind through every clean-up and exit 130 / 143 (128 + the signal).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from . import __version__
from .config_schema import ArgumentParser, add_dataclass_arguments, build_config
from .errors import GradPruneError, Interrupted, raise_if_interrupted, record_signal


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its config dataclass (the CLI flags, the YAML recipe schema and the Python API's
    argument), the library function that takes that config, and how its result is shown."""

    config: type
    run: Callable[[Any], Any]
    present: Callable[[Any], str | None] = lambda result: _as_text(result)


# The command table. Each entry imports its command's modules only when that command runs, so
# `gradprune --help` stays fast; the imports are real statements, so the layering check sees them
# (this module is the composition root: the only one in gradprune_deploy that names exporters/serving).
def _compress() -> Command:
    from .compress.config import CompressConfig
    from .compress.pipeline import compress, present_compress

    return Command(CompressConfig, compress, present_compress)


def _inspect() -> Command:
    from .manifest_text import InspectConfig, inspect

    return Command(InspectConfig, inspect)


def _eval() -> Command:
    from .evaluation.evaluate import EvalConfig, evaluate

    return Command(EvalConfig, evaluate)


def _export_hub() -> Command:
    from exporters.hub import HubExportConfig, export_hub

    return Command(HubExportConfig, export_hub)


def _export_onnx() -> Command:
    from exporters.onnx import OnnxExportConfig, export_onnx, present_export_onnx

    return Command(OnnxExportConfig, export_onnx, present_export_onnx)


def _export_gguf() -> Command:
    from exporters.gguf import GgufExportConfig, export_gguf

    return Command(GgufExportConfig, export_gguf)


def _export_vllm() -> Command:
    from exporters.vllm import VllmExportConfig, export_vllm

    return Command(VllmExportConfig, export_vllm)


def _serve() -> Command:
    from serving.serve import ServeConfig, serve

    return Command(ServeConfig, serve)


def _bench() -> Command:
    from serving.bench import bench
    from serving.bench_config import BenchConfig

    return Command(BenchConfig, bench)


COMMANDS: dict[str, tuple[Callable[[], Command], str]] = {
    "compress": (_compress, "prune a model with GradPruner and write a smaller standard checkpoint"),
    "inspect": (_inspect, "show a compressed checkpoint's gradprune.json"),
    "eval": (_eval, "evaluate a checkpoint on prompt/completion data (choice, exact, loss)"),
    "export hub": (_export_hub, "push a checkpoint to the Hugging Face Hub with a generated model card"),
    "export onnx": (_export_onnx, "export a KV-cache ONNX graph (prefill + decode), validated against PyTorch"),
    "export gguf": (_export_gguf, "write a GGUF (f16, q8_0, q4_0) for llama.cpp / Ollama, validated and scored on the ledger rows"),
    "export vllm": (_export_vllm, "check a checkpoint is servable by vLLM and print the serve command"),
    "serve": (_serve, "serve a checkpoint with vLLM's OpenAI-compatible server"),
    "bench": (_bench, "benchmark dense vs pruned latency, throughput and memory"),
}


def load_command(name: str) -> Command:
    return COMMANDS[name][0]()


def _top_level_help() -> str:
    lines = ["usage: gradprune <command> [options]   (gradprune <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<12} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def _groups() -> dict[str, list[str]]:
    """Command groups and their targets, from the table: {"export": ["hub", "onnx", "vllm"]}."""
    groups: dict[str, list[str]] = {}
    for name in COMMANDS:
        if " " in name:
            group, target = name.split(" ", 1)
            groups.setdefault(group, []).append(target)
    return groups


def _group_help(group: str) -> str:
    lines = [f"usage: gradprune {group} <target> [options]   (gradprune {group} <target> --help for its options)", "", "targets:"]
    lines += [f"  {name.split(' ', 1)[1]:<8} {desc}" for name, (_, desc) in COMMANDS.items() if name.startswith(group + " ")]
    return "\n".join(lines)


def _split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in COMMANDS:
        return f"{argv[0]} {argv[1]}", argv[2:]
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:]
    return None, argv


def build_parser(command: str) -> tuple[argparse.ArgumentParser, type]:
    config_cls = load_command(command).config
    description = COMMANDS[command][1]
    parser = ArgumentParser(
        prog=f"gradprune {command}",
        description=description + "\n\n" + (config_cls.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(parser, config_cls)
    parser.add_argument("--config", dest="_recipe", metavar="RECIPE.yaml", help="read options from a YAML file; flags win")
    parser.add_argument("-v", "--verbose", dest="_verbose", action="store_true", help="debug logging, and detail on errors")
    parser.add_argument("-q", "--quiet", dest="_quiet", action="store_true", help="warnings only, no progress bars")
    return parser, config_cls


# OSErrors that mean "this path or this machine", which the user can fix: one line, not a traceback.
_USER_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENAMETOOLONG,
    errno.ENOENT,
    errno.EEXIST,
    errno.EMFILE,
}


def _error(message: str) -> None:
    """Exactly one `error:` line on stderr, whatever the message holds."""
    text = " ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())
    print(f"error: {text or 'failed'}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _signals_raise_interrupted():
    """SIGINT and SIGTERM both raise errors.Interrupted in the main thread, so every `finally` and
    atomic output on the way out cleans up; a second signal while unwinding is ignored. A raise that
    lands in a finaliser, where Python swallows it, is silenced and raised again at the next
    checkpoint (errors.raise_if_interrupted: each training step, each output's publish, the end)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _handler(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # unwinding now: do not interrupt the clean-up
        record_signal(signum)  # raised again at the next checkpoint if this raise is swallowed
        raise Interrupted(signum)

    def _unraisable(info):
        # Our Interrupted, raised inside a __del__ or a weakref callback: Python would print it as an
        # "Exception ignored" traceback. It is recorded and raised again at the next checkpoint.
        if not isinstance(info.exc_value, Interrupted):
            previous_unraisable(info)

    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_unraisable, sys.unraisablehook = sys.unraisablehook, _unraisable
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = previous_unraisable
        record_signal(None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = _split_command(argv)
    if command is None:
        return _without_command(argv)
    verbose = "-v" in rest or "--verbose" in rest
    with _signals_raise_interrupted():
        try:
            outcome = _parse_and_run(command, rest)
        except (GradPruneError, KeyboardInterrupt, OSError) as exc:
            status = _failure_status(exc, verbose=verbose)
            if status is None:
                raise
            return status
    if isinstance(outcome, int):  # --help
        return outcome
    spec, result = outcome
    text = spec.present(result)
    if text is not None:
        print(text)
    return 0


def _without_command(argv: list[str]) -> int:
    """Whatever is not a whole command. Help is shown for anything a user can type that asks for it:
    `gradprune`, `--help`, `help [COMMAND]`, a bare group (`gradprune export`) or a group with --help
    (`gradprune export bogus --help`); `--version` prints the version. Anything else is one error line."""
    if argv[:1] == ["help"]:
        command, _ = _split_command(argv[1:])
        return main([*command.split(), "--help"]) if command else _without_command([*argv[1:], "--help"])
    if argv[:1] in (["--version"], ["-V"]):
        print(f"gradprune {__version__}")
        return 0
    wants_help = not argv or any(a in ("-h", "--help") for a in argv)
    groups = _groups()
    if argv and argv[0] in groups:
        if wants_help or len(argv) == 1:
            print(_group_help(argv[0]))
            return 0
        targets = ", ".join(groups[argv[0]])
        _error(f"unknown {argv[0]} target {argv[1]!r}: choose one of {targets} (see `gradprune {argv[0]} --help`)")
        return 2
    if wants_help:
        print(_top_level_help())
        return 0
    _error(f"unknown command {argv[0][:60]!r}: choose one of {', '.join(COMMANDS)} (see `gradprune --help`)")
    return 2


def _parse_and_run(command: str, rest: list[str]) -> tuple[Command, Any] | int:
    """Flags (+ recipe) → the validated config → the command's function: (its Command, its result),
    or the exit status of `--help`."""
    parser, config_cls = build_parser(command)
    try:
        namespace = parser.parse_args(rest)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    _configure_logging(verbose=namespace._verbose, quiet=namespace._quiet)
    config = build_config(config_cls, namespace, namespace._recipe)
    spec = load_command(command)
    result = spec.run(config)
    raise_if_interrupted()  # a signal whose exception was swallowed: still no success
    return spec, result


def _failure_status(exc: BaseException, *, verbose: bool) -> int | None:
    """The exit status of a failure the user can act on, after its one `error:` line; None for a bug
    (an OSError that is not about a path or the machine), which the caller re-raises as a traceback."""
    if isinstance(exc, OSError) and exc.errno not in _USER_ERRNOS:
        return None
    if verbose and isinstance(exc, (GradPruneError, OSError)):
        logging.getLogger(__name__).debug("error detail", exc_info=exc)
    if isinstance(exc, GradPruneError):
        _error(str(exc))
        return 2
    if isinstance(exc, Interrupted):
        _error(f"interrupted by {exc.signame}: stopped and cleaned up; no partial output was left")
        return 128 + exc.signum
    if isinstance(exc, KeyboardInterrupt):
        _error("interrupted by SIGINT: stopped and cleaned up; no partial output was left")
        return 130
    where = f"{exc.filename}: " if exc.filename else ""
    _error(f"{where}{exc.strerror or exc}: check the path, its permissions and the free disk space")
    return 2


def _configure_logging(*, verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if quiet:
        os.environ["GRADPRUNE_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if quiet or os.environ.get("GRADPRUNE_DISABLE_PROGRESS_BARS") == "1":
        from transformers.utils import logging as hf_logging  # noqa: PLC0415 - keeps `gradprune --help` free of transformers

        hf_logging.disable_progress_bar()


def _as_text(result: Any) -> str | None:
    """Strings are shown as they are; dicts as one JSON line (machine-readable, last line)."""
    if result is None:
        return None
    if isinstance(result, dict):
        return json.dumps(result, default=str)
    return str(result)


if __name__ == "__main__":
    sys.exit(main())
