"""The processes a signal freeze holds, and the descriptors it holds them by.

Each process is held by a pidfd (``pidfd_send_signal`` cannot reach a recycled PID) and, for
verification, by its open ``/proc/PID/stat``. Descriptors are counted for every freeze of this
process: past the budget (half of RLIMIT_NOFILE less a margin) a process is signalled through a
short-lived pidfd instead, checked against its pidfs inode or starttime
(:mod:`treeguard._thaw`).
"""

from __future__ import annotations

import errno
import os
import resource
import signal

from .._drive import YIELD, Slices, Steps
from .._thaw import signal_identity
from ..errors import FreezeError
from ..procfs import Stat
from . import _holds

__all__ = [
    "OUT_OF_DESCRIPTORS",
    "Entry",
    "budget",
    "close",
    "close_stat",
    "close_tasks",
    "count",
    "drop_hold",
    "handed_over",
    "uncount",
    "held",
    "open_pidfd",
    "release",
    "release_pidfd",
    "resignal",
    "resume",
]

_held = 0  # descriptors (pidfds, stat files) held by all guards of this process


#: What a freeze that ran out of descriptors says (it thawed what it had stopped).
OUT_OF_DESCRIPTORS = "out of file descriptors while freezing: raise RLIMIT_NOFILE"


def budget() -> int:
    """How many descriptors the freezes of this process may hold: what they hold already,
    and half of what is free now beyond a margin (the other half, and the margin, stay
    for everything else the supervisor does)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    try:
        # Since Linux 6.2 the size of /proc/self/fd is the number of open descriptors: one
        # stat(2) (a freeze asks at every start) instead of listing the directory.
        in_use = os.stat("/proc/self/fd").st_size
        if in_use <= 0:
            in_use = len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    except OSError:
        in_use = soft
    return _held + max(0, soft - in_use - 32) // 2


class Entry:
    """A process the signal backend met and holds: its pidfd, its kept stat file, its
    identity, and where its freeze stands."""

    __slots__ = (
        "alive",
        "borrowed",
        "fd",
        "inode",
        "joined",
        "ours",
        "parent",
        "pid",
        "settled",
        "starttime",
        "stat",
        "statfd",
        "taskfds",
        "tids",
        "traced",
    )

    def __init__(self, pid: int, fd: int, stat: Stat, ours: bool, statfd: int, inode: int) -> None:
        self.pid = pid
        self.fd = fd
        self.inode = inode  # the pidfs inode of the process (0 without pidfs)
        # /proc/PID/stat kept open while freezing: verification re-reads it with one pread
        # (it names this process for good: once reaped, reading it fails).
        self.statfd = statfd
        # The threads seen when the process was verified stopped (a stopped process makes
        # no new ones): its children are read from exactly these. None: one thread.
        self.tids: list[int] | None = None
        # The stat files of its other threads, kept open while it is waited for (one pread
        # a look instead of three calls), closed once it is proven stopped.
        self.taskfds: dict[int, int] | None = None
        self.stat = stat
        self.starttime = stat.starttime
        self.ours = ours
        self.alive = True
        # Verified stopped, every task: its children, read from now on, are final.
        self.settled = False
        # Seen stopped by a tracer after our SIGSTOP (partial_ok): not proven stopped, so
        # not reported as frozen, but still resumed by the thaw.
        self.traced = False
        # The parent that listed it (-1 where the walk starts): where it may be met again.
        self.parent = -1
        # Its descriptors are a guard's, kept between freezes (:mod:`._known`): releasing
        # it forgets them, and the guard closes them.
        self.borrowed = False
        # Found stopped by another freeze of this process, whose hold it joined: held, but
        # not stopped by this freeze (a token made of it leaves it to the other).
        self.joined = False

    @property
    def key(self) -> tuple[str, int, int, int]:
        """What it is held by in :mod:`._holds`: the process's identity."""
        return ("pid", self.pid, self.starttime, self.inode)

    def enter_hold(self, *, stopped: bool) -> bool:
        """Enter this freeze's hold of the process (before its SIGSTOP; see :mod:`._holds`):
        True if this freeze holds it now, False if it was ``stopped`` by someone outside
        this process."""
        held = _holds.enter(self.key, self, stopped=stopped)
        self.joined = held and stopped
        return held


def held() -> int:
    """How many descriptors every freeze of this process holds now."""
    return _held


def open_pidfd(pid: int) -> int | None:
    """A counted pidfd of ``pid``; None if there is no such process.

    :raises FreezeError: if the descriptor table is full (a freeze may fail; only a thaw
        must not, and it uses :mod:`treeguard._thaw`'s reserve).
    """
    global _held
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except OSError as err:
        if err.errno in (errno.EMFILE, errno.ENFILE):
            raise FreezeError(OUT_OF_DESCRIPTORS) from err
        raise
    _held += 1
    return fd


def count(fd: int) -> None:
    """Count a descriptor opened elsewhere (a kept stat file)."""
    global _held
    if fd >= 0:
        _held += 1


def uncount(fd: int) -> None:
    """Stop counting a descriptor whose number someone else closed (and may have reused):
    it is not ours to close any more."""
    global _held
    if fd >= 0:
        _held -= 1


def close(fd: int) -> None:
    """Close a counted descriptor."""
    global _held
    os.close(fd)
    _held -= 1


def release_pidfd(entry: Entry) -> None:
    """Close ``entry``'s pidfd (it is signalled through a short-lived one from now on). The
    descriptor is forgotten before it is closed: an interrupt in between leaks it rather
    than closing it twice."""
    if entry.fd >= 0:
        fd, entry.fd = entry.fd, -1
        if not entry.borrowed:
            close(fd)


def close_tasks(entry: Entry) -> None:
    """Close the stat files of ``entry``'s other threads (never borrowed)."""
    fds, entry.taskfds = entry.taskfds, None
    while fds:
        close(fds.popitem()[1])


def close_stat(entry: Entry) -> None:
    close_tasks(entry)
    if entry.statfd >= 0:
        fd, entry.statfd = entry.statfd, -1
        if not entry.borrowed:
            close(fd)


def release(entry: Entry) -> None:
    """Close every descriptor ``entry`` holds."""
    release_pidfd(entry)
    close_stat(entry)


def resignal(entry: Entry, sig: int) -> bool:
    """Signal ``entry`` if it is still the process met; False if it is gone."""
    if entry.fd < 0:
        return signal_identity(entry.pid, entry.starttime, sig, inode=entry.inode)
    try:
        signal.pidfd_send_signal(entry.fd, sig)
        return True
    except ProcessLookupError:
        return False


def handed_over(entries: list[Entry], foreign: list[Entry]) -> dict[str, list[list[int]]]:
    """What a token of the freeze of ``entries`` (``foreign``: found stopped by someone
    else) names: those it stopped, to resume, and those found stopped, to leave stopped
    (a process held with another freeze of this process is that one's to resume)."""
    theirs = [e for e in entries if e.joined] + foreign
    return {
        "stopped": [[e.pid, e.starttime, e.inode] for e in entries if e.alive and not e.joined],
        "already_stopped": [[e.pid, e.starttime, e.inode] for e in theirs],
    }


def drop_hold(entry: Entry) -> None:
    """Let go of this freeze's hold of ``entry`` without resuming it (handed over to a
    token, which resumes it wherever it is thawed)."""
    _holds.drop(entry.key, entry)


def resume(entries: list[Entry], slices: Slices) -> Steps[list[int]]:
    """SIGCONT each of ``entries``, last first (children before their parents), unless
    another freeze of this process holds it still (:mod:`._holds`), each forgotten only
    once let go of, so that a resume cut short goes on where it stopped.
    Returns the PIDs that refused (changed hands by a setuid exec: not ours any more)."""
    refused: list[int] = []

    def cont(entry: Entry) -> None:
        try:
            resignal(entry, signal.SIGCONT)
        except PermissionError:
            refused.append(entry.pid)

    while entries:
        entry = entries[-1]
        # Resumed only if no other freeze of this process holds it still (see _holds).
        _holds.leave(entry.key, entry, entry.ours, cont)
        entries.pop()
        release(entry)
        if slices.due():
            yield YIELD
    return refused
