"""``ProcessesGuard``: the one freezing core that every face drives."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, final

from ._backends import BACKENDS, Backend, Journal, Memo, Plan, create
from ._checks import as_pid, check_guard, check_proc, check_process
from ._drive import OneAtATime, Steps, run_sync, run_to_end
from ._finalizers import Finalizer, sweep, too_late
from ._report import FreezeReport, Skip
from ._subreaper import set_subreaper
from ._tree import Root, ancestors, children_source
from ._types import BackendName, Scope, Target
from ._watchdog import Watchdog, helper_pids
from .errors import FreezeError, InvalidArgumentError, WatchdogError
from .procfs import ProcFS

if TYPE_CHECKING:  # (a snapshot's modules are imported by the first snapshot())
    from ._snapshot import TreeSnapshot

__all__ = ["ProcessesGuard", "new_guard"]


def new_guard(options: dict[str, Any]) -> ProcessesGuard:
    """A guard from a face's options (an unknown name: InvalidArgumentError, not TypeError)."""
    for name in options:
        if name not in _OPTIONS:
            known = ", ".join(sorted(_OPTIONS))
            raise InvalidArgumentError(name, f"is not an option (the options are: {known})")
    return ProcessesGuard(**options)


def _thaw_now(backend: Backend, owner: int, turn: OneAtATime) -> None:
    """The finalizer's thaw (collection, exit), through interrupts, once another thread's
    thaw, or at exit its freeze, is done; only in the process that froze (a forked child
    inherits the guard, its pidfds and this finalizer)."""
    if os.getpid() == owner:
        with turn.for_thaw(after_freeze=False):
            interrupt = run_to_end(backend.thaw)
        if interrupt is not None:
            raise interrupt


@final
class ProcessesGuard:
    """Freezes the descendants of a process and always thaws them.

    ::

        with ProcessesGuard(exclude=[monitor.pid]) as guard:
            copy_memory(guard.pids)      # every task of every descendant is stopped here

    :param root: whose descendants to freeze (default: the calling process): a PID, a
        ``subprocess.Popen``, a ``multiprocessing.Process`` or a ``psutil.Process`` (whose
        identity is checked before anything is signalled).
    :param include_root: also freeze ``root`` itself (never the caller, never PID 1).
    :param exclude: processes (PIDs or process objects) to leave running, each with its
        whole subtree (a monitor).
    :param timeout: seconds the whole freeze may take before :class:`StopTimeoutError`.
    :param max_passes: rounds of stopping newcomers before :class:`TreeUnstableError`.
    :param partial_ok: skip (and report) processes that may not be signalled instead of
        raising :class:`FreezePermissionError`.
    :param scope: ``"tree"`` (below ``root``) or ``"namespace"``: every process of the
        caller's PID namespace except PID 1, the caller, its ancestors and kernel threads.
    :param backend: ``"signal"`` (SIGSTOP/SIGCONT), ``"cgroup"`` (the kernel's cgroup
        freezer, for a tree alone in its cgroup), ``"ptrace"`` (every thread seized with
        ``PTRACE_SEIZE``, invisible to the tree) or ``"auto"`` (cgroup where the tree is
        alone in a cgroup made by :meth:`treeguard.cgroup.Cgroup.create`, else signal).
    :param watchdog: start a helper process that thaws the tree (or its cgroup) if this
        process dies without releasing (SIGKILL, crash, ``os._exit``). With ``"ptrace"``
        the kernel does that (it detaches every tracee of a dead tracer): no helper.
    :param max_frozen: a lease in seconds: the watchdog thaws the tree when it runs out,
        even if this process is alive; :attr:`report` then says ``lease_expired``. Not
        with ``"ptrace"``.
    :param subreaper: make this process a child subreaper, so that a double-forking
        descendant stays in the tree (this process must then reap such orphans).
    :raises InvalidArgumentError: if an argument is of the wrong type or out of range.

    The caller, its ancestors (unless one is ``root`` with ``include_root=True``) and the
    caller's other helpers are never stopped. Processes found already stopped stay stopped
    after the thaw. A guard that is garbage-collected, or still frozen when the interpreter
    exits, thaws. One guard may be frozen and released any number of times.
    """

    def __init__(
        self,
        root: Target | None = None,
        *,
        include_root: bool = False,
        exclude: Iterable[Target] = (),
        timeout: float = 1.0,
        max_passes: int = 3,
        partial_ok: bool = False,
        scope: Scope = "tree",
        backend: BackendName = "signal",
        watchdog: bool = False,
        max_frozen: float | None = None,
        subreaper: bool = False,
    ) -> None:
        root_pid, excluded, watchdog = check_guard(
            root=root,
            include_root=include_root,
            exclude=exclude,
            timeout=timeout,
            max_passes=max_passes,
            partial_ok=partial_ok,
            scope=scope,
            backend=backend,
            backends=BACKENDS,
            watchdog=watchdog,
            max_frozen=max_frozen,
            subreaper=subreaper,
        )
        self._root = root_pid
        # (a process object, psutil.Process, is asked at each freeze if its PID still names it)
        self._root_object = None if isinstance(root, int) else root
        self._include_root = include_root
        self._exclude = excluded
        self._timeout = float(timeout)
        self._max_passes = max_passes
        self._partial_ok = partial_ok
        self._scope = scope
        self._backend_name = backend
        self._backend: Backend | None = None
        self._finalizer: Finalizer | None = None
        self._owner = 0  # the process that froze: the only one that may thaw
        self._depth = 0  # nested ``with`` blocks entered on this guard
        self._portable = False  # set by the token face: another process will thaw
        self._helpers: tuple[int, ...] = ()  # the supervisor's own helper processes
        self._journal: Journal | None = None
        self._want_watchdog = watchdog
        self._max_frozen = None if max_frozen is None else float(max_frozen)
        self._watchdog: Watchdog | None = None
        self._dog_finalizer: Finalizer | None = None  # (detached once the helper is closed)
        self._memo = Memo()  # what a freeze keeps for the next (the cgroup census)
        self._root_check = Root()
        # One freeze or thaw at a time; another thread waits two freezes and a second.
        self._turn = OneAtATime(wait=2 * self._timeout + 1.0)
        Finalizer(self, self._memo.close)
        if subreaper:
            set_subreaper()
        self.report = FreezeReport(backend=backend, scope=scope)

    # -- the freezing core --------------------------------------------------------------

    def _plan(self) -> Plan:
        fs = ProcFS()
        check_proc(fs)
        for pid in self._exclude:
            check_process("exclude", pid, fs)
        me = os.getpid()
        blocked = {pid: Skip.EXCLUDED for pid in self._exclude}
        blocked.update((pid, Skip.SUPERVISOR) for pid in (*self._helpers, *helper_pids()))
        if self._scope == "namespace":
            starts: tuple[int, ...] = (0,)
            passthrough = {0, 1, me, *ancestors(fs)}
        else:
            root = me if self._root is None else self._root
            if self._root_object is not None:
                as_pid("root", self._root_object)
            if root != me:  # (the caller needs no look: it runs this)
                try:
                    self._root_check.check(root, fs)
                finally:  # (closed with the memo: a close() meanwhile may have emptied it)
                    self._memo.put("root", self._root_check)
            starts = (root,)
            # Never stop whoever waits for us: the caller's ancestors are walked through (a
            # signal walk down from the caller meets none: no process is its own ancestor).
            walks_down = root == me and self._backend_name == "signal"
            passthrough = set() if walks_down else set(ancestors(fs))
            if self._include_root:
                passthrough.discard(root)
            else:
                passthrough.add(root)
            if root != me:
                blocked[me] = Skip.SUPERVISOR
        return Plan(
            starts=starts,
            passthrough=frozenset(passthrough),
            blocked=blocked,
            timeout=self._timeout,
            max_passes=self._max_passes,
            partial_ok=self._partial_ok,
            scope=self._scope,
            fs=fs,
            source=children_source(fs),
            journal=self._journal,
            report=FreezeReport(backend=self._backend_name, scope=self._scope),
            trace_ok=self._max_frozen is None and not self._portable,
            memo=self._memo,
        )

    def _freeze_steps(self) -> Steps[ProcessesGuard]:
        """Freeze, as steps for a driver, once no other freeze or thaw of it is under way."""
        return self._turn.queued(self._freeze_held())

    def _freeze_held(self) -> Steps[ProcessesGuard]:
        sweep()  # a guard collected meanwhile whose thaw an interrupt cut short
        if self.frozen:
            raise FreezeError("this guard is frozen already: release() it before freezing again")
        clock = time.perf_counter
        start = clock()
        if self._want_watchdog:
            if self._watchdog is None:
                self._watchdog = Watchdog.start()
                self._dog_finalizer = Finalizer(self, self._watchdog.close)
            self._helpers = (self._watchdog.pid,)
            self._journal = self._watchdog.journal
            self._watchdog.arm(self._max_frozen)
        plan = self._plan()
        backend = create(self._backend_name, plan)
        self.report = backend.report
        self._backend = backend
        self._owner = os.getpid()
        # Armed before the first signal: whatever happens from here on, this thaws (disarmed
        # only once a thaw ran to its end); looked at too_late() after, so the exit runs it.
        self._finalizer = Finalizer(self, _thaw_now, backend, self._owner, self._turn)
        planned = clock()
        try:
            if too_late():
                raise FreezeError("the interpreter is exiting: nothing would thaw this freeze")
            yield from backend.freeze()
            # The caller's clock: the whole call (set after auto copied its inner report).
            self.report.plan_seconds = planned - start
            self.report.freeze_seconds = clock() - start
            if self._watchdog is not None and self._watchdog.lease_expired():
                # The lease ran out: the helper thawed part of the tree. Thaw the rest (below).
                raise WatchdogError(
                    f"the lease (max_frozen={self._max_frozen}) ran out before the freeze "
                    "completed; everything was thawed: raise max_frozen"
                )
        except BaseException:
            # A backend that raised thawed on its own way out (this finishes what an
            # interrupt may have cut short); after the lease check above, this is the thaw.
            self._release_held()
            raise
        return self

    def _thaw_steps(self) -> Steps[None]:
        """Thaw, as steps for a driver (:meth:`release` thaws too, and ends a thaw cut short),
        once no other freeze or thaw of this guard is under way."""
        return self._turn.queued(self._thaw_held())

    def _thaw_held(self) -> Steps[None]:
        if self._backend is not None and self.frozen:
            yield from self._backend.thaw()
            self._disarm()

    def _disarm(self) -> None:
        """The thaw ran to its end: forget the freeze (never before)."""
        assert self._finalizer is not None
        self._finalizer.detach()
        self._depth = 0
        if self._watchdog is not None:
            self.report.lease_expired = self._watchdog.lease_expired()
            self.report.watchdog_lost = not self._watchdog.alive()

    def _detach(self) -> None:
        """Stop owning the freeze, unthawed (a token owns it): no thaw on release, GC or exit."""
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._backend is not None:
            self._backend.detach()

    # -- the public face ----------------------------------------------------------------

    def freeze(self) -> ProcessesGuard:
        """Stop every process of the tree and verify that every task stopped.

        :returns: this guard, frozen.
        :raises NoSuchProcessError: if ``root`` does not exist.
        :raises FreezePermissionError: if a process may not be signalled (unless
            ``partial_ok``).
        :raises StopTimeoutError: if some task did not stop within ``timeout``.
        :raises TreeUnstableError: if processes kept forking for ``max_passes`` rounds.
        :raises FreezeError: if this guard is frozen already.

        Whatever it raises, nothing is left stopped.
        """
        return run_sync(self._freeze_steps())

    def release(self) -> None:
        """Thaw what this guard stopped (children first). Idempotent; never raises for a
        process that has gone meanwhile.

        The thaw is resumable: a process is forgotten only once it was resumed. An interrupt
        (``KeyboardInterrupt``, an exception from a signal handler) that lands in the thaw
        does not stop it: the thaw goes on and the interrupt is raised once it is done. If the
        thaw still cannot finish (an error), the guard stays armed, and the next
        ``release()``, garbage collection or interpreter exit finishes it.

        In a forked child of the process that froze, this does nothing. Called while another
        thread freezes or thaws this guard, it waits for that to end; called from another
        task of the event loop that runs a freeze or an async thaw of this guard (or from a
        signal handler that interrupted one), it raises FreezeError."""
        try:
            sweep()
        finally:  # (an interrupt in another guard's thaw is raised once this one is done)
            if self.frozen:  # (a forked child never waits for its parent's threads)
                with self._turn.for_thaw():
                    self._release_held()

    def _release_held(self) -> None:
        backend = self._backend
        if backend is None or not self.frozen:
            return
        interrupt = run_to_end(backend.thaw)
        self._disarm()  # forgotten only after the thaw ran to its end
        if interrupt is not None:
            raise interrupt

    def close(self) -> None:
        """Release (if frozen) and stop this guard's watchdog helper, if it has one.

        Idempotent. The guard may freeze again afterwards; with ``watchdog=True`` that
        starts a new helper. A guard that is garbage-collected closes itself.
        """
        self.release()
        self._memo.close()
        dog, self._watchdog = self._watchdog, None
        if dog is not None:
            dog.close()
            if self._dog_finalizer is not None:  # (else one pending per helper closed)
                self._dog_finalizer.detach()

    @property
    def helper_pid(self) -> int | None:
        """The PID of this guard's watchdog helper while it has one (``watchdog=True`` or
        ``max_frozen``, from the first freeze until :meth:`close`), else None."""
        return None if self._watchdog is None else self._watchdog.pid

    def snapshot(self, *, describe: bool = True, pss: bool = False) -> TreeSnapshot:
        """A snapshot of the processes this guard froze (consistent while frozen).

        :param describe: also read what each process is (command line, user, RSS, CPU
            times), after the states: see :func:`treeguard.snapshot`. Nothing of it may
            block on the frozen tree: user names come from ``/etc/passwd`` only (not from
            an NSS daemon such as sssd or nscd, which may be frozen), and a process with a
            task not proven stopped (in ``D``: it may hold its memory-map lock, waiting on
            a frozen FUSE server) gets no command line or PSS. Pass ``describe=False`` if
            the tree may serve files this process reads (a FUSE server of ``/etc`` or of
            the Python installation psutil is imported from).
        :param pss: also read each process's proportional set size (what a copy of the
            tree's memory takes: ``snapshot.memory["pss"]``); slower.
        :raises InvalidArgumentError: if an option is not True or False.
        """
        from ._snapshot_read import snapshot_of_freeze

        held = (self.identities, self.already_stopped, self.report, self.frozen)
        return snapshot_of_freeze(*held, describe=describe, pss=pss)

    @property
    def frozen(self) -> bool:
        """Whether this guard holds a tree stopped (always False in a forked child of the
        process that froze: only that process may thaw)."""
        return self._finalizer is not None and self._finalizer.alive and self._owner == os.getpid()

    @property
    def pids(self) -> tuple[int, ...]:
        """The processes this guard holds stopped, parent-first (empty while it is not
        frozen, on every backend; ``report.stopped`` keeps the count)."""
        return self._backend.pids if self._backend is not None and self.frozen else ()

    @property
    def identities(self) -> tuple[tuple[int, int], ...]:
        """``(pid, starttime)`` of each process this guard stopped, parent-first."""
        return () if self._backend is None else self._backend.identities

    @property
    def already_stopped(self) -> tuple[tuple[int, int], ...]:
        """``(pid, starttime)`` of the processes found stopped by someone else."""
        return () if self._backend is None else self._backend.already_stopped

    def __enter__(self) -> ProcessesGuard:
        """Freeze, unless already frozen (``with freeze_child_processes(m) as guard:``).

        ``with`` blocks on one guard nest: the tree is thawed when the outermost one exits
        (or at an explicit :meth:`release`)."""
        if not self.frozen:
            self.freeze()
        self._depth += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self.release()

    def __repr__(self) -> str:
        state = f"frozen, {len(self.pids)} processes" if self.frozen else "thawed"
        target = "namespace" if self._scope == "namespace" else f"root={self._root or os.getpid()}"
        return f"<ProcessesGuard {target} backend={self.report.backend} {state}>"


_OPTIONS = frozenset(inspect.signature(ProcessesGuard).parameters)
