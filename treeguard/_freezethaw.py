"""``freezethaw(fn, *args)``: freeze, run, always thaw (the Sys::FreezeThaw shape).

In the main thread, the signals that usually end a supervisor (SIGINT, SIGTERM, SIGHUP,
SIGPIPE, SIGALRM, SIGUSR1, SIGUSR2) are held back while the tree is frozen: one that arrives
stops ``fn`` (by an exception that ``except Exception`` does not catch), the tree is thawed,
the previous handlers are put back, and only then is the signal handed to what was there
before: SIGINT raises ``KeyboardInterrupt``, a Python handler (pytest-timeout's, say) is
called, a default action is taken (SIGTERM ends the process, after the thaw). So the program
behaves as if treeguard were not there, only later. A signal whose previous handler is
``SIG_IGN`` is left ignored.

Python runs a signal handler between any two bytecodes of the main thread, so an exception
raised from one could land in the middle of the freezing or thawing code. The handlers
therefore raise only while ``fn`` runs; a signal that arrives while freezing aborts the
freeze at its next wait (which thaws), and one that arrives while thawing is handed over
once the thaw is done.
"""

from __future__ import annotations

import inspect
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from ._drive import Steps, run_sync
from ._guard import ProcessesGuard, new_guard
from .errors import FrozenInterrupt, InvalidArgumentError

if TYPE_CHECKING:
    from typing_extensions import TypeVarTuple, Unpack

    from ._types import Options

    Ts = TypeVarTuple("Ts")

__all__ = ["INTERRUPTING_SIGNALS", "freezethaw"]

T = TypeVar("T")

#: The signals held back while frozen (those Sys::FreezeThaw traps).
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


class _Interrupted(BaseException):
    """A held-back signal stops ``fn``: a BaseException, so that ``except Exception`` in
    ``fn`` does not swallow it (as it would not swallow ``KeyboardInterrupt``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Interrupts:
    """The temporary handlers: they record signals, and raise one only while armed."""

    __slots__ = ("armed", "pending", "saved")

    def __init__(self) -> None:
        self.armed = False
        self.pending: list[int] = []
        self.saved: dict[int, _Handler] = {}

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)
        if self.armed:
            self.armed = False  # raise once; the thaw that follows must run undisturbed
            raise _Interrupted(signum)

    def install(self) -> None:
        try:
            for sig in INTERRUPTING_SIGNALS:
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # ignored before, ignored now: nothing to hand over later
                self.saved[sig] = signal.signal(sig, self.handler)
        except BaseException:
            self.restore()
            raise

    def restore(self) -> dict[int, _Handler]:
        """Put the previous handlers back; returns them."""
        restored = dict(self.saved)
        while self.saved:
            sig, previous = self.saved.popitem()
            # None: the previous handler was not installed from Python; the default is the
            # closest thing Python can put back (signal(2)).
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        return restored

    def raise_pending(self) -> None:
        if self.pending:
            raise _Interrupted(self.pending[0])

    def hand_over(self, previous: dict[int, _Handler]) -> None:
        """Give each signal held back to the handler that was there before, in order of
        arrival. A handler that raises ends this (its exception propagates); the default
        action is taken by raising the signal again with the default restored."""
        pending, self.pending = self.pending, []
        for signum in dict.fromkeys(pending):
            handler = previous.get(signum)
            if callable(handler):
                handler(signum, None)
            elif handler in (None, signal.SIG_DFL):
                signal.raise_signal(signum)  # the default action (e.g. SIGTERM: exit)


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


def freezethaw(fn: Callable[[Unpack[Ts]], T], *args: Unpack[Ts], **options: Unpack[Options]) -> T:
    """Freeze a tree, call ``fn(*args)``, always thaw, and return what ``fn`` returned.

    ::

        def copy_state():
            return snapshot_memory()        # every descendant is stopped here

        state = treeguard.freezethaw(copy_state, timeout=2.0)

    Called in the main thread, it holds back SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGALRM,
    SIGUSR1 and SIGUSR2 from before the freeze until after the thaw: one that arrives stops
    ``fn``, and once the tree is thawed and the previous handlers are back, it is handed to
    them (``KeyboardInterrupt`` for SIGINT, a Python handler is called, a default action is
    taken). Called from another thread it installs nothing (Python lets only the main thread
    set handlers).

    :param fn: what to run while the tree is frozen.
    :param args: its positional arguments.
    :param options: the options of :class:`ProcessesGuard` (``root``, ``scope``,
        ``exclude``, ``timeout``, ...).
    :returns: what ``fn`` returned.
    :raises InvalidArgumentError: if ``fn`` is not callable, is a coroutine function, or an
        option is invalid.
    :raises KeyboardInterrupt: on SIGINT while frozen (after the thaw), and whatever else the
        previous handler of a held-back signal raises.
    :raises FrozenInterrupt: if a held-back signal stopped ``fn`` (or the freeze) and its
        previous handler returned without raising.
    :raises FreezeError: as :meth:`ProcessesGuard.freeze` (nothing is left stopped).
    :raises Exception: whatever ``fn`` raised, after the thaw.
    """
    if not callable(fn):
        raise InvalidArgumentError("fn", f"must be callable, not {type(fn).__name__}")
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
        # Called here, it would only make a coroutine, run by nobody while frozen.
        raise InvalidArgumentError(
            "fn", "is a coroutine function: freeze around awaits with `async with guard()`"
        )
    guard = new_guard(dict(options))
    interrupts = _Interrupts()
    if threading.current_thread() is threading.main_thread():
        # Before the freeze: a signal that arrives while freezing must thaw too.
        interrupts.install()
    stopped: _Interrupted | None = None
    try:
        try:
            result = _run_frozen(guard, interrupts, fn, args)
        finally:
            interrupts.armed = False
            guard.release()  # idempotent: a no-op if the inner thaw ran
    except _Interrupted as err:
        stopped = err
    finally:
        previous = interrupts.restore()
        # The thaw is done: as if treeguard had not been there, also when fn (or the
        # freeze) raised an error of its own: a signal held back is never lost.
        interrupts.hand_over(previous)
    if stopped is not None:
        raise FrozenInterrupt(stopped.signum) from None  # fn did not finish
    return result


def _run_frozen(
    guard: ProcessesGuard, interrupts: _Interrupts, fn: Callable[..., T], args: tuple[Any, ...]
) -> T:
    run_sync(_abort_on(guard._freeze_steps(), interrupts))
    try:
        interrupts.armed = True
        interrupts.raise_pending()
        return fn(*args)
    finally:
        interrupts.armed = False
        guard.release()
