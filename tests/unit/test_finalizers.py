"""treeguard._finalizers: a finalizer stays pending until its function has returned, so that
an interrupt (or an error) in it is finished by the next sweep, and at exit."""

from __future__ import annotations

import gc
import inspect
import sys
import textwrap
import threading
import weakref
from pathlib import Path
from types import CodeType

import pytest

from tests import proc
from tests.tracing import after_call, call_offsets
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


_CODES = [
    f.__code__
    for f in vars(Finalizer).values()
    if inspect.isfunction(f) and f.__name__ not in ("__init__", "detach")
]


@pytest.mark.parametrize(
    ("code", "nth"),
    [(code, nth) for code in _CODES for nth in range(len(call_offsets(code)))],
    ids=lambda v: v.co_name if isinstance(v, CodeType) else str(v),
)
def test_an_interrupt_after_any_call_of_a_run_leaves_it_pending_for_the_sweep(
    code: CodeType, nth: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The collector's run of a finalizer is interrupted at each point where a signal
    # handler may run in the finalizer's own code; the next sweep runs it to its end.
    monkeypatch.setattr("sys.unraisablehook", lambda u: None)
    calls: list[str] = []
    thing = Thing()
    fin = Finalizer(thing, calls.append, "done")
    landed: list[int] = []

    def interrupt() -> None:
        landed.append(call_offsets(code)[nth])
        raise KeyboardInterrupt

    sys.settrace(after_call(code, call_offsets(code)[nth], interrupt))
    try:
        del thing
        gc.collect()
    finally:
        sys.settrace(None)
    sweep()
    assert calls and calls == ["done"] * len(calls) and not fin.alive, (landed, calls)


def test_a_run_or_a_detach_lets_go_of_the_arguments_at_once() -> None:
    # What a finalizer was given (a backend, with everything it froze) goes as soon as the
    # finalizer has run or was detached, as with weakref.finalize: not at the next
    # collection of cycles (never, if the program disabled the collector).
    class Big:
        pass

    thing = Thing()
    gc.disable()
    try:
        big = Big()
        gone = weakref.ref(big)
        fin = Finalizer(thing, print, big)
        fin.detach()
        del fin, big
        assert gone() is None
        big = Big()
        gone = weakref.ref(big)
        Finalizer(thing, lambda _: None, big)()
        del big
        assert gone() is None
    finally:
        gc.enable()


def test_an_interrupt_in_one_run_of_a_sweep_leaves_the_others_to_run() -> None:
    calls: list[str] = []
    interrupts = [KeyboardInterrupt()]

    def first() -> None:
        if interrupts:
            raise interrupts.pop()
        calls.append("first")

    things = [Thing(), Thing()]
    fins = [Finalizer(things[0], first), Finalizer(things[1], calls.append, "second")]
    for fin in fins:  # (cut short in the collector: pending, their object dead)
        fin._ref = weakref.ref(Thing())
    with pytest.raises(KeyboardInterrupt):
        sweep()  # the first one is interrupted; the second runs all the same
    assert calls == ["second"] and fins[0].alive and not fins[1].alive
    sweep()
    assert calls == ["second", "first"] and not fins[0].alive


def test_the_exit_runs_every_pending_one_through_an_interrupt() -> None:
    # A Ctrl-C at exit that lands in one run (a thaw) leaves neither the others nor that
    # one undone.
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        from treeguard._finalizers import Finalizer

        class Thing:
            pass

        kept = [Thing() for _ in range(3)]
        for i, t in enumerate(kept):
            Finalizer(t, print, f"run {i}")
        interrupts = [KeyboardInterrupt()]

        def interrupted():
            if interrupts:
                raise interrupts.pop()
            print("run interrupted")

        Finalizer(kept[0], interrupted)
        """
    )
    done = proc.run_python(code, [str(Path(__file__).resolve().parents[2])])
    assert done.stdout.split("\n") == ["run 2", "run 1", "run 0", "run interrupted", ""], (
        done.stderr
    )
    assert "KeyboardInterrupt" in done.stderr  # (reported, as an exception at exit is)


def test_a_run_in_another_thread_is_never_joined_by_a_second() -> None:
    # The collector runs a finalizer in one thread while another sweeps (or calls it): the
    # second returns at once, and the function runs once in all.
    calls: list[str] = []
    inside, go_on = threading.Event(), threading.Event()

    def thaw() -> None:
        calls.append("in")
        inside.set()
        assert go_on.wait(10)
        calls.append("out")

    thing = Thing()
    fin = Finalizer(thing, thaw)
    fin._ref = weakref.ref(Thing())  # (its object dead, as after a run cut short)
    runner = threading.Thread(target=fin)
    runner.start()
    try:
        assert inside.wait(10)
        fin()
        sweep()
        assert calls == ["in"] and fin.alive
    finally:
        go_on.set()
        runner.join(10)
    assert calls == ["in", "out"] and not fin.alive
    fin()
    assert calls == ["in", "out"]
