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
import functools
import os
import sys
import threading
import weakref
from collections.abc import Callable, Generator, Iterable
from typing import Any

__all__ = ["Finalizer", "exiting", "sweep", "too_late"]

#: Every pending finalizer, oldest first (a dict: ordered, and its members' removal is O(1)).
_PENDING: dict[Finalizer, None] = {}

# Makes "no run under way, now this one's" one step. Held only for a few bytecodes that
# call nothing (no signal handler or collection runs there), never across a function.
_claiming = threading.RLock()


#: Whether this process's exit has begun (its exit hook below has started).
_exiting = False


def _forked() -> None:
    # The child's copy may be held by a thread that does not exist there; its exit is its own.
    global _claiming, _exiting
    _claiming = threading.RLock()
    _exiting = False


os.register_at_fork(after_in_child=_forked)


def _nothing(*_args: object) -> None:
    """What a finalizer that has run (or was detached) keeps instead of its function."""


class Finalizer:
    """Call ``func(*args)`` once ``obj`` is collected (or the interpreter exits), unless
    :meth:`detach` comes first. Pending (:attr:`alive`) until the call has returned."""

    __slots__ = ("__weakref__", "_args", "_func", "_ref", "_runner")

    def __init__(self, obj: object, func: Callable[..., object], *args: Any) -> None:
        self._func, self._args = func, args
        # The run under way, if any: a run is a generator, which says itself whether it is
        # running (gi_running), so that no interrupt can leave a run claimed but over.
        self._runner: Any = None  # (a generator object: typing's Generator has no gi_running)
        self._ref = weakref.ref(obj, self._died)
        _run_first_at_exit()
        _PENDING[self] = None  # armed last: a sweep never meets one half made

    def _died(self, _ref: object) -> None:
        self()

    def __call__(self) -> None:
        """Run the function now if pending and not running (in another thread, or in the
        run a signal handler interrupted), and forget it once it has returned."""
        if self in _PENDING:
            box: list[object] = []
            run = self._run(box)
            box.append(run)
            next(run, None)

    def _run(self, box: list[object]) -> Generator[None, None, None]:
        with _claiming:
            runner = self._runner
            if self not in _PENDING or (runner is not None and runner.gi_running):
                return
            self._runner = box[0]
        self._func(*self._args)
        _PENDING.pop(self, None)
        self._func, self._args = _nothing, ()  # (let go of what it was given at once)
        yield  # (never reached: a generator, for gi_running)

    @property
    def alive(self) -> bool:
        """Whether the function is still to run (neither run to its end nor detached)."""
        return self in _PENDING

    def detach(self) -> None:
        """Never run the function."""
        if _PENDING.pop(self, 0) is None:
            self._func, self._args = _nothing, ()  # (let go of what it was given at once)


def sweep() -> None:
    """Run every pending finalizer whose object has died: its run was cut short. One that
    fails is reported (as an exception in a finalizer is) and stays pending; an interrupt
    in one is raised once the others have run."""
    interrupt = _run_all(fin for fin in list(_PENDING) if fin._ref() is None)
    if interrupt is not None:
        raise interrupt


def _run_all(fins: Iterable[Finalizer]) -> BaseException | None:
    """Run ``fins``, reporting errors; the first interrupt is returned once all have run."""
    interrupt: BaseException | None = None
    for fin in fins:
        try:
            fin()
        except Exception as err:
            sys.excepthook(type(err), err, err.__traceback__)
        except BaseException as err:
            interrupt = interrupt or err
    return interrupt


def exiting() -> bool:
    """Whether the interpreter's exit has begun: the exit hook that runs every pending
    finalizer has started (it runs before any other hook registered before it)."""
    return _exiting


def too_late() -> bool:
    """Whether a freeze begun now could be left stopped: the exit has begun and this is not
    the main thread (which runs the exit hooks, each one its own release), so nothing runs
    a finalizer armed now before Python ends this thread."""
    return _exiting and threading.current_thread() is not threading.main_thread()


def _at_exit() -> None:
    # Every one, newest first, through interrupts: an interrupt cuts short only the run it
    # lands in, which runs once more after the others (the exit is the last chance). The
    # flag first: one armed after it is not run here (see exiting()).
    global _exiting
    _exiting = True
    interrupt = _run_all(reversed(list(_PENDING)))
    if interrupt is not None:
        _run_all(reversed(list(_PENDING)))
        raise interrupt


# The exit hook registered last (atexit runs the newest first): a hook registered before a
# freeze may wait on what it froze (multiprocessing's joins its children), so each new
# finalizer moves this one after any registered since. A new object each time:
# atexit.unregister() compares.
_exit_hook: Callable[[], None] | None = None
_hooks = getattr(atexit, "_ncallbacks", None)  # how many are registered (CPython)
_hooks_then = -1  # that count as this one was registered


def _run_first_at_exit() -> None:
    global _exit_hook, _hooks_then
    if _hooks is not None and _hooks() == _hooks_then:
        return  # none registered since (one unregistered, another registered: one missed)
    hook = functools.partial(_at_exit)
    atexit.register(hook)  # (first: an interrupt here leaves two, never none)
    if _exit_hook is not None:
        atexit.unregister(_exit_hook)
    _exit_hook = hook
    _hooks_then = -1 if _hooks is None else _hooks()


_run_first_at_exit()
