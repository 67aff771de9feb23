"""``ProcessesGuard``: the one freezing core that every face drives."""

from __future__ import annotations

import inspect
import math
import os
import weakref
from collections.abc import Iterable
from types import TracebackType
from typing import Any, final

from ._backends import BACKENDS, Backend, Journal, Plan, create
from ._drive import Steps, run_sync
from ._report import FreezeReport, Skip
from ._snapshot import TreeSnapshot
from ._tree import ancestors, children_source
from ._watchdog import Watchdog, set_subreaper
from .errors import FreezeError, InvalidArgumentError, NoSuchProcessError, WatchdogError
from .procfs import ProcFS

__all__ = ["ProcessesGuard", "freeze_child_processes", "new_guard"]

#: Linux's PID_MAX_LIMIT: no PID is larger on any configuration.
PID_MAX_LIMIT = 4 * 1024 * 1024
SCOPES = ("tree", "namespace")


def check_pid(name: str, value: object) -> int:
    """``value`` as a PID, or :class:`InvalidArgumentError` saying what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(name, f"a PID must be an int, not {type(value).__name__}")
    if not 0 < value <= PID_MAX_LIMIT:
        raise InvalidArgumentError(name, f"a PID is between 1 and {PID_MAX_LIMIT}, not {value}")
    return value


def check_options(*, timeout: object, max_passes: object, partial_ok: object) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidArgumentError("timeout", f"must be a number of seconds, not {timeout!r}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise InvalidArgumentError("timeout", f"must be a positive finite number, not {timeout!r}")
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1:
        raise InvalidArgumentError("max_passes", f"must be an int >= 1, not {max_passes!r}")
    if not isinstance(partial_ok, bool):
        raise InvalidArgumentError("partial_ok", f"must be True or False, not {partial_ok!r}")


def new_guard(options: dict[str, Any]) -> ProcessesGuard:
    """A :class:`ProcessesGuard` from a face's options, an unknown name being an
    :class:`InvalidArgumentError` (not a bare ``TypeError``)."""
    for name in options:
        if name not in _OPTIONS:
            known = ", ".join(sorted(_OPTIONS))
            raise InvalidArgumentError(name, f"is not an option (the options are: {known})")
    return ProcessesGuard(**options)


def _thaw_now(backend: Backend) -> None:
    run_sync(backend.thaw())


@final
class ProcessesGuard:
    """Freezes the descendants of a process and always thaws them.

    ::

        with ProcessesGuard(exclude=[monitor.pid]) as guard:
            copy_memory(guard.pids)      # every task of every descendant is stopped here

    :param root: whose descendants to freeze (default: the calling process).
    :param include_root: also freeze ``root`` itself (never the caller, never PID 1).
    :param exclude: PIDs to leave running, each with its whole subtree (a monitor).
    :param timeout: seconds the whole freeze may take before :class:`StopTimeoutError`.
    :param max_passes: rounds of stopping newcomers before :class:`TreeUnstableError`.
    :param partial_ok: skip (and report) processes that may not be signalled instead of
        raising :class:`FreezePermissionError`.
    :param scope: ``"tree"`` (below ``root``) or ``"namespace"``: every process of the
        caller's PID namespace except PID 1, the caller, its ancestors and kernel threads.
    :param backend: ``"signal"`` (SIGSTOP/SIGCONT), ``"cgroup"`` (the kernel's cgroup
        freezer, for a tree alone in its cgroup) or ``"auto"`` (cgroup where the tree is
        alone in a cgroup made by :meth:`treeguard.cgroup.Cgroup.create`, else signal).
    :param watchdog: start a helper process that thaws the tree (or its cgroup) if this
        process dies without releasing (SIGKILL, crash, ``os._exit``).
    :param max_frozen: a lease in seconds: the watchdog thaws the tree when it runs out,
        even if this process is alive; :attr:`report` then says ``lease_expired``.
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
        root: int | None = None,
        *,
        include_root: bool = False,
        exclude: Iterable[int] = (),
        timeout: float = 1.0,
        max_passes: int = 3,
        partial_ok: bool = False,
        scope: str = "tree",
        backend: str = "signal",
        watchdog: bool = False,
        max_frozen: float | None = None,
        subreaper: bool = False,
    ) -> None:
        if root is not None:
            check_pid("root", root)
        if isinstance(exclude, str | bytes) or not isinstance(exclude, Iterable):
            raise InvalidArgumentError("exclude", "must be an iterable of PIDs")
        excluded = tuple(check_pid("exclude", pid) for pid in exclude)
        check_options(timeout=timeout, max_passes=max_passes, partial_ok=partial_ok)
        if not isinstance(include_root, bool):
            raise InvalidArgumentError("include_root", "must be True or False")
        if scope not in SCOPES:
            raise InvalidArgumentError("scope", f"must be one of {SCOPES}, not {scope!r}")
        if scope == "namespace" and root is not None:
            raise InvalidArgumentError("root", "scope='namespace' covers the whole namespace")
        if include_root:
            if root is None or root == os.getpid():
                raise InvalidArgumentError(
                    "include_root", "the calling process cannot freeze itself"
                )
            if root == 1:
                raise InvalidArgumentError("include_root", "PID 1 is never frozen")
        for flag, value in (("watchdog", watchdog), ("subreaper", subreaper)):
            if not isinstance(value, bool):
                raise InvalidArgumentError(flag, f"must be True or False, not {value!r}")
        if max_frozen is not None:
            if isinstance(max_frozen, bool) or not isinstance(max_frozen, int | float):
                raise InvalidArgumentError("max_frozen", f"must be seconds, not {max_frozen!r}")
            if not (max_frozen > 0 and math.isfinite(max_frozen)):
                raise InvalidArgumentError("max_frozen", f"must be positive, not {max_frozen!r}")
            watchdog = True  # the lease is kept by the watchdog
        if backend not in BACKENDS:
            raise InvalidArgumentError("backend", f"must be one of {BACKENDS}, not {backend!r}")
        self._root = root
        self._include_root = include_root
        self._exclude = excluded
        self._timeout = float(timeout)
        self._max_passes = max_passes
        self._partial_ok = partial_ok
        self._scope = scope
        self._backend_name = backend
        self._backend: Backend | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._helpers: tuple[int, ...] = ()  # the supervisor's own helper processes
        self._journal: Journal | None = None
        self._want_watchdog = watchdog
        self._max_frozen = None if max_frozen is None else float(max_frozen)
        self._watchdog: Watchdog | None = None
        if subreaper:
            set_subreaper()
        self.report = FreezeReport(backend=backend, scope=scope)

    # -- the freezing core --------------------------------------------------------------

    def _plan(self) -> Plan:
        fs = ProcFS()
        me = os.getpid()
        blocked = {pid: Skip.EXCLUDED for pid in self._exclude}
        blocked.update((pid, Skip.SUPERVISOR) for pid in self._helpers)
        chain = ancestors(fs)
        if self._scope == "namespace":
            starts: tuple[int, ...] = (0,)
            passthrough = {0, 1, me, *chain}
        else:
            root = me if self._root is None else self._root
            if fs.stat(root) is None:
                raise NoSuchProcessError(root)
            starts = (root,)
            # Never stop whoever waits for us: the caller's ancestors are walked through.
            passthrough = set(chain)
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
        )

    def _freeze_steps(self) -> Steps[ProcessesGuard]:
        """Freeze, as steps for a driver (:mod:`treeguard._drive`)."""
        if self.frozen:
            raise FreezeError("this guard is frozen already: release() it before freezing again")
        if self._want_watchdog:
            if self._watchdog is None:
                self._watchdog = Watchdog.start()
                weakref.finalize(self, self._watchdog.close)
            self._helpers = (self._watchdog.pid,)
            self._journal = self._watchdog.journal
            self._watchdog.arm(self._max_frozen)
        plan = self._plan()
        backend = create(self._backend_name, plan)
        self.report = backend.report
        self._backend = backend
        # Armed before the first signal: whatever happens from here on, this thaws.
        self._finalizer = weakref.finalize(self, _thaw_now, backend)
        try:
            yield from backend.freeze()
            if self._watchdog is not None and self._watchdog.lease_expired():
                # The lease ran out while freezing: the helper thawed part of the tree, so
                # this freeze proves nothing. Thaw the rest (below) and say so.
                raise WatchdogError(
                    f"the lease (max_frozen={self._max_frozen}) ran out before the freeze "
                    "completed; everything was thawed: raise max_frozen"
                )
        except BaseException:
            # Thaw and disarm. A backend that raised thawed on its own way out (this is then a
            # no-op); after the lease check above, this is the thaw.
            self._finalizer()
            raise
        return self

    def _thaw_steps(self) -> Steps[None]:
        """Thaw, as steps for a driver; :meth:`release` does the same synchronously."""
        if self._backend is not None and self.frozen:
            yield from self._backend.thaw()
        self.release()

    def _detach(self) -> None:
        """Stop owning the freeze without thawing it (a token now owns it): no thaw on
        release, garbage collection or exit."""
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
        process that has gone meanwhile."""
        if self._finalizer is not None and self._finalizer.alive:
            assert self._backend is not None
            # Disarmed only once the thaw is over: a release() cut short (KeyboardInterrupt)
            # is finished by the next one, since a backend's thaw is resumable.
            _thaw_now(self._backend)
            self._finalizer.detach()
            if self._watchdog is not None:
                self.report.lease_expired = self._watchdog.lease_expired()

    def snapshot(self) -> TreeSnapshot:
        """A snapshot of the processes this guard froze (consistent while frozen)."""
        from ._snapshot import snapshot_of_guard

        return snapshot_of_guard(self)

    @property
    def frozen(self) -> bool:
        """Whether this guard holds a tree stopped."""
        return self._finalizer is not None and self._finalizer.alive

    @property
    def pids(self) -> tuple[int, ...]:
        """The processes this guard stopped, parent-first (empty before the first freeze)."""
        return () if self._backend is None else self._backend.pids

    @property
    def identities(self) -> tuple[tuple[int, int], ...]:
        """``(pid, starttime)`` of each process this guard stopped, parent-first."""
        return () if self._backend is None else self._backend.identities

    @property
    def already_stopped(self) -> tuple[tuple[int, int], ...]:
        """``(pid, starttime)`` of the processes found stopped by someone else."""
        return () if self._backend is None else self._backend.already_stopped

    def __enter__(self) -> ProcessesGuard:
        """Freeze, unless already frozen (``with freeze_child_processes(m) as guard:``)."""
        return self if self.frozen else self.freeze()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = f"frozen, {len(self.pids)} processes" if self.frozen else "thawed"
        target = "namespace" if self._scope == "namespace" else f"root={self._root or os.getpid()}"
        return f"<ProcessesGuard {target} backend={self.report.backend} {state}>"


def freeze_child_processes(
    monitor_pid: int | None = None, *, timeout: float = 1.0, max_passes: int = 3
) -> ProcessesGuard:
    """Freeze every descendant of the calling process except ``monitor_pid`` and its subtree.

    The crosvm-shaped entry point: returns a frozen :class:`ProcessesGuard`; release it (or
    let it go out of scope) to thaw.

    :raises InvalidArgumentError: if ``monitor_pid`` is not a valid PID.
    :raises FreezeError: as :meth:`ProcessesGuard.freeze`.
    """
    exclude = () if monitor_pid is None else (check_pid("monitor_pid", monitor_pid),)
    return ProcessesGuard(exclude=exclude, timeout=timeout, max_passes=max_passes).freeze()


_OPTIONS = frozenset(inspect.signature(ProcessesGuard).parameters)
