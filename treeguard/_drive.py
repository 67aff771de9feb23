"""One algorithm, two ways to wait.

Freezing is a sequence of non-blocking steps (read /proc, send a signal, write a cgroup
file) separated by waits. The algorithms are generators that ``yield`` a :class:`Wait`
whenever they would block; a driver performs the wait. :func:`run_sync` sleeps or polls;
:func:`run_async` awaits through anyio, so the event loop keeps running. Nothing else
differs between the sync and async faces.

Whatever stops a driver early (an exception, a cancellation) closes the generator, which
raises ``GeneratorExit`` at its pending ``yield``: the algorithms thaw on that path.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from ._finalizers import exiting
from .errors import FreezeError

__all__ = [
    "SLICE",
    "YIELD",
    "OneAtATime",
    "Slices",
    "Steps",
    "Wait",
    "run_async",
    "run_sync",
    "run_to_end",
    "under_event_loop",
]

T = TypeVar("T")
S = TypeVar("S", bound=Generator[Any, Any, Any])


@dataclass(frozen=True, slots=True)
class Wait:
    """A request to wait ``seconds`` (0: only let others run), or less if ``fd`` turns readable."""

    seconds: float = 0.0
    fd: int | None = None


Steps = Generator[Wait, None, T]

#: The zero wait: yield the CPU (sync) or reach a checkpoint (async).
YIELD = Wait()

#: Longest stretch of work between two points where an event loop may run.
SLICE = 0.002


# Which driver runs the steps of this context (a task's, or the thread's): "async" while
# run_async drives them, else "sync".
_DRIVER: contextvars.ContextVar[str] = contextvars.ContextVar("treeguard_driver", default="sync")


def under_event_loop() -> bool:
    """Whether the steps running now are driven by :func:`run_async` (an event loop waits
    on them), not by :func:`run_sync`: what a step may hand to a thread so that the loop
    runs on is better done at once by a caller who waits anyway."""
    return _DRIVER.get() == "async"


class Slices:
    """Says when a stretch of work has run for :data:`SLICE`: time to let an event loop
    run (``if slices.due(): yield YIELD``)."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = time.perf_counter() + SLICE

    def due(self) -> bool:
        now = time.perf_counter()
        if now < self._next:
            return False
        self._next = now + SLICE
        return True


class Backoff:
    """The waits between two looks at something about to happen (a signalled task stopping):
    a bare yield of the CPU for the first ``spin`` seconds (it usually happens within a few
    hundred microseconds, and a sleep that short overshoots by the timer slack, 50 us), then
    sleeps doubling from 20 us up to ``cap``."""

    __slots__ = ("_cap", "_sleep", "_spin_until")

    def __init__(self, cap: float = 0.002, spin: float = 0.001) -> None:
        self._cap = cap
        self._sleep = 0.0
        self._spin_until = time.perf_counter() + spin

    @property
    def capped(self) -> bool:
        """Whether the sleeps have grown to their cap (a few milliseconds of looking)."""
        return self._sleep >= self._cap

    @property
    def spun(self) -> bool:
        """Whether the bare yields are over (time to look closer at what is late)."""
        return time.perf_counter() >= self._spin_until

    def next(self) -> Wait:
        if not self._sleep and not self.spun:
            return YIELD
        wait = Wait(self._sleep)
        self._sleep = min(self._cap, self._sleep * 2 if self._sleep else 0.00002)
        return wait

    def pause(self) -> None:
        """Wait as :meth:`next` says, in this thread (one that is not a step's): a bare
        yield of the CPU while spinning, then sleeps (the first of none: the GIL is let go
        and taken again, as by any sleep)."""
        wait = self.next()
        if wait is YIELD:
            os.sched_yield()
        else:
            time.sleep(wait.seconds)


class OneAtATime:
    """Lets one freeze at a time run on an object (a guard), and no thaw beside it.

    A freeze's steps share its state with the thaw: a thaw run beside a freeze under way
    would resume and forget what it stopped so far, and leave it to stop the rest once the
    thaw is over; two thaws at once would resume (and close) one entry twice and skip the
    next. :meth:`wait_turn` registers the steps of a freeze, or of a thaw driven by an event
    loop, once none are under way and no other thread's thaw holds the turn; a synchronous
    thaw holds the turn (:meth:`for_thaw`) once no steps are under way. Steps live (begun,
    not finished) are under way: a caller of another thread waits up to ``wait`` seconds for
    them to end (a freeze ends by its deadline; steps left suspended by an event loop that
    stopped would last for ever); one of this thread (another task of its event loop, a
    signal handler) would wait for itself, so it is refused (:class:`FreezeError`) and the
    steps go on. Nothing is held that an interrupt could leave held: the steps' own state
    says whether they run.
    """

    __slots__ = ("_lock", "_owner", "_pid", "_steps", "_thawing", "wait")

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self._pid = 0
        self._mine()

    def _mine(self) -> None:
        """New locks in a forked child (its copies may be held by threads that do not exist
        there: a thaw under way in another thread as the process forked)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            # Makes "none under way, now mine" one step. Reentrant, as the other: a signal
            # handler that releases in the middle of it must not wait for ever.
            self._lock = threading.RLock()
            # A synchronous thaw's turn. Reentrant: a signal handler's release within this
            # thread's goes on.
            self._thawing = threading.RLock()
            self._steps: weakref.ref[Generator[Any, Any, Any]] | None = None
            self._owner = (0, 0)  # (pid, thread) that runs the steps

    def _under_way(self) -> bool:
        steps = self._steps() if self._steps is not None else None
        begun = steps is not None and getattr(steps, "gi_frame", None) is not None  # not over
        return begun and self._owner[0] == os.getpid()

    def _wait(self, take: Callable[[], bool], deadline: float, backoff: Backoff | None) -> Backoff:
        """After ``take`` found the turn taken: refuse this thread's own steps, or steps
        under way past the deadline; else pause once."""
        mine = self._owner[1] == threading.get_ident() and self._under_way()
        if mine:
            raise FreezeError("this guard is being frozen or thawed by another task of this thread")
        if self._under_way() and time.monotonic() > deadline:
            raise FreezeError(
                f"another thread is freezing or thawing this guard for over {self.wait:g} s"
            )
        backoff = backoff or Backoff()
        backoff.pause()  # (a thread that is not a step's: the one wait loop)
        return backoff

    def wait_turn(self, steps: Generator[Any, Any, Any] | None = None) -> None:
        """Wait for the steps under way to end (then register ``steps``, if given, once no
        other thread's thaw holds the turn either).

        :raises FreezeError: if this thread runs them, or another thread runs them for
            longer than ``wait``.
        """

        def take() -> bool:
            if self._under_way():
                return False
            if steps is not None:
                if not self._thawing.acquire(blocking=False):
                    return False  # another thread's thaw: it ends soon
                self._thawing.release()
                self._steps = weakref.ref(steps)
                self._owner = (os.getpid(), threading.get_ident())
            return True

        self._until(take)

    def queued(self, steps: S) -> S:
        """``steps``, registered once their turn came (see :meth:`wait_turn`)."""
        self.wait_turn(steps)
        return steps

    def _until(self, take: Callable[[], bool]) -> None:
        self._mine()
        deadline = time.monotonic() + self.wait
        backoff: Backoff | None = None
        while True:
            with self._lock:
                if take():
                    return
            backoff = self._wait(take, deadline, backoff)

    def _take_at_exit(self) -> None:
        """At exit: take the thaw's turn once the steps that another thread, still alive, has
        under way have ended, or ``wait`` seconds have passed (a thaw beside them would leave
        stopped what they stop next, once Python ends that thread)."""
        deadline = time.monotonic() + self.wait

        def take() -> bool:
            owner = self._owner[1] if self._under_way() else None
            alive = owner not in (None, threading.get_ident()) and owner in {
                t.ident for t in threading.enumerate()
            }  # (steps of a thread that is gone never end)
            late = time.monotonic() > deadline
            return (not alive or late) and self._thawing.acquire(blocking=False)

        try:
            self._until(take)
        except FreezeError:  # (past the deadline, or this thread's: beside them, then)
            self._thawing.acquire()  # once another thread's synchronous thaw is done

    @contextlib.contextmanager
    def for_thaw(self, *, after_freeze: bool = True) -> Iterator[None]:
        """Hold the thaw's turn while a synchronous thaw runs: taken once no steps are under
        way (see :meth:`wait_turn`); another thread's thaw waits for it (and then finds
        nothing left to thaw).

        Not ``after_freeze`` (a finalizer's thaw), it does not wait for steps an event loop
        left suspended, which may never end, but at exit it lets steps that another thread
        has under way end first (:meth:`_take_at_exit`). An interrupt there cuts the wait
        short: the thaw runs at once, and the interrupt is raised once it is done.
        """
        interrupt: BaseException | None = None
        if after_freeze:
            self._until(lambda: not self._under_way() and self._thawing.acquire(blocking=False))
        elif exiting():
            try:
                self._take_at_exit()
            except BaseException as err:  # noqa: BLE001 - raised once thawed
                interrupt = err
                if not self._thawing._is_owned():  # type: ignore[attr-defined]
                    self._thawing.acquire()  # (unless taken just before the interrupt)
        else:
            self._mine()
            self._thawing.acquire()
        try:
            yield
        finally:
            self._thawing.release()
        if interrupt is not None:
            raise interrupt


def run_sync(steps: Steps[T]) -> T:
    """Run ``steps`` to completion in this thread, sleeping where it asks to wait."""
    driver = _DRIVER.set("sync")
    try:
        wait = next(steps)
        while True:
            if wait.fd is not None:
                poller = select.poll()
                poller.register(wait.fd, select.POLLIN)
                poller.poll(max(0.0, wait.seconds) * 1000.0)
            elif wait.seconds > 0:
                time.sleep(wait.seconds)
            else:
                os.sched_yield()
            wait = steps.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        steps.close()
        _DRIVER.reset(driver)


def run_to_end(make: Callable[[], Steps[None]]) -> BaseException | None:
    """Run the resumable steps ``make()`` makes to their end, through interrupts.

    An exception that lands in them (``KeyboardInterrupt``, one raised by a signal handler)
    does not stop them: a fresh ``make()`` resumes where they stopped, and the first such
    exception is returned once they are done, for the caller to raise. Steps that fail twice
    in a row with an error of their own (or an interrupt storm, 100 times) raise it: the
    caller keeps its state for a later try.
    """
    interrupt: BaseException | None = None
    failures = 0
    while True:
        try:
            run_sync(make())
            return interrupt
        except BaseException as err:
            interrupt = interrupt or err
            failures += 1
            if (failures >= 2 and not isinstance(err, KeyboardInterrupt)) or failures >= 100:
                raise interrupt from None


async def run_async(steps: Steps[T]) -> T:
    """Run ``steps`` on the current anyio event loop (asyncio or trio), awaiting every wait.

    A cancellation delivered while waiting closes ``steps`` (which undoes its work) and
    then propagates.
    """
    import anyio
    import anyio.lowlevel

    between = _on_trio()
    driver = _DRIVER.set("async")
    try:
        wait = next(steps)
        while True:
            if wait.fd is not None:
                with anyio.move_on_after(max(0.0, wait.seconds)):
                    await anyio.wait_readable(wait.fd)
            elif wait.seconds > 0:
                await anyio.sleep(wait.seconds)
            else:
                await anyio.lowlevel.checkpoint()
            if between:
                # trio runs each batch of ready tasks in either order, so two stretches of
                # work, one each side of a wait, could follow each other with no other task
                # between (twice SLICE): one more turn puts every other task between them.
                await anyio.lowlevel.checkpoint()
            wait = steps.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        steps.close()
        _DRIVER.reset(driver)


def _on_trio() -> bool:
    """Whether the running event loop is trio's (imported, and this task is one of it)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
