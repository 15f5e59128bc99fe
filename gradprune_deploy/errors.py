"""Every error a user can fix. The CLI prints `error: <message>` on one line and exits 2.

Messages name the fix (the flag to change, the extra to install), never just the symptom, and
fit on one line (the CLI joins any extra lines). A traceback means a bug, never a bad input.
"""

import signal


class GradPruneError(Exception):
    """Base class: bad input or environment the user can fix."""


class ModelLoadError(GradPruneError):
    """The model source is missing, corrupt, unsafe (pickled) or needs remote code."""


class DataError(GradPruneError):
    """The data is missing, empty, malformed, label-less or too long."""


class ConfigError(GradPruneError):
    """An option or combination of options cannot work (e.g. a drop ratio leaving no layer)."""


class ArchitectureError(GradPruneError):
    """The model has no recognisable decoder-layer stack, or is not supported by a backend."""


class OutputExistsError(GradPruneError):
    """The output exists and --overwrite was not given."""


class MissingDependencyError(GradPruneError):
    """An optional dependency is not installed; the message names the extra."""


class ExportError(GradPruneError):
    """An export failed or did not validate numerically."""


class ServingError(GradPruneError):
    """A server could not be started, became unhealthy, or the port is taken."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its class name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwind (every temporary output is removed on the way), exit 128 + signal."""

    def __init__(self, signum: int):
        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(self.signame)


# The signal the CLI's handler received, if any. The handler raises Interrupted where Python happens
# to be; if that is inside a `__del__` or a weakref callback, Python prints "Exception ignored" and
# carries on. Recording the signal lets the next checkpoint (a training step, an output's publish)
# raise it again, so a swallowed signal still stops the run before anything is written.
_received_signal: int | None = None


def record_signal(signum: int | None) -> None:
    global _received_signal
    _received_signal = signum


def raise_if_interrupted() -> None:
    """Raise Interrupted if a signal arrived whose exception was swallowed on the way."""
    if _received_signal is not None:
        raise Interrupted(_received_signal)
