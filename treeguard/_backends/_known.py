"""What a guard's signal freezes keep from one freeze to the next: the pidfd and the open
stat file of each process stopped, so that freezing the same tree again skips opening them.

A supervisor that freezes its tree every few seconds meets the same processes each time.
Meeting one costs a ``pidfd_open``, an ``open`` of its stat file, a read that parses every
field, and an ``fstat`` of the pidfd for its pidfs inode: most of a small tree's freeze. Both
descriptors name their process for good (a pidfd signals nobody once its process is reaped; a
stat file opened for a process fails to read once it is reaped, whatever the PID holds now),
so a process met again may be met through them:

- the walk itself is unchanged: every child is still found by reading the children files of
  its parent once the parent is proven stopped, so nothing here decides what the tree is;
- a child listed there is taken for the process known under that PID only if it is known as
  the child of that same parent and its kept stat file still reads, with the starttime it had,
  in a state that is not dead, stopped, or traced. A process that lives holds its PID, and it
  was alive before the listing, so the listing named it; anything else (reaped, a PID reused,
  re-parented, stopped by someone else, held by a tracer, a helper now) is met afresh;
- one ``pread`` of the kept stat file replaces the four calls and the full parse.

The descriptors are counted with every other descriptor a freeze holds, and kept only while
they stay within 256 (and an eighth of ``RLIMIT_NOFILE``), and each is checked (device and
inode) before it is used or closed. They are lent to one freeze at a time (its entries
borrow them, the thaw gives them back): :meth:`Known.close` while they are lent waits until
the freeze's thaw has given them back, so that no entry ever signals through a descriptor
closed under it. Only the process that made them uses or closes them (the guard's
:class:`~treeguard._backends._base.Memo` gives a forked child nothing).
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass

from .._thaw import kept_share
from ..procfs import DEAD_STATES, HELPER_COMM, ProcFS, Stat, parse_stat_brief
from ._base import Plan
from ._pidfds import Entry, close, uncount

__all__ = ["Known"]

_KEY = "signal walk"
#: States a process is met again in through its kept descriptors: anything else (stopped,
#: traced, dead) is met afresh, where the full rules decide.
_RUNNING = frozenset("RSDIWP") - DEAD_STATES
_HELPER = b"(" + HELPER_COMM + b") "


@dataclass(slots=True)
class _Proc:
    parent: int
    fd: int
    statfd: int
    stat: Stat
    inode: int
    #: What each descriptor was when kept (device and inode of the pidfd, then of the stat
    #: file): one used or closed is checked first against them, since code that closes
    #: descriptors it did not open may have given the number to another file since.
    files: tuple[int, int, int, int]

    def holds(self) -> bool:
        """Whether both descriptors still name the files they were kept on."""
        try:
            return _files(self.fd, self.statfd) == self.files
        except OSError:
            return False


def _files(fd: int, statfd: int) -> tuple[int, int, int, int]:
    pidfd, stat = os.fstat(fd), os.fstat(statfd)
    return pidfd.st_dev, pidfd.st_ino, stat.st_dev, stat.st_ino


class Known:
    """The processes a guard's last signal freeze stopped, by PID, each held by its pidfd
    and its open stat file (see the module)."""

    def __init__(self) -> None:
        self._procs: dict[int, _Proc] = {}
        self._owner = os.getpid()
        self._lent = False
        self._closing = False
        self._closed = False  # its guard let go of it: never lent again
        # close() may come from another thread (the guard's close() beside its freeze):
        # lending and closing are decided under one lock, so that no freeze borrows a
        # descriptor closed under it. Reentrant: a signal handler that closes the guard
        # may land while this thread holds it (settling, in a thaw).
        self._lock = threading.RLock()
        _ALL.add(self)

    @classmethod
    def of(cls, plan: Plan) -> Known | None:
        """The guard's (made at its first freeze), for the freeze about to start to hold
        and then :meth:`lend`; ``None`` for a freeze without a guard."""
        memo = plan.memo
        if memo is None:
            return None
        known = memo.get(_KEY)
        if not isinstance(known, Known):
            known = cls()
            memo.put(_KEY, known)
            if memo.get(_KEY) is not known:
                return None  # a forked child's freeze with an inherited guard: keep nothing
        return known

    def lend(self) -> bool:
        """Lend what is kept to the freeze that holds this already (so that its thaw
        settles it, whatever cuts the freeze short); False if it was closed meanwhile
        (``guard.close()`` from another thread found the guard not frozen yet): what that
        freeze kept here would never be closed, so it keeps nothing."""
        with self._lock:
            if self._closed:
                return False
            self._lent = True
            return True

    def meet(self, pid: int, parent: int, fs: ProcFS) -> Entry | None:
        """An entry for ``pid``, listed by ``parent`` (proven stopped, or walked through)
        just now, borrowing the kept descriptors; ``None`` if it must be met afresh."""
        proc = self._procs.get(pid)
        if proc is None or proc.parent != parent:
            return None
        if not proc.holds():
            del self._procs[pid]
            _let_go(proc)
            return None
        data = fs.reread(proc.statfd)
        if data is None or _HELPER in data:
            return None
        state, threads, starttime = parse_stat_brief(data)
        if state not in _RUNNING or starttime != proc.stat.starttime:
            return None
        entry = Entry(pid, proc.fd, proc.stat, True, proc.statfd, proc.inode)
        entry.parent, entry.borrowed = parent, True
        return entry

    def keep(self, entries: list[Entry]) -> None:
        """Once a freeze proved ``entries`` stopped: keep the descriptors of those it may
        meet again (ours, alive, below a parent, both descriptors held), as many as the
        cap left by every guard of the process allows; let go of every other process kept
        before. An entry that borrowed descriptors not kept now owns them (its thaw closes
        them): none is closed under it. One PID may come twice (a process gone while
        stopped, its PID a newcomer's): only the first is kept, the other closes its own."""
        old, new = self._procs, {}
        room = _cap() - (_kept() - 2 * len(old))  # what the other guards leave
        for entry in entries:
            mine = old.pop(entry.pid) if entry.borrowed else None
            if room >= 2 and entry.pid not in new and _keepable(entry):
                if mine is None:
                    files = _files(entry.fd, entry.statfd)
                    mine = _Proc(
                        entry.parent, entry.fd, entry.statfd, entry.stat, entry.inode, files
                    )
                    entry.borrowed = True  # the descriptors are kept here now
                new[entry.pid] = self._procs[entry.pid] = mine
                room -= 2
            elif mine is not None:
                if mine.holds():
                    entry.borrowed = False  # the entry closes what it still holds
                    for fd in {mine.fd, mine.statfd} - {entry.fd, entry.statfd}:
                        close(fd)  # what it let go of while borrowing
                else:
                    _let_go(mine)  # (the entry, borrowing still, forgets them too)
        # Until here every pair is in self._procs (still the dict ``old``), or its entry
        # owns it: an interrupt landing in the loop leaves each pair in one place to be
        # closed from (at worst, one pair between two statements is leaked, never closed
        # twice).
        self._procs = new
        for pid in new:
            old.pop(pid, None)
        _close_all(old)

    def settle(self) -> None:
        """The freeze gave every descriptor back (its thaw ran to its end, or it was
        handed over): a :meth:`close` asked for meanwhile happens now."""
        with self._lock:
            self._lent = False
            closing = self._closing
        if closing:
            self.close()

    def close(self) -> None:
        """Let every descriptor go (later, if a freeze borrows them: see :meth:`settle`).
        In a forked child, nothing: the descriptors are the parent's to close."""
        if os.getpid() != self._owner:
            return
        with self._lock:
            self._closing = self._lent
            if self._lent:
                return
            self._closed = True
            procs, self._procs = self._procs, {}
        _close_all(procs)


#: Every Known of this process: the cap is on what they keep together (a supervisor with a
#: guard per tree keeps no more than one guard would).
_ALL: weakref.WeakSet[Known] = weakref.WeakSet()


def _kept() -> int:
    """Descriptors kept by every guard of this process now."""
    return sum(2 * len(known._procs) for known in list(_ALL))


def _keepable(entry: Entry) -> bool:
    return (
        entry.inode != 0  # a pidfd checked by its pidfs inode only (Linux 6.9+)
        and entry.alive
        and entry.ours
        and not entry.traced
        and entry.parent >= 0
        and entry.fd >= 0
        and entry.statfd >= 0
    )


#: Descriptors a guard keeps between freezes, at most: the processes of the small trees that
#: gain the most (128 of them), and few enough not to push the supervisor's own descriptors
#: past 1,023, where ``select()`` (still used by some libraries) cannot reach them.
_MOST = 256


def _cap() -> int:
    """Descriptors the guards of this process may keep between freezes, all together:
    :data:`_MOST`, and at most an eighth of the soft limit."""
    return kept_share(_MOST, 8)


def _close_all(procs: dict[int, _Proc]) -> None:
    while procs:
        _, proc = procs.popitem()  # forgotten before closed: a leak, never a double close
        if proc.holds():
            close(proc.fd)
            close(proc.statfd)
        else:
            _let_go(proc)


def _let_go(proc: _Proc) -> None:
    """Forget descriptors whose numbers name other files now: not ours to close."""
    uncount(proc.fd)
    uncount(proc.statfd)
