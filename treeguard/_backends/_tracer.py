"""One thread that makes every ptrace request of one freeze, and step generators that wait
for it without blocking.

The kernel accepts ptrace requests for a tracee only from the thread that attached it
(ptrace(2)); a guard's thaw may come from a finalizer, another thread, or an event loop.
So each freeze holds a tracer thread (:class:`Tracer`) from its first seize to its last
detach, and any thread hands it work through a queue and waits for the result as a
:class:`~treeguard._drive.Wait` on an eventfd that the tracer writes when the work is done:
the sync driver polls it, the anyio driver awaits it, and neither blocks anything else
meanwhile. A caller interrupted while waiting does not stop the work: the tracer finishes
it. A thread let go waits a while for the next freeze of this process (:class:`_Worker`).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # the C half of signal (no stubs)
import os
import queue
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from .._drive import SLICE, YIELD, Steps, Wait

__all__ = ["Tracer"]

T = TypeVar("T")

#: How often the tracer thread looks again at tasks a thaw could not let go yet.
_LINGER_POLL = 0.05
#: Longest sleep between two looks at a request when no eventfd could be had.
_POLL = 0.0005
#: How long an idle tracer thread waits for the next freeze before it ends.
_IDLE = 10.0
#: Longest wait of a paused tracer for the event loop it let run (see :class:`_Request`).
_PAUSE = 0.05
#: How long after its start a tracer thread that has not run is taken for lost (see
#: :meth:`_Worker.relaunch_if_lost`).
_RELAUNCH = 1.0
#: Every signal, as plain numbers (see :meth:`_Worker._launch`).
_EVERY_SIGNAL = frozenset(_signal.valid_signals())


class _Request(Generic[T]):
    """One piece of work for the tracer, and the eventfd that says it is done.

    ``sliced``: the waiter runs an event loop, which waits on the eventfd for the GIL that
    the tracer thread holds but for its system calls. CPython hands the GIL to a waiting
    thread only once it has waited a whole switch interval (5 ms) without a release, and
    each short release wakes the waiter to try again, so a loop can starve for longer than
    that. So every :data:`~treeguard._drive.SLICE` of work the tracer writes the eventfd
    and waits until the loop's thread has come for it (:meth:`pause`). The other way round,
    a loop whose tasks always want the GIL would keep the tracer waiting a switch interval
    for each slice (an async freeze several times as long as a synchronous one): so the
    loop's thread, once it has run a round of its tasks, lets the tracer work its next slice
    while it waits in poll(2), without the GIL, for a slice at most (:meth:`await_slice`)."""

    def __init__(self, work: Callable[[], T], sliced: bool) -> None:
        self.work = work
        self.done = False
        self._value: T | None = None
        self._error: BaseException | None = None
        # The eventfd is closed by the last of the two to let go of it: the tracer once the
        # work ran, the waiter once it stopped waiting. So it is never written or read once
        # closed (and perhaps reused for another file), and neither makes a system call
        # under the lock that the other may then wait for (a thread to wake, on the path
        # of every request).
        self._lock = threading.Lock()
        self._holders = 2
        self._abandoned = False
        try:
            self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError:
            self.fd = -1  # out of descriptors: the waiter polls instead
        self.sliced = sliced and self.fd >= 0
        self.paused = False
        self.next_pause = 0.0
        self._resume = threading.Event() if self.sliced else None

    def run(self) -> None:
        self.next_pause = time.perf_counter() + SLICE
        try:
            self._value = self.work()
        except BaseException as err:  # handed to the waiter, who raises it
            self._error = err
        self.done = True
        if self.fd >= 0 and not self._abandoned:
            os.eventfd_write(self.fd, 1)
        self._let_go()

    def pause(self) -> None:
        """(The tracer thread.) Let the waiter run: wake it, and wait until it has come
        (:meth:`resume`), or for :data:`_PAUSE` seconds at most."""
        resume = self._resume
        assert resume is not None
        resume.clear()
        if self._abandoned:
            return
        self.paused = True
        os.eventfd_write(self.fd, 1)  # the tracer holds the descriptor until the work ends
        resume.wait(_PAUSE)
        self.next_pause = time.perf_counter() + SLICE

    def await_slice(self) -> None:
        """(The waiter, under an event loop.) Wait in poll(2), the GIL free for the tracer,
        until it pauses or is done, for one :data:`~treeguard._drive.SLICE` at most (the
        loop's thread is blocked for as long as the tracer's slice would keep it waiting
        for the GIL anyway)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.poll(SLICE * 1000.0)

    def resume(self) -> None:
        """(The waiter.) Woken: read the eventfd empty, and let a paused tracer go on."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass  # nothing written since the last look
        if self.paused and self._resume is not None:
            self.paused = False
            self._resume.set()

    def close(self) -> None:
        """The waiter is done with this request (the work may go on without it)."""
        self._abandoned = True
        if self._resume is not None:
            self._resume.set()  # a pause waits for nobody now
        self._let_go()

    def drop(self) -> None:
        """A request that was never handed to the tracer: nothing of it remains."""
        self._holders = 1
        self.close()

    def _let_go(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class Tracer:
    """A freeze's hold on a tracer thread, from the first seize to the last detach.

    ``linger`` is called between requests once :attr:`finished` is set (the thaw ran): it
    lets go of tasks the thaw could not detach yet and says whether any remain. When none
    do, the hold ends: its thread waits, idle, for the next freeze of this process (starting
    a thread costs more than a small freeze), and ends after :data:`_IDLE` seconds unused.
    """

    def __init__(self, linger: Callable[[], bool]) -> None:
        self.finished = False
        self._linger = linger
        self._queue: queue.SimpleQueue[_Request[object]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._worker: _Worker | None = None
        self._launched = False
        self._running: _Request[object] | None = None

    def start(self) -> None:
        """Take the idle tracer thread, or make one: it is woken (or started, see
        :meth:`_Worker.serve`) with the first request already queued, so that it wakes
        once, not once for the hold and once more for the request."""
        self._worker = _Worker.take() or _Worker()
        self._launched = False

    def steps(self, work: Callable[[], T]) -> Steps[T | None]:
        """Run ``work`` in the tracer thread; its result, or None if this hold has ended
        (everything was let go already)."""
        worker = self._worker
        if worker is not None and threading.get_ident() == worker.ident:
            # A finalizer that the garbage collector ran in this very thread (which may
            # serve another freeze by now: an ended hold has nothing left to do).
            return None if self._closed else work()
        request: _Request[T] = _Request(work, _in_event_loop())
        with self._lock:
            if self._closed or worker is None:  # ended, or never started
                request.drop()
                return None
            self._queue.put(request)  # type: ignore[arg-type]
            launch, self._launched = not self._launched, True
        try:
            if launch:
                worker.serve(self)
            while not request.done:
                if request.sliced:
                    request.await_slice()  # (the eventfd is the waiter's until it closes it)
                yield Wait(_LINGER_POLL, request.fd) if request.fd >= 0 else Wait(_POLL)
                worker.relaunch_if_lost()
                if request.paused:
                    # The loop's other tasks run first (the tracer takes the GIL as soon
                    # as this thread lets go of it, in the loop's next system call).
                    yield YIELD
                if request.sliced:
                    request.resume()
        finally:
            request.close()
        return request.result()

    def pause_if_due(self) -> None:
        """(The tracer thread, between two steps of a request's work.) Let the event loop
        that waits for the request run, once every :data:`~treeguard._drive.SLICE`."""
        request = self._running
        if request is not None and request.sliced and time.perf_counter() >= request.next_pause:
            request.pause()

    def _serve(self) -> None:
        """Serve this hold's requests in the tracer thread, until it has let go of all."""
        while True:
            if self.finished:
                try:
                    left = self._linger()
                except Exception:  # never let the thread die: waiters depend on it
                    left = True
                with self._lock:
                    if not left and self._queue.empty():
                        self._closed = True
                        return
            try:
                request = self._queue.get(timeout=_LINGER_POLL if self.finished else None)
            except queue.Empty:
                continue
            self._running = request
            try:
                request.run()
            finally:
                self._running = None


class _Worker:
    """A tracer thread: it serves one :class:`Tracer` at a time, and in between waits to
    be taken by the next (at most one waits: :data:`_idle`)."""

    def __init__(self) -> None:
        self._assigned: queue.SimpleQueue[Tracer] = queue.SimpleQueue()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None  # the thread that runs, once it does
        self.ident: int | None = None
        self._launched = 0.0

    @staticmethod
    def take() -> _Worker | None:
        """The idle tracer thread of this process, now taken; None if there is none."""
        global _idle
        with _idle_lock:
            worker, _idle = _idle, None
        if worker is None or worker._pid != os.getpid():
            return None  # none, or a thread of the parent of this forked process
        if worker._thread is None or not worker._thread.is_alive():
            return None
        return worker

    def serve(self, tracer: Tracer) -> None:
        """Serve ``tracer`` next: wake this thread, or start it."""
        self._assigned.put(tracer)
        if self.ident is None:
            self._launch()

    def relaunch_if_lost(self) -> None:
        """(A waiter.) Start the thread again if none has run :data:`_RELAUNCH` seconds
        after it was started: an interrupt may have cut :meth:`_launch` short before the
        thread was made."""
        if self.ident is None and time.monotonic() - self._launched > _RELAUNCH:
            self._launch()

    def _launch(self) -> None:
        """Start a thread with every signal blocked: a handler that raises (Ctrl-C) must
        not land inside threading's own locks, and the thread inherits the mask, so that
        process-directed signals go to the other threads (pthread_sigmask(3)). A signal
        that arrived meanwhile is acted on when the mask is restored, after the start.

        A handler that raises may still land anywhere in here (Python runs every handler
        in the main thread, whatever its mask): the mask is read before it is changed, so
        that it is always restored, and whether a thread came of it or not, the first
        thread that runs serves (:meth:`_bootstrap`), a later one ends at once, and a
        waiter starts one again if none ran (:meth:`relaunch_if_lost`)."""
        self._launched = time.monotonic()
        thread = threading.Thread(target=self._bootstrap, name="treeguard-ptrace", daemon=True)
        # The C functions themselves: the signal module's wrappers turn each of the 64
        # signals of both masks into an enum member, a third of a millisecond per freeze.
        previous = _signal.pthread_sigmask(signal.SIG_BLOCK, ())  # the mask, unchanged
        try:
            _signal.pthread_sigmask(signal.SIG_BLOCK, _EVERY_SIGNAL)
            thread.start()
        finally:
            _signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _bootstrap(self) -> None:
        with self._lock:
            if self.ident is not None:
                return  # a thread of an earlier start runs already
            self._thread, self.ident = threading.current_thread(), threading.get_ident()
        self._run()

    def _run(self) -> None:
        tracer: Tracer | None = self._assigned.get()
        while tracer is not None:
            tracer._serve()
            tracer = self._park()

    def _park(self) -> Tracer | None:
        """Wait to be taken by the next freeze: its hold, or None to end the thread."""
        global _idle
        with _idle_lock:
            if _idle is not None:
                return None  # one idle thread is enough
            _idle = self
        try:
            return self._assigned.get(timeout=_IDLE)
        except queue.Empty:
            with _idle_lock:
                if _idle is self:
                    _idle = None
                    return None
            return self._assigned.get()  # taken as the wait ended: its hold is on the way


def _in_event_loop() -> bool:
    """Whether this thread runs an event loop (asyncio or trio), as sniffio tells: it is
    imported with anyio, which the async face uses."""
    sniffio = sys.modules.get("sniffio")
    if sniffio is None:
        return False
    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return False
    return True


_idle: _Worker | None = None
_idle_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # The idle thread is the parent's, and the lock may have been held by it at the fork.
    global _idle, _idle_lock
    _idle, _idle_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
