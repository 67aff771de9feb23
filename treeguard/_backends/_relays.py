"""Job-control relays: parents that pass a child's stop on by stopping themselves.

``su``, ``runuser`` (util-linux) and interactive shells wait for their child with
``WUNTRACED``; when it stops, ``su`` stops itself (to pass the stop on to its own shell). The
signal backend never lets a relay INSIDE the frozen set see a stop (a parent is proven stopped
before its children are stopped, and resumed after them). A parent OUTSIDE it (the parent of
an included ``root``, a ``root`` walked through) is told of the stop: a :class:`Watchers`
remembers each such parent, as it was before the freeze, and after the thaw resumes one
that stopped itself meanwhile.
"""

from __future__ import annotations

import os
import time

from .._drive import Steps, Wait
from .._thaw import resume_relay
from ..procfs import ProcFS

__all__ = ["Watchers"]

#: How long after the thaw a watcher still running is watched for its own stop.
_GRACE = 0.005


class Watchers:
    """The parents outside the frozen set of processes a freeze stopped."""

    __slots__ = ("_fs", "_seen")

    def __init__(self, fs: ProcFS) -> None:
        self._fs = fs
        # pid -> (starttime, stopped before the freeze)
        self._seen: dict[int, tuple[int, bool]] = {}

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
        stat = self._fs.stat(pid)
        if stat is None:
            return None
        self._seen[pid] = (stat.starttime, stat.state == "T")
        return None if stat.state == "T" else stat.starttime

    def settle(self) -> None:
        """After the freeze: keep only the watchers that were running before it."""
        for pid, (start, was_stopped) in list(self._seen.items()):
            stat = self._fs.stat(pid)
            if stat is None or stat.starttime != start or was_stopped:
                del self._seen[pid]

    def resume(self) -> Steps[None]:
        """After the thaw: resume each watcher that stopped itself while the tree was frozen
        (it was running before). One still running may be on its way to its stop (it saw
        the child's stop just now): it is watched for a few milliseconds."""
        fs, seen = self._fs, self._seen
        deadline = time.perf_counter() + _GRACE
        while seen:
            for pid, (start, _) in list(seen.items()):
                if resume_relay(pid, start, fs):
                    del seen[pid]
                    continue
                stat = fs.stat(pid)
                if stat is None or stat.starttime != start:
                    del seen[pid]
                elif stat.state != "R" or time.perf_counter() > deadline:
                    del seen[pid]  # asleep: it did not take the stop in
            if seen:
                yield Wait(0.0005)
