"""The watchdog's journal: what the supervisor tells its helper, in shared memory.

A ``memfd`` mapped by both: a header (state, generation, lease deadline, record count,
``expired`` flag, flags) and one ``(pid, starttime, inode)`` record per process (the inode of
its pidfd on kernels with pidfs, 0 elsewhere), written BEFORE the process is stopped; a
record of a negative PID is a job-control relay outside the tree (resumed if it stopped).
Appending a record is two plain memory writes, no system call. A cgroup freeze records the
cgroup instead (version, directory, inode), BEFORE it is frozen. Arming and releasing take an
``flock(2)`` on the journal that the helper also holds while it thaws for an expired lease,
so a late lease thaw never reaches a later freeze.

Both sides run on the same machine: native byte order. The helper process imports this
module and :mod:`treeguard._helper`, nothing of the supervisor's.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time

from .errors import WatchdogError

__all__ = [
    "CAPACITY",
    "FROZEN",
    "IDLE",
    "OUTLIVE",
    "LockedJournal",
    "lock",
    "set_state",
    "unlock",
]


_MAGIC = 0x54475744  # "TGWD"
#: magic, state, expired, pad, generation, count, deadline (CLOCK_MONOTONIC seconds, 0: none)
_HEADER = struct.Struct("=IIIIQQd")
_COUNT = struct.Struct("=Q")
_COUNT_OFFSET = 24
_EXPIRED_OFFSET = 8
#: The header's fourth field: flags the helper reads when the supervisor is gone.
_FLAGS = struct.Struct("=I")
_FLAGS_OFFSET = 12
#: The supervisor handed the freeze over (:meth:`Watchdog.hand_over`): its exit does not
#: thaw; the lease's end does.
OUTLIVE = 1
#: The cgroup a freeze wrote (version, 0: none; length of its path; inode), then the path.
_CGROUP = struct.Struct("=IIQ")
_CGROUP_OFFSET = 64
_PATH_OFFSET = _CGROUP_OFFSET + _CGROUP.size
_PATH_MAX = 4096
_RECORD = struct.Struct("=qQQ")  # pid, starttime, pidfs inode (0: none)
_RECORDS_OFFSET = _PATH_OFFSET + _PATH_MAX
#: Records the journal holds: far more processes than any tree (PID_MAX_LIMIT is 4 Mi, but
#: pid_max defaults to 32 Ki or 4 Mi and one freeze records each process once or twice). The
#: memfd is sparse: only the pages that records touch take memory.
CAPACITY = 1 << 20
_SIZE = _RECORDS_OFFSET + CAPACITY * _RECORD.size

IDLE, FROZEN = 0, 1


class _Journal:
    """The supervisor's side of the journal: what the signal backend calls."""

    __slots__ = ("_count", "_mem", "_owner")

    def __init__(self, mem: mmap.mmap) -> None:
        self._mem = mem
        self._count = 0
        self._owner = os.getpid()

    def stopping(self, pid: int, starttime: int, inode: int = 0) -> None:
        """Record ``(pid, starttime, inode)``; called before the process is sent SIGSTOP.

        :raises WatchdogError: if the lease ran out (the freeze then thaws and fails), or
            if the journal is full.
        """
        mem, n = self._mem, self._count
        if n >= CAPACITY:
            raise WatchdogError(f"journal full ({CAPACITY} processes); nothing was left stopped")
        _RECORD.pack_into(mem, _RECORDS_OFFSET + n * _RECORD.size, pid, starttime, inode)
        self._count = n + 1
        # The record is complete before the count says so: the helper reads only counted ones.
        _COUNT.pack_into(mem, _COUNT_OFFSET, n + 1)
        self.check()

    def watching(self, pid: int, starttime: int) -> None:
        """Record a relay outside the tree (see :class:`~treeguard._backends.Journal`): a
        record of PID ``-pid``, which the helper resumes only if it is stopped."""
        self.stopping(-pid, starttime)

    def freezing_cgroup(self, version: int, path: str, inode: int) -> None:
        """Record the cgroup directory ``path`` (cgroup v1 or v2, with its inode); called
        before its freeze is written.

        :raises WatchdogError: if the lease ran out, or the path does not fit the journal.
        """
        raw = os.fsencode(path)
        if len(raw) > _PATH_MAX:
            raise WatchdogError(f"a cgroup path of {len(raw)} bytes does not fit the journal")
        mem = self._mem
        # Version 0 while the record is written: the helper reads only a complete one.
        _CGROUP.pack_into(mem, _CGROUP_OFFSET, 0, len(raw), inode)
        mem[_PATH_OFFSET : _PATH_OFFSET + len(raw)] = raw
        _CGROUP.pack_into(mem, _CGROUP_OFFSET, version, len(raw), inode)
        self.check()

    def check(self) -> None:
        """:raises WatchdogError: if the lease ran out (the helper thawed what was recorded)."""
        if self._mem[_EXPIRED_OFFSET]:
            raise WatchdogError(
                "the lease (max_frozen) ran out before the freeze completed; everything "
                "was thawed: raise max_frozen"
            )

    def released(self) -> None:
        """The supervisor thawed the tree: the helper must not thaw it again."""
        if os.getpid() != self._owner:
            return  # a forked child of the supervisor: the journal is not its to clear
        self._count = 0
        set_state(self._mem, IDLE)


def set_state(mem: mmap.mmap, state: int) -> None:
    """Set the state and clear the records, keeping the rest of the header."""
    magic, _, expired, pad, gen, _, deadline = _HEADER.unpack_from(mem, 0)
    _HEADER.pack_into(mem, 0, magic, state, expired, pad, gen, 0, deadline)
    _CGROUP.pack_into(mem, _CGROUP_OFFSET, 0, 0, 0)


def lock(fd: int, give_up: float = 5.0) -> bool:
    """Take the journal lock; False if it stayed busy for ``give_up`` seconds."""
    deadline = time.monotonic() + give_up
    delay = 0.0001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.005)


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


class LockedJournal(_Journal):
    """The journal as the guard uses it: :meth:`released` takes the lock, so that once it
    returns the helper can no longer thaw for this freeze and ``expired`` is final."""

    __slots__ = ("_fd",)

    def __init__(self, mem: mmap.mmap, fd: int) -> None:
        super().__init__(mem)
        self._fd = fd

    def released(self) -> None:
        if os.getpid() != self._owner:
            return
        locked = lock(self._fd)
        try:
            super().released()
        finally:
            if locked:
                unlock(self._fd)
