"""Finalizers that an interrupt cannot lose.

:class:`weakref.finalize` takes its callback out of its registry as the callback starts. A
signal handler that raises (``KeyboardInterrupt``) inside the callback raises into the garbage
collector, which reports the exception as unraisable and drops it: the callback is lost for
good, and a guard collected while frozen would leave its tree stopped until the interpreter
exits. A :class:`Finalizer` stays pending until its function has returned. :func:`sweep`,
which every freeze and release calls, runs again each one whose object has died meanwhile,
and the interpreter's exit runs every one still pending, newest first.

A function given here must be idempotent (it may be cut short and run again) and must act only
in the process that made it (a forked child inherits every pending finalizer).
"""

from __future__ import annotations

import atexit
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["Finalizer", "sweep"]

#: Every pending finalizer, oldest first (a dict: ordered, and its members' removal is O(1)).
_PENDING: dict[Finalizer, None] = {}


class Finalizer:
    """Call ``func(*args)`` once ``obj`` is collected (or the interpreter exits), unless
    :meth:`detach` comes first. Pending (:attr:`alive`) until the call has returned."""

    __slots__ = ("__weakref__", "_args", "_func", "_ref", "_running")

    def __init__(self, obj: object, func: Callable[..., object], *args: Any) -> None:
        self._func, self._args = func, args
        self._running = threading.Lock()  # one run at a time (a collection in another thread)
        self._ref = weakref.ref(obj, self._died)
        _PENDING[self] = None  # armed last: a sweep never meets one half made

    def _died(self, _ref: object) -> None:
        self()

    def __call__(self) -> None:
        """Run the function now if pending and not running (in another thread, or in the
        run a signal handler interrupted), and forget it once it has returned."""
        if self not in _PENDING or not self._running.acquire(blocking=False):
            return
        try:
            self._func(*self._args)
            _PENDING.pop(self, None)
        finally:
            self._running.release()

    @property
    def alive(self) -> bool:
        """Whether the function is still to run (neither run to its end nor detached)."""
        return self in _PENDING

    def detach(self) -> None:
        """Never run the function."""
        _PENDING.pop(self, None)


def sweep() -> None:
    """Run every pending finalizer whose object has died: its run was cut short. One that
    fails is reported (as an exception in a finalizer is) and stays pending."""
    for fin in list(_PENDING):  # (a copy: a finalizer made or run meanwhile changes it)
        if fin._ref() is None:
            _run(fin)


def _run(fin: Finalizer) -> None:
    try:
        fin()
    except Exception as err:
        sys.excepthook(type(err), err, err.__traceback__)


@atexit.register
def _at_exit() -> None:
    for fin in reversed(list(_PENDING)):
        _run(fin)
