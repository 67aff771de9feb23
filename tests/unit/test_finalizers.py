"""treeguard._finalizers: a finalizer stays pending until its function has returned, so that
an interrupt (or an error) in it is finished by the next sweep, and at exit."""

from __future__ import annotations

import gc
import textwrap
from pathlib import Path

import pytest

from tests import proc
from treeguard._finalizers import Finalizer, sweep


class Thing:
    """Something to be collected."""


def test_it_runs_once_when_its_object_is_collected() -> None:
    calls: list[str] = []
    thing = Thing()
    fin = Finalizer(thing, calls.append, "done")
    assert fin.alive and calls == []
    del thing
    gc.collect()
    assert calls == ["done"] and not fin.alive
    fin()
    sweep()
    assert calls == ["done"]


def test_a_detached_one_never_runs() -> None:
    calls: list[str] = []
    thing = Thing()
    fin = Finalizer(thing, calls.append, "done")
    fin.detach()
    del thing
    gc.collect()
    sweep()
    assert calls == [] and not fin.alive


def test_one_cut_short_stays_pending_and_the_sweep_finishes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first run is interrupted inside the function, as a signal handler may: the
    # garbage collector drops the exception (unraisable); the sweep runs the function again.
    unraisable: list[type[BaseException]] = []
    monkeypatch.setattr("sys.unraisablehook", lambda u: unraisable.append(u.exc_type))
    calls: list[int] = []

    def thaw() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise KeyboardInterrupt

    thing = Thing()
    fin = Finalizer(thing, thaw)
    del thing
    gc.collect()
    assert unraisable == [KeyboardInterrupt] and calls == [0] and fin.alive
    sweep()
    assert calls == [0, 1] and not fin.alive
    sweep()
    assert calls == [0, 1]


def test_a_run_that_fails_is_reported_by_the_sweep_and_stays_pending(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.unraisablehook", lambda u: None)
    failures = [OSError("first"), OSError("second")]

    def thaw() -> None:
        if failures:
            raise failures.pop(0)

    thing = Thing()
    fin = Finalizer(thing, thaw)
    del thing
    gc.collect()
    sweep()  # the second failure: reported, not raised
    assert "OSError: second" in capsys.readouterr().err and fin.alive
    sweep()
    assert not fin.alive


def test_a_run_never_starts_inside_another(monkeypatch: pytest.MonkeyPatch) -> None:
    # A signal handler (or another thread) that sweeps while the function runs does not
    # run it a second time beside the first.
    calls: list[str] = []
    thing = Thing()

    def thaw() -> None:
        calls.append("in")
        fin()
        sweep()
        calls.append("out")

    fin = Finalizer(thing, thaw)
    del thing
    gc.collect()
    assert calls == ["in", "out"] and not fin.alive


def test_the_exit_runs_the_pending_ones_newest_first() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        from treeguard._finalizers import Finalizer

        class Thing:
            pass

        kept = [Thing() for _ in range(3)]
        fins = [Finalizer(t, print, f"run {i}") for i, t in enumerate(kept)]
        fins[1].detach()

        def fails():
            raise OSError("reported")

        Finalizer(kept[0], fails)
        """
    )
    done = proc.run_python(code, [str(Path(__file__).resolve().parents[2])])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n") == ["run 2", "run 0", ""]
    assert "OSError: reported" in done.stderr
