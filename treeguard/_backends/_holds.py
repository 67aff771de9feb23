"""Who in this process holds a process stopped, or a cgroup frozen: the freezes of every guard
of this process, counted, so that two guards holding the same tree at the same time (two
tasks of an event loop, two threads) keep it stopped until the last of them lets go.

A freeze that stops a process (or freezes a cgroup) enters its hold here *before* it signals
(or writes): whoever meets the process afterwards, stopped or not yet, finds that a freeze of
this process holds it and joins the hold instead of taking it for someone else's. A process
found stopped with no hold here was stopped by someone outside this process: that one stays
foreign, as before. A freeze that lets go of its hold resumes the process (or thaws the
cgroup) only if it was the last holder, and the hold is forgotten only after that.

Every step is made under one lock, the resume included, so that no freeze can enter a hold
between the last holder's leaving and its resume (the resume would then land under it).
Each holder is an object of the freeze (a signal freeze's :class:`~._pidfds.Entry`, a
:class:`~._freezer_base.CgroupFreezer`), so leaving is idempotent: a thaw cut short (an
interrupt at any point) and run again never counts a holder out twice. A hold whose holders
all left but whose resume was cut short stays, empty: the next to leave resumes it, and a
freeze that meets it joins it.

Nothing here is shared with a forked child: the registry starts empty there (a child never
thaws what its parent froze).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import TypeVar

__all__ = ["alone", "census", "drop", "enter", "leave"]

H = TypeVar("H")

_lock = threading.Lock()
#: The holders of each hold, by what is held: ``("pid", pid, starttime, pidfs inode)`` or
#: ``("cgroup", version, directory inode)``.
_holds: dict[Hashable, set[object]] = {}


def _forked() -> None:
    # The child's copy of the lock may be held by a thread that does not exist there.
    global _lock, _holds
    _lock, _holds = threading.Lock(), {}


os.register_at_fork(after_in_child=_forked)


def enter(key: Hashable, holder: object, *, stopped: bool) -> bool:
    """Enter ``holder``'s hold of ``key`` before it is stopped (or frozen): it joins a hold
    of another freeze of this process if there is one, and starts one otherwise, unless
    ``key`` was found ``stopped`` already (by someone outside this process: not ours).

    :returns: whether ``holder`` holds ``key`` now (it must :func:`leave` it).
    """
    with _lock:
        holders = _holds.get(key)
        if holders is None:
            if stopped:
                return False
            holders = _holds[key] = set()
        holders.add(holder)
        return True


def leave(key: Hashable, holder: H, ours: bool, resume: Callable[[H], object]) -> bool:
    """``holder`` lets go of ``key``: ``resume(holder)`` is called (under the lock) if no
    freeze of this process holds it any more. Resumable and idempotent.

    ``ours`` says whether ``holder`` ever meant to hold it (it was met running, or joined):
    a holder that never entered (cut short before :func:`enter`) resumes ``key`` only if
    it meant to and nobody else holds it, as a freeze without holds would.

    :returns: whether ``resume`` was called.
    """
    with _lock:
        holders = _holds.get(key)
        if holders is None:
            if ours:
                resume(holder)
            return ours
        holders.discard(holder)
        if holders:
            return False  # another freeze of this process holds it still
        resume(holder)  # (raises: the hold stays, empty, and the next leave() resumes it)
        del _holds[key]  # forgotten only after
        return True


def drop(key: Hashable, holder: object) -> None:
    """``holder`` lets go of ``key`` without resuming it: its freeze was handed over (to a
    token, which resumes it wherever it is thawed)."""
    with _lock:
        holders = _holds.get(key)
        if holders is not None:
            holders.discard(holder)
            if not holders:
                del _holds[key]


def alone(key: Hashable, holder: object) -> bool:
    """Whether ``holder`` is the only freeze of this process that holds ``key``."""
    with _lock:
        holders = _holds.get(key)
        return holders is None or holders == {holder}


def census() -> dict[Hashable, int]:
    """How many freezes of this process hold each hold now (for tests and diagnostics)."""
    with _lock:
        return {key: len(holders) for key, holders in _holds.items()}
