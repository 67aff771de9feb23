"""Job-control relays: parents that pass a child's stop on by stopping themselves.

``su``, ``runuser`` (util-linux) and interactive shells wait for their child with
``WUNTRACED``; when it stops, ``su`` stops itself (to pass the stop on to its own shell). The
signal backend never lets a relay INSIDE the frozen set see a stop (a parent is proven stopped
before its children are stopped, and resumed after them). A parent OUTSIDE it (the parent of
an included ``root``, a ``root`` walked through) is told of the stop: a :class:`Watchers`
remembers each such parent, as it was before the freeze, and after the thaw resumes one
that stopped itself meanwhile. A freeze handed over as a token names them in its
description (:meth:`Watchers.records`), and the token's thaw, in any process, resumes them
the same way (:meth:`Watchers.described`).
"""

from __future__ import annotations

import os
import time

from .._drive import Steps, Wait
from .._thaw import has_pidfs, pidfd_inode, resume_relay
from ..procfs import ProcFS

__all__ = ["Watchers"]

#: How long after the thaw a watcher still running is watched for its own stop.
_GRACE = 0.005


class Watchers:
    """The parents outside the frozen set of processes a freeze stopped."""

    __slots__ = ("_fs", "_seen")

    def __init__(self, fs: ProcFS) -> None:
        self._fs = fs
        # pid -> (starttime, pidfs inode or 0, stopped before the freeze)
        self._seen: dict[int, tuple[int, int, bool]] = {}

    @classmethod
    def described(cls, records: list[list[int]], fs: ProcFS) -> Watchers:
        """The watchers :meth:`records` described (in a token), for a thaw by any process."""
        made = cls(fs)
        for pid, start, *inode in records:
            made._seen[pid] = (start, inode[0] if inode else 0, False)
        return made

    def __bool__(self) -> bool:
        return bool(self._seen)

    def watch(self, pid: int) -> int | None:
        """Remember ``pid``, the parent of a process about to be stopped (not stopped by
        this freeze itself): it is told of the stop (SIGCHLD, ``waitpid(WUNTRACED)``).

        :returns: its starttime if it is newly remembered and runs (one to journal, so
            that a thaw by another process resumes it too), else None.
        """
        if pid <= 1 or pid == os.getpid() or pid in self._seen:
            return None
        fd = -1
        if has_pidfs():
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                return None
            except OSError:
                pass  # no descriptor to spare now: it is known by its starttime alone
        try:
            # Read while the pidfd is open: the stat then names the process the inode does.
            stat = self._fs.stat(pid)
            inode = pidfd_inode(fd) if fd >= 0 else 0
        finally:
            if fd >= 0:
                os.close(fd)
        if stat is None:
            return None
        self._seen[pid] = (stat.starttime, inode, stat.state == "T")
        return None if stat.state == "T" else stat.starttime

    def settle(self) -> None:
        """After the freeze: keep only the watchers that were running before it."""
        for pid, (start, _, was_stopped) in list(self._seen.items()):
            stat = self._fs.stat(pid)
            if stat is None or stat.starttime != start or was_stopped:
                del self._seen[pid]

    def records(self) -> list[list[int]]:
        """``[pid, starttime, inode]`` of each watcher kept (inode 0: not known)."""
        return [[pid, start, inode] for pid, (start, inode, _) in self._seen.items()]

    def resume(self) -> Steps[None]:
        """After the thaw: resume each watcher that stopped itself while the tree was frozen
        (it was running before). One still running may be on its way to its stop (it saw
        the child's stop just now): it is watched for a few milliseconds."""
        fs, seen = self._fs, self._seen
        deadline = time.perf_counter() + _GRACE
        while seen:
            for pid, (start, inode, _) in list(seen.items()):
                if resume_relay(pid, start, fs, inode=inode):
                    del seen[pid]
                    continue
                stat = fs.stat(pid)
                if stat is None or stat.starttime != start:
                    del seen[pid]
                elif stat.state != "R" or time.perf_counter() > deadline:
                    del seen[pid]  # asleep: it did not take the stop in
            if seen:
                yield Wait(0.0005)
