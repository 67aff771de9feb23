"""``freezethaw(fn, *args)``: freeze, run, always thaw (the Sys::FreezeThaw shape).

In the main thread, the signals that usually end a supervisor (SIGINT, SIGTERM, SIGHUP,
SIGPIPE, SIGALRM, SIGUSR1, SIGUSR2) are turned into :class:`FrozenInterrupt` for the duration,
so that even ``kill -TERM`` of the supervisor thaws the tree before the process exits.

Python runs a signal handler between any two bytecodes of the main thread, so an exception
raised from one could land in the middle of the freezing or thawing code (between sending
SIGSTOP and recording it, say). The handlers therefore raise only while ``fn`` runs; a signal
that arrives while freezing aborts the freeze at its next wait (which thaws), and one that
arrives while thawing is raised once the thaw is done.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

from ._drive import Steps, run_sync
from ._guard import ProcessesGuard, new_guard
from .errors import FrozenInterrupt, InvalidArgumentError

__all__ = ["INTERRUPTING_SIGNALS", "freezethaw"]

T = TypeVar("T")

#: The signals turned into :class:`FrozenInterrupt` while frozen (those Sys::FreezeThaw traps).
INTERRUPTING_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGPIPE,
    signal.SIGALRM,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class _Interrupts:
    """The temporary handlers: they record signals, and raise one only while armed."""

    __slots__ = ("armed", "pending", "saved")

    def __init__(self) -> None:
        self.armed = False
        self.pending: list[int] = []
        self.saved: dict[int, _Handler] = {}

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.armed:
            self.armed = False  # raise once; the thaw that follows must run undisturbed
            raise FrozenInterrupt(signum)
        self.pending.append(signum)

    def install(self) -> None:
        try:
            for sig in INTERRUPTING_SIGNALS:
                self.saved[sig] = signal.signal(sig, self.handler)
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        while self.saved:
            sig, previous = self.saved.popitem()
            # None: the previous handler was not installed from Python; the default is the
            # closest thing Python can put back (signal(2)).
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)

    def raise_pending(self) -> None:
        if self.pending:
            raise FrozenInterrupt(self.pending[0])


def _abort_on(steps: Steps[T], interrupts: _Interrupts) -> Steps[T]:
    """``steps``, stopped at its next wait once a signal was recorded (closing the
    backend's freeze at a yield thaws everything it stopped)."""
    try:
        wait = next(steps)
        while True:
            interrupts.raise_pending()
            yield wait
            interrupts.raise_pending()
            wait = steps.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        steps.close()


def freezethaw(fn: Callable[..., T], *args: Any, **options: Any) -> T:
    """Freeze a tree, call ``fn(*args)``, always thaw, and return what ``fn`` returned.

    ::

        def copy_state():
            return snapshot_memory()        # every descendant is stopped here

        state = treeguard.freezethaw(copy_state, timeout=2.0)

    Called in the main thread, it turns SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGALRM, SIGUSR1
    and SIGUSR2 into :class:`FrozenInterrupt` from before the freeze until after the thaw,
    then puts the previous handlers back. Called from another thread it installs nothing
    (Python lets only the main thread set handlers).

    :param fn: what to run while the tree is frozen.
    :param args: its positional arguments.
    :param options: the options of :class:`ProcessesGuard` (``root``, ``scope``,
        ``exclude``, ``timeout``, ...).
    :returns: what ``fn`` returned.
    :raises InvalidArgumentError: if ``fn`` is not callable or an option is invalid.
    :raises FrozenInterrupt: if one of those signals arrived while frozen (after the thaw).
    :raises FreezeError: as :meth:`ProcessesGuard.freeze` (nothing is left stopped).
    :raises Exception: whatever ``fn`` raised, after the thaw.
    """
    if not callable(fn):
        raise InvalidArgumentError("fn", f"must be callable, not {type(fn).__name__}")
    guard = new_guard(options)
    interrupts = _Interrupts()
    if threading.current_thread() is threading.main_thread():
        # Before the freeze: a signal that arrives while freezing must thaw too.
        interrupts.install()
    try:
        try:
            return _run_frozen(guard, interrupts, fn, args)
        finally:
            interrupts.armed = False
            guard.release()  # idempotent: a no-op if the inner thaw ran
    finally:
        interrupts.restore()


def _run_frozen(
    guard: ProcessesGuard, interrupts: _Interrupts, fn: Callable[..., T], args: tuple[Any, ...]
) -> T:
    run_sync(_abort_on(guard._freeze_steps(), interrupts))
    try:
        interrupts.armed = True
        interrupts.raise_pending()
        result = fn(*args)
    finally:
        interrupts.armed = False
        guard.release()
    interrupts.raise_pending()  # a signal that arrived during the thaw
    return result
