"""Identity-checked signals: what any process (the guard, a token's holder, the watchdog
helper, ``treeguard resume``) needs to signal a process it recorded, and never another.

A process is recorded as ``(pid, starttime, inode)``. The pidfd is opened first, then the
identity is checked against it, so a PID recycled at any moment is never signalled:

- ``inode``: the pidfd's inode number on kernels with pidfs (Linux 6.9+), unique to one
  process for the life of the system and never reused; 0 where the kernel has no pidfs (or
  the record predates it);
- ``starttime``: field 22 of ``/proc/PID/stat``, in clock ticks (10 ms here). Two processes
  that got the same PID within one tick share it: it is the fallback, not a proof.

This module imports only :mod:`treeguard.procfs`: the watchdog helper loads it alone.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import signal
import threading
from collections.abc import Callable, Iterable

from .procfs import ProcFS

__all__ = [
    "close_fd",
    "has_pidfs",
    "keep_reserve",
    "kept_share",
    "open_file",
    "open_identity",
    "open_pidfd",
    "pidfd_inode",
    "resume_relay",
    "signal_identity",
    "thaw_identities",
]

_pidfs: bool | None = None


def has_pidfs() -> bool:
    """Whether pidfds live on pidfs (Linux 6.9+), where each has an inode of its own.

    Before pidfs, every pidfd was an anonymous inode, the one inode that every anonymous
    file (an epoll instance too) shares: compare the two.
    """
    global _pidfs
    if _pidfs is None:
        fd = os.pidfd_open(os.getpid())
        try:
            with select.epoll() as ep:
                mine, anon = os.fstat(fd), os.fstat(ep.fileno())
            _pidfs = (mine.st_dev, mine.st_ino) != (anon.st_dev, anon.st_ino)
        finally:
            os.close(fd)
    return _pidfs


def pidfd_inode(fd: int) -> int:
    """The pidfs inode number of the process ``fd`` (a pidfd) names; 0 without pidfs."""
    return os.fstat(fd).st_ino if has_pidfs() else 0


# Two descriptors kept in reserve for the whole process, so that a thaw never fails for
# want of them: a supervisor whose table is full when it thaws closes the reserve, opens the
# pidfd (and, without pidfs, reads the stat that checks it) in the slots it freed, and takes
# the reserve back once that pidfd is closed. A reserve numbered at or above the soft
# RLIMIT_NOFILE (lowered since it was opened) would free no usable slot: it is moved lower.
_RESERVE = 2
_reserve: list[int] = []
_reserve_lock = threading.Lock()


def _soft_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft >= 0 else 1 << 62  # RLIM_INFINITY


def kept_share(most: int, part: int) -> int:
    """How many descriptors one kind of what guards keep between freezes may hold, all
    guards of the process together: ``most``, and at most ``1/part`` of the soft
    RLIMIT_NOFILE (the rest of the table, and its low numbers, stay the program's)."""
    return min(most, _soft_limit() // part)


def keep_reserve() -> None:
    """Hold the spare descriptors below the soft descriptor limit (idempotent; quietly
    holds fewer, or keeps one that is too high, if no better can be had now: the next call
    tries again). Every freeze calls it before it stops anything."""
    limit = _soft_limit()
    held = list(_reserve)  # (one look: another thread may spend it meanwhile)
    if len(held) >= _RESERVE and max(held) < limit:
        return
    has_pidfs()  # learned now, while descriptors are to be had
    with _reserve_lock:
        for i, fd in enumerate(_reserve):
            if fd >= limit:
                try:
                    _reserve[i] = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return
                os.close(fd)
        while len(_reserve) < _RESERVE:
            try:
                _reserve.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return


def _opening(opener: Callable[[], int]) -> int:
    """``opener()``, and once more after spending the reserve if the table was full.

    :raises OSError: EMFILE/ENFILE if even the reserve is spent (another thread took it),
        and whatever else ``opener`` raises.
    """
    try:
        return opener()
    except OSError as err:
        if err.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        with _reserve_lock:
            if not _reserve:
                raise
            while _reserve:
                os.close(_reserve.pop())
        return opener()


def open_pidfd(pid: int) -> int:
    """``pidfd_open(pid)``, spending the reserve descriptors when the table is full; close
    it with :func:`close_fd`.

    :raises ProcessLookupError: if there is no such process.
    """
    return _opening(lambda: os.pidfd_open(pid))


def open_file(path: str, flags: int, *, dir_fd: int | None = None) -> int:
    """``os.open(path, flags, dir_fd=dir_fd)``, spending the reserve descriptors when the
    table is full (a thaw's write to a cgroup control file); close it with
    :func:`close_fd`."""
    return _opening(lambda: os.open(path, flags, dir_fd=dir_fd))


def close_fd(fd: int) -> None:
    """Close a descriptor from :func:`open_pidfd` or :func:`open_file`, and take the
    reserve back if it was spent."""
    os.close(fd)
    if len(_reserve) < _RESERVE:
        keep_reserve()


def open_identity(pid: int, starttime: int, inode: int = 0, fs: ProcFS | None = None) -> int:
    """A pidfd of the process ``(pid, starttime, inode)``, or -1 if ``pid`` names another
    process or none. ``inode`` 0 skips the inode check (a record without one).

    :raises OSError: EMFILE/ENFILE (out of descriptors), EPERM and the like: the caller
        decides (a thaw falls back, see :func:`signal_identity`).
    """
    try:
        fd = open_pidfd(pid)
    except ProcessLookupError:
        return -1
    try:
        if inode and has_pidfs():
            # A pidfs inode is never reused: it alone proves the identity (and needs no
            # descriptor, unlike the stat read below).
            if os.fstat(fd).st_ino == inode:
                return fd
            close_fd(fd)
            return -1
        stat = (fs or ProcFS()).stat(pid)
        if stat is None or stat.starttime != starttime:
            close_fd(fd)
            return -1  # the PID now names another process: never signal it
    except BaseException:
        close_fd(fd)
        raise
    return fd


def signal_identity(
    pid: int, starttime: int, *signals: int, inode: int = 0, fs: ProcFS | None = None
) -> bool:
    """Send ``signals`` to the process ``(pid, starttime, inode)`` through a short-lived
    pidfd, if ``pid`` still names it.

    :returns: False if that process is gone (nothing was signalled).
    :raises OSError: if no pidfd can be opened (EMFILE, ENFILE) or the signal is refused
        (EPERM).
    """
    fd = open_identity(pid, starttime, inode, fs)
    if fd < 0:
        return False
    try:
        for sig in signals:
            signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        close_fd(fd)


def resume_relay(pid: int, starttime: int, fs: ProcFS | None = None, *, inode: int = 0) -> bool:
    """SIGCONT the process ``(pid, starttime, inode)`` if it is stopped: a job-control relay
    outside the tree that passed the tree's stop on by stopping itself. ``inode`` 0 skips
    the inode check (a record without one). Never raises for want of permission (SIGCONT
    needs the same session or user, kill(2)).

    :returns: whether it was resumed.
    """
    fs = fs or ProcFS()
    try:
        fd = open_identity(pid, starttime, inode, fs)
        if fd < 0:
            return False
        try:
            stat = fs.stat(pid)
            if stat is None or stat.state != "T":
                return False  # running: it did not take the stop in
            signal.pidfd_send_signal(fd, signal.SIGCONT)
            return True
        finally:
            close_fd(fd)
    except OSError:
        return False


def thaw_identities(
    identities: Iterable[tuple[int, ...]],
    fs: ProcFS | None = None,
    errors: dict[int, int] | None = None,
) -> tuple[int, list[int]]:
    """SIGCONT each ``(pid, starttime[, inode])``, last first (children first), skipping any
    whose PID now names another process or nothing. For a thaw from another process (a
    token, the watchdog, ``resume``). It never stops at one process: one that may not be
    signalled (EPERM), or a moment without descriptors, leaves the rest to be thawed.

    :param errors: filled with the errno of each PID that could not be resumed.
    :returns: how many processes were resumed, and the PIDs that could not be (EPERM, or no
        descriptor to be had even after closing nothing else).
    """
    fs = fs or ProcFS()
    resumed = 0
    failed: list[int] = []
    for record in reversed(list(identities)):
        pid, start = record[0], record[1]
        inode = record[2] if len(record) > 2 else 0
        try:
            resumed += signal_identity(pid, start, signal.SIGCONT, inode=inode, fs=fs)
        except OSError as err:
            failed.append(pid)
            if errors is not None:
                errors[pid] = err.errno or 0
    return resumed, failed
