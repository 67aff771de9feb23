"""Moving processes into a cgroup (:meth:`Cgroup.adopt`) and killing what it holds
(:meth:`Cgroup.kill`: identity-checked, a PID still listed after its pidfd was opened names
that very process, and reaping what it makes this process's child)."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ._cgroupfs import write_file
from ._checks import check_pid
from ._subreaper import is_subreaper, set_subreaper
from ._tree import ancestors, children_source, walk
from .errors import CgroupError, InvalidArgumentError, NoSuchProcessError
from .procfs import DEAD_STATES, PF_EXITING, ProcFS, Stat

if TYPE_CHECKING:
    import subprocess

__all__ = ["adopt_into", "kill_members"]

#: How many processes are held by pidfds at once (one listing each).
_KILL_BATCH = 256


def adopt_into(
    path: str, list_pids: Callable[[], list[int]], pids: Iterable[int], max_passes: int
) -> list[int]:
    """Move processes, each with its whole tree, into the cgroup at ``path`` (which
    ``list_pids()`` lists), as :meth:`Cgroup.adopt` does: the trees are walked again until
    a walk finds nothing of them outside.

    :returns: the PIDs moved.
    :raises InvalidArgumentError: if a PID is malformed, or is the caller or one of its
        ancestors (whose tree holds the caller).
    :raises NoSuchProcessError: if a PID does not exist.
    :raises CgroupError: if the tree kept forking outside for ``max_passes`` walks, or a
        process could not be moved.
    """
    if isinstance(pids, int) or not isinstance(pids, Iterable):
        raise InvalidArgumentError("pids", "must be an iterable of PIDs")
    starts = [check_pid("pids", p) for p in pids]
    fs = ProcFS()
    me = os.getpid()
    forbidden = {me, *ancestors(fs)}
    for pid in starts:
        if pid in forbidden:
            raise InvalidArgumentError(
                "pids", f"PID {pid} is the caller or its ancestor: its tree holds the caller"
            )
        if fs.stat(pid) is None:
            raise NoSuchProcessError(pid)
    procs = os.path.join(path, "cgroup.procs")
    source = children_source(fs)
    moved: list[int] = []
    inside: set[int] = set()
    outside: list[int] = []

    def visit(pid: int) -> Stat | None:
        stat = fs.stat(pid)
        if stat is None or pid == me:
            return None
        if pid not in inside:
            outside.append(pid)
            try:
                write_file(procs, str(pid))
                moved.append(pid)
            except ProcessLookupError:
                return None
        return stat

    for _ in range(max_passes):
        inside = set(list_pids())
        outside.clear()
        source.refresh()
        for _ in walk(starts, visit, source):
            pass
        if not outside:
            return moved
    raise CgroupError(path, f"the tree kept forking outside for {max_passes} walks")


def kill_members(
    path: str,
    list_pids: Callable[[], list[int]],
    spawned: Sequence[subprocess.Popen[Any]],
    only: set[int] | None,
    timeout: float,
) -> None:
    """SIGKILL every process ``list_pids()`` lists (those in ``only``, if given) and wait
    until none is left, as :meth:`Cgroup.kill` does (the cgroup at ``path`` is thawed).

    This process is a child subreaper meanwhile, so that the children of killed processes
    are reaped by it; zombies that become its children are reaped, those in ``spawned``
    through their Popen; its own children from before are left for it to reap.

    :raises CgroupError: if processes remain after ``timeout`` seconds, or if this process
        has fewer than two file descriptors to spare.
    """
    fs = ProcFS()
    # Listed before this process becomes a subreaper: every child it has now is its own
    # (or the caller's adoptee, if it was a subreaper already), to be reaped by it.
    own = _children_of_self(fs)
    before = is_subreaper()
    set_subreaper(True)
    killed: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = [p for p in list_pids() if only is None or p in only]
            if not left:
                break
            for i in range(0, len(left), _KILL_BATCH):
                _kill_some(path, list_pids, left[i : i + _KILL_BATCH], fs, killed)
            _reap(spawned, killed, own, fs)
            if time.monotonic() > deadline:
                raise CgroupError(path, f"processes survived SIGKILL: {left[:20]}")
            time.sleep(0.0005)
        while not _reap(spawned, killed, own, fs):
            if time.monotonic() > deadline:
                break
            time.sleep(0.0005)
    finally:
        set_subreaper(before)


def _kill_some(
    path: str,
    list_pids: Callable[[], list[int]],
    pids: list[int],
    fs: ProcFS,
    killed: dict[int, int],
) -> None:
    """SIGKILL those of ``pids`` still in this cgroup, and remember each (in ``killed``)
    to reap if it becomes our zombie child: also one dying already (with its parent,
    PR_SET_PDEATHSIG), which left the cgroup on its own."""
    fds: dict[int, int] = {}
    try:
        # The reads below (the listing, then one stat at a time) need one descriptor:
        # it is held while the pidfds are opened, and given back after, so that a
        # batch never takes the last one, even a batch that fills the table exactly.
        try:
            spare = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise _out_of_descriptors(path, err) from err
        try:
            for pid in pids:
                try:
                    fds[pid] = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
                except OSError as err:
                    if err.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
                    if not fds:
                        raise _out_of_descriptors(path, err) from err
                    break  # the rest wait for the next round
        finally:
            os.close(spare)
        # Listed after the pidfds were opened: a PID still listed names the very
        # process its pidfd refers to.
        listed = set(list_pids())
        for pid, fd in fds.items():
            # Read after the listing: a process leaves the cgroup when it exits only
            # after PF_EXITING is set, so one not listed any more shows here whether it
            # is dying or was moved out (alive: not ours to kill or reap).
            stat = fs.stat(pid)
            if stat is None:
                continue
            dying = stat.state in DEAD_STATES or bool(stat.flags & PF_EXITING)
            if not (pid in listed or dying):
                continue
            killed[pid] = stat.starttime
            if not dying:
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    finally:
        for fd in fds.values():
            os.close(fd)


def _reap(
    spawned: Sequence[subprocess.Popen[Any]],
    killed: dict[int, int],
    own: dict[int, int],
    fs: ProcFS,
) -> bool:
    """Reap the zombies among ``killed`` that became our children while killing (not
    those of ``own``, which were children already); True once every one is gone, or
    dead and the caller's to reap."""
    me = os.getpid()
    by_pid = {p.pid: p for p in spawned}
    done = True
    for pid, starttime in list(killed.items()):
        popen = by_pid.get(pid)
        if popen is not None:
            if popen.poll() is None:
                done = False
            else:
                del killed[pid]
            continue
        stat = fs.stat(pid)
        if stat is None or stat.starttime != starttime:
            del killed[pid]
            continue
        if own.get(pid) == starttime:
            if stat.state != "Z":
                done = False
            continue
        if stat.state == "Z" and stat.ppid == me:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        done = False
    return done


def _out_of_descriptors(path: str, err: OSError) -> CgroupError:
    return CgroupError(
        path,
        f"cannot kill its processes: {err.strerror} (a pidfd and a file to read need two "
        "free descriptors: close some, or raise RLIMIT_NOFILE)",
    )


def _children_of_self(fs: ProcFS) -> dict[int, int]:
    """This process's children (PID -> starttime), read the way the core walk reads them."""

    me = fs.stat(os.getpid())
    assert me is not None  # this process
    source = children_source(fs)
    source.refresh()
    kids = source.children(me.pid, me)
    return {pid: st.starttime for pid in kids if (st := fs.stat(pid)) is not None}
