"""A signal whose exception Python swallows still stops the run before anything is published.

The CLI's handler raises Interrupted wherever the main thread is. If that is inside a `__del__`
(CI caught one in regex's Group.__del__ during a compress), Python prints "Exception ignored" and
carries on — and the run used to finish, publish its output and exit 0. These tests swallow the
signal on purpose, in a finaliser, and check the checkpoints that raise it again.
"""

from __future__ import annotations

import gc
import signal
import sys

import pytest

from gradprune_deploy.cli import _signals_raise_interrupted
from gradprune_deploy.compress.finetune import _StopOnSignal
from gradprune_deploy.errors import Interrupted, raise_if_interrupted
from gradprune_deploy.utils import atomic_output_dir, atomic_write_text


class _SignalsInItsFinaliser:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside __del__: its raise is swallowed


def _swallow_a_sigterm() -> None:
    _SignalsInItsFinaliser()  # dropped at once: __del__ runs, the Interrupted it raises goes to sys.unraisablehook
    gc.collect()


@pytest.fixture(autouse=True)
def unraisable(monkeypatch) -> list[BaseException]:
    """What reaches the hook Python calls for an exception it swallows (it would print a traceback)."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(info.exc_value))
    return seen


def test_a_signal_in_a_finaliser_is_swallowed_quietly_and_remembered(unraisable):
    hook = sys.unraisablehook
    with _signals_raise_interrupted():
        _swallow_a_sigterm()  # no exception reaches here: Python swallowed it
        assert unraisable == []  # and printed nothing: no "Exception ignored ... Traceback" for the user
        with pytest.raises(Interrupted) as caught:
            raise_if_interrupted()
    assert caught.value.signum == signal.SIGTERM
    raise_if_interrupted()  # leaving the CLI's scope forgets the signal
    assert sys.unraisablehook is hook


def test_other_swallowed_errors_still_reach_the_previous_hook(unraisable):
    class BrokenFinaliser:
        def __del__(self):
            raise ValueError("a real bug")

    with _signals_raise_interrupted():
        BrokenFinaliser()
        gc.collect()
    assert [type(exc) for exc in unraisable] == [ValueError]


def test_a_swallowed_signal_stops_the_output_from_being_published(tmp_path):
    out = tmp_path / "out"
    with _signals_raise_interrupted(), pytest.raises(Interrupted):
        with atomic_output_dir(out, overwrite=False) as tmp:
            (tmp / "model.safetensors").write_text("half a model")
            _swallow_a_sigterm()
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary sibling is gone too


def test_a_swallowed_signal_stops_a_file_write_and_a_training_step(tmp_path):
    with _signals_raise_interrupted():
        _swallow_a_sigterm()
        with pytest.raises(Interrupted):
            atomic_write_text(tmp_path / "report.json", "{}")
        with pytest.raises(Interrupted):
            _StopOnSignal().on_step_end(args=None, state=None, control=None)
    assert list(tmp_path.iterdir()) == []


def test_without_a_signal_nothing_is_raised(tmp_path):
    with _signals_raise_interrupted():
        with atomic_output_dir(tmp_path / "out", overwrite=False) as tmp:
            (tmp / "a").write_text("x")
        _StopOnSignal().on_step_end(args=None, state=None, control=None)
    assert (tmp_path / "out" / "a").read_text() == "x"
