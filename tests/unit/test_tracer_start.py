"""The ptrace tracer thread's start cut short by an interrupt (a signal handler that raises,
which Python runs in the main thread wherever it is): the caller's signal mask is restored,
and the work is served all the same."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from treeguard._backends import _tracer
from treeguard._backends._tracer import Tracer
from treeguard._drive import run_sync


def _blocked() -> set[int]:
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No idle tracer thread to take: the next freeze starts one."""
    monkeypatch.setattr(_tracer, "_idle", None)
    before = _blocked()
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)  # whatever the test left


def _served(tracer: Tracer) -> None:
    """A request after the interrupted one is served, and the hold ends."""
    assert run_sync(tracer.steps(lambda: "served")) == "served"
    run_sync(tracer.steps(lambda: setattr(tracer, "finished", True)))


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fresh")
def test_a_start_cut_short_before_the_thread_was_made_makes_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = threading.Thread.start
    cut: list[threading.Thread] = []

    def start(self: threading.Thread) -> None:
        if self.name == "treeguard-ptrace" and not cut:
            cut.append(self)
            raise KeyboardInterrupt  # landed before the thread was made
        real(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    before = _blocked()
    tracer = Tracer(lambda: False)
    tracer.start()
    with pytest.raises(KeyboardInterrupt):
        run_sync(tracer.steps(lambda: "lost"))
    assert cut and not cut[0].is_alive()
    assert _blocked() == before
    _served(tracer)  # (hung for good before: no thread would ever serve the hold)


class _CutMask:
    """``_signal`` whose call that blocks every signal is followed by an interrupt."""

    def __init__(self) -> None:
        self.cut = False

    def pthread_sigmask(self, how: int, mask: Any) -> Any:
        previous = signal.pthread_sigmask(how, mask)
        if how == signal.SIG_BLOCK and len(set(mask)) > 1 and not self.cut:
            self.cut = True
            raise KeyboardInterrupt  # as a handler run right after the call returned
        return previous


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fresh")
def test_an_interrupt_right_after_every_signal_was_blocked_leaves_the_mask_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cut = _CutMask()
    monkeypatch.setattr(_tracer, "_signal", cut)
    before = _blocked()
    tracer = Tracer(lambda: False)
    tracer.start()
    with pytest.raises(KeyboardInterrupt):
        run_sync(tracer.steps(lambda: "lost"))
    assert cut.cut
    # (Before, every signal stayed blocked in the caller's thread: Ctrl-C, the timeouts of
    # a test runner, all held back for good.)
    assert _blocked() == before
    _served(tracer)
