"""The watchdog helper process: thaws the tree when its supervisor dies, or a lease runs out.

Started by :meth:`treeguard._watchdog.Watchdog.start` as a fresh interpreter (``python -I
-S``) that loads this module, :mod:`treeguard._journal` and the thaw, not the package's
``__init__``. It names itself :data:`~treeguard.procfs.HELPER_COMM` before anything else, so
that no guard stops it, and sleeps in ``poll(2)`` on a pidfd of the supervisor (readable
once it has exited, pidfd_open(2)), on a command pipe (``a``: armed, ``q``: quit) and on
SIGTERM (through the wakeup fd). poll(2) takes an ``int`` of milliseconds (about 24.8 days
at most), so a longer lease is waited for in polls of at most :data:`MAX_POLL` seconds.

It thaws every record it can: one it may not signal (EPERM), or anything else that goes
wrong for one record or for the cgroup, is written to its stderr and skipped, never the end
of the thaw.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence

from ._journal import (
    _CGROUP,
    _CGROUP_OFFSET,
    _COUNT,
    _COUNT_OFFSET,
    _EXPIRED_OFFSET,
    _HEADER,
    _PATH_MAX,
    _PATH_OFFSET,
    _RECORD,
    _RECORDS_OFFSET,
    CAPACITY,
    FROZEN,
    OUTLIVE,
    lock,
    unlock,
)
from .procfs import HELPER_COMM

__all__ = ["MAX_POLL"]

#: The longest single poll(2) of the helper, in seconds: far below the ``int`` of
#: milliseconds that poll(2) takes (2**31 - 1 ms, about 24.8 days).
MAX_POLL = 3600.0


class _Helper:
    def __init__(self, mem: mmap.mmap, lock_fd: int) -> None:
        self.mem = mem
        self.lock_fd = lock_fd
        self.thaw_identities: (
            Callable[[Iterable[tuple[int, ...]]], tuple[int, list[int]]] | None
        ) = None
        self.thaw_cgroup: Callable[[int, str, int | None], int] | None = None

    def load(self) -> None:
        from ._backends._freezers import thaw_cgroup
        from ._thaw import has_pidfs, thaw_identities

        has_pidfs()  # learned now, not when the thaw is short of descriptors

        self.thaw_identities = thaw_identities
        self.thaw_cgroup = thaw_cgroup

    def header(self) -> tuple[int, int, int, int, int, int, float]:
        return _HEADER.unpack_from(self.mem, 0)

    def records(self) -> list[tuple[int, int, int]]:
        count = min(_COUNT.unpack_from(self.mem, _COUNT_OFFSET)[0], CAPACITY)
        return [
            _RECORD.unpack_from(self.mem, _RECORDS_OFFSET + i * _RECORD.size) for i in range(count)
        ]

    def cgroup(self) -> tuple[int, str, int] | None:
        """``(version, path, inode)`` of the cgroup recorded, if any."""
        version, length, inode = _CGROUP.unpack_from(self.mem, _CGROUP_OFFSET)
        if not version:
            return None
        raw = bytes(self.mem[_PATH_OFFSET : _PATH_OFFSET + min(length, _PATH_MAX)])
        return version, os.fsdecode(raw), inode

    def outlive(self) -> bool:
        """Whether the supervisor handed the freeze over (its exit does not thaw)."""
        return bool(self.header()[3] & OUTLIVE)

    def thaw(self) -> None:
        """Thaw the cgroup and every record that can be thawed; never raises.

        thaw_identities signals last first (children first), each through a pidfd opened
        before its identity is checked: a PID that now names another process is skipped.
        thaw_cgroup likewise leaves alone a directory whose inode changed. The records are
        thawed one call each, so that nothing one of them raises stops the rest.
        """
        try:
            if self.thaw_identities is None or self.thaw_cgroup is None:
                self.load()
            assert self.thaw_identities is not None
            assert self.thaw_cgroup is not None
        except Exception as err:  # noqa: BLE001 - nothing can be thawed: say why, and live
            _complain(f"cannot load the thaw: {err!r}")
            return
        from ._thaw import resume_relay  # loaded with thaw_identities above

        cgroup = self.cgroup()
        if cgroup is not None:
            try:
                self.thaw_cgroup(*cgroup)
            except Exception as err:  # noqa: BLE001 - the records below must still be thawed
                _complain(f"cannot thaw the cgroup {cgroup[1]!r}: {err!r}")
        failed: list[str] = []
        for record in reversed(self.records()):
            try:
                if record[0] < 0:  # a relay above the tree: after its child, if it stopped
                    resume_relay(-record[0], record[1])
                    continue
                failed += map(str, self.thaw_identities((record,))[1])
            except Exception as err:  # noqa: BLE001 - one process never ends the thaw
                failed.append(f"{record[0]} ({err!r})")
        if failed:
            _complain(f"could not thaw PID(s) {', '.join(failed)}; every other one was thawed")

    def thaw_if_frozen(self) -> None:
        if self.header()[1] == FROZEN:
            self.thaw()

    def expire(self) -> None:
        """The lease ran out: thaw under the lock, unless the supervisor released meanwhile."""
        if not lock(self.lock_fd):
            return  # the supervisor holds it (arming or releasing): nothing to thaw then
        try:
            magic, state, expired, flags, gen, count, deadline = self.header()
            if state != FROZEN or expired or not deadline or time.monotonic() < deadline:
                return
            self.mem[_EXPIRED_OFFSET] = 1  # first, so that the freeze stops stopping
            self.thaw()
        finally:
            unlock(self.lock_fd)


def _complain(what: str) -> None:
    """A line on the helper's stderr (the supervisor's, inherited); never raises."""
    try:
        sys.stderr.write(f"treeguard watchdog (PID {os.getpid()}): {what}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001, S110 - a closed stderr must not stop a thaw
        pass


def _name_self() -> None:
    """Take the helper's command name, by which every guard recognises it (proc(5):
    writing ``/proc/self/comm`` sets the calling thread's name, here the main thread's,
    which is the process's)."""
    with open("/proc/self/comm", "wb") as comm:
        comm.write(HELPER_COMM)


def _helper_main(argv: Sequence[str]) -> None:
    """The helper process: ``memfd cmd_fd ready_fd supervisor_pid``."""
    memfd, cmd_fd, ready_fd, supervisor = (int(a) for a in argv)
    _name_self()  # before anything else: no guard may stop it from here on
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    # The signal mask survives fork and execve (sigprocmask(2)): a supervisor that blocks
    # SIGTERM while it freezes (treeguard pause) must not pass that on.
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda *_: None)  # handled through the wakeup fd
    mem = mmap.mmap(memfd, 0)
    # A second open file description of the memfd: flock(2) locks belong to one, so the
    # supervisor's and ours exclude each other.
    lock_fd = os.open(f"/proc/self/fd/{memfd}", os.O_RDWR | os.O_CLOEXEC)
    helper = _Helper(mem, lock_fd)
    try:
        pidfd = os.pidfd_open(supervisor)
    except ProcessLookupError:
        pidfd = -1
    # The pidfd names our parent only if it is still our parent now: a supervisor that died
    # before this line has re-parented us, and its PID may name a stranger.
    if pidfd < 0 or os.getppid() != supervisor:
        helper.thaw_if_frozen()
        return
    # Ready only once it can thaw at once: the core's import (about 10 ms) is paid here,
    # not after the supervisor died.
    helper.load()
    os.write(ready_fd, b"r")
    os.close(ready_fd)
    _watch(helper, pidfd, cmd_fd, wake_r)


def _watch(helper: _Helper, pidfd: int, cmd_fd: int, wake_r: int) -> None:
    """The helper's loop, until it has nothing left to guard."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(cmd_fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    supervised = True  # the supervisor is alive and has not handed over
    detached = False
    while True:
        _, state, expired, _, _, _, deadline = helper.header()
        timeout: float | None = None
        if state == FROZEN and deadline and not expired:
            # Capped: poll(2) takes an int of milliseconds; a longer lease takes more polls.
            timeout = min(max(0.0, deadline - time.monotonic()), MAX_POLL) * 1000.0
        elif not supervised:
            return  # handed over, and the lease ran out (thawed) or nothing is frozen
        events = dict(poller.poll(timeout))
        if wake_r in events:  # SIGTERM: thaw (a handed-over freeze too) and go
            os.read(wake_r, 4096)
            helper.thaw_if_frozen()
            return
        if cmd_fd in events:
            try:
                data = os.read(cmd_fd, 4096)
            except OSError:
                data = b""
            if b"q" in data:
                helper.thaw_if_frozen()
                return
            if not data:  # the supervisor closed its end: it exited, or handed over
                poller.unregister(cmd_fd)
                supervised = False
        if pidfd in events:  # the supervisor exited; it cannot hold the lock any more
            poller.unregister(pidfd)
            supervised = False
        if not supervised:
            if not helper.outlive():
                helper.thaw_if_frozen()
                return
            if not detached:
                # Handed over: let go of the supervisor's stderr, which may be a pipe that
                # its caller reads to the end (``$(treeguard pause ...)`` would wait for
                # the lease). Complaints from now on go nowhere.
                detached = True
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                os.close(null)
        if timeout is not None and deadline and time.monotonic() >= deadline:
            helper.expire()
