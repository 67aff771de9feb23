"""Reading a snapshot from /proc: a tree walked twice (consistent when both passes agree), or
the processes a freeze holds. The model and its JSON schema are in :mod:`treeguard._snapshot`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable

from ._describe import describe as described
from ._describe import files_user
from ._report import FreezeReport
from ._snapshot import ProcessRecord, SignalState, ThreadRecord, TreeSnapshot, decode_sigmask
from ._tree import ancestors, children_source, walk
from ._types import Target
from .errors import InvalidArgumentError, NoSuchProcessError
from .procfs import DEAD_STATES, STOPPED_STATES, ProcFS, Stat

__all__ = ["snapshot", "snapshot_of_freeze"]


class _Reader:
    """Reads records through the core's ProcFS; knows the caller's namespace and ancestry."""

    def __init__(self, fs: ProcFS) -> None:
        self.fs = fs
        self.me = os.getpid()
        self.callers = {self.me, *ancestors(fs)}
        self.my_ns = _ns(fs, "self")

    def record(self, pid: int, stat: Stat, depth: int) -> ProcessRecord | None:
        """The record of ``pid`` (whose stat was just read); ``None`` if it vanished."""
        fs = self.fs
        status = fs.status(pid)
        if status is None:
            return None
        threads: list[ThreadRecord] = []
        for tid in sorted(fs.tids(pid) or ()):
            tstat = stat if tid == pid else fs.stat(pid, tid)
            tstatus = status if tid == pid else fs.status(pid, tid)
            if tstat is None or tstatus is None:
                continue  # the thread exited meanwhile
            threads.append(
                ThreadRecord(
                    tid=tid,
                    state=tstat.state,
                    pending=_mask(tstatus, "SigPnd"),
                    blocked=_mask(tstatus, "SigBlk"),
                )
            )
        if not threads:  # a zombie leader has no readable task of its own
            threads.append(ThreadRecord(tid=pid, state=stat.state))
        return ProcessRecord(
            pid=pid,
            tgid=_field(status, "Tgid", pid),
            ppid=stat.ppid,
            depth=depth,
            name=stat.name,
            state=stat.state,
            starttime=stat.starttime,
            uid=_uid(status),
            tracer_pid=_field(status, "TracerPid", 0),
            reason=self.reason(pid, stat),
            signals=SignalState(
                pending=_mask(status, "SigPnd"),
                shared_pending=_mask(status, "ShdPnd"),
                blocked=_mask(status, "SigBlk"),
                ignored=_mask(status, "SigIgn"),
                caught=_mask(status, "SigCgt"),
            ),
            threads=tuple(threads),
        )

    def reason(self, pid: int, stat: Stat) -> str | None:
        """Why ``pid`` cannot be frozen, checked as the kernel's checkpoint code does:
        not dead, a user task, accessible to the caller, in the caller's namespace."""
        if stat.is_kernel_thread:
            return "kernel thread"
        if stat.state in DEAD_STATES and stat.num_threads <= 1:
            return "zombie"
        if pid in self.callers:
            return "caller"
        # Signal 0 checks permission and delivers nothing (kill(2)); through a pidfd it
        # cannot reach a recycled PID either.
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return "zombie"
        except PermissionError:
            return "no permission"
        try:
            signal.pidfd_send_signal(fd, 0)
        except PermissionError:
            return "no permission"
        except ProcessLookupError:
            return "zombie"
        finally:
            os.close(fd)
        ns = _ns(self.fs, str(pid))
        if ns is None:
            # Reading the link needs ptrace read access (proc(5), namespaces(7)).
            return "no permission"
        if self.my_ns is not None and ns != self.my_ns:
            return "other PID namespace"
        return None


def _ns(fs: ProcFS, who: str) -> str | None:
    try:
        return os.readlink(f"{fs.root}/{who}/ns/pid")
    except OSError:
        return None


def _mask(status: dict[str, str], key: str) -> tuple[str, ...]:
    value = status.get(key)
    if value is None:
        return ()
    try:
        return decode_sigmask(value)
    except InvalidArgumentError:
        return ()


def _field(status: dict[str, str], key: str, default: int) -> int:
    try:
        return int(status[key].split()[0])
    except (KeyError, IndexError, ValueError):
        return default


def _uid(status: dict[str, str]) -> int:
    # "Uid:" holds the real, effective, saved and filesystem UIDs (proc(5)).
    try:
        return int(status["Uid"].split()[1])
    except (KeyError, IndexError, ValueError):
        return -1


def _flags(**flags: object) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise InvalidArgumentError(name, "must be True or False")


def _pass(
    fs: ProcFS, root: int, include_root: bool, excluded: frozenset[int], reader: _Reader | None
) -> tuple[list[ProcessRecord], dict[tuple[int, int], int]]:
    """One depth-first walk from ``root``; records (if ``reader``) and identities with ppid."""
    source = children_source(fs)
    source.refresh()
    records: list[ProcessRecord] = []
    seen: dict[tuple[int, int], int] = {}
    depth_of: dict[int, int] = {}

    def visit(pid: int) -> Stat | None:
        if pid in excluded or pid in depth_of:
            return None
        stat = fs.stat(pid)
        if stat is None:
            return None
        depth = depth_of.get(stat.ppid, -1) + 1 if pid != root else 0
        depth_of[pid] = depth
        if pid == root and not include_root:
            depth_of[pid] = -1  # its children become the top records
            return stat
        seen[(pid, stat.starttime)] = stat.ppid
        if reader is not None:
            record = reader.record(pid, stat, depth)
            if record is None:
                return None
            records.append(record)
        return stat

    for _ in walk((root,), visit, source):
        pass
    return records, seen


def snapshot(
    root: Target | None = None,
    *,
    include_root: bool = True,
    exclude: Iterable[Target] = (),
    describe: bool = True,
    pss: bool = False,
) -> TreeSnapshot:
    """Take a snapshot of the tree below ``root``.

    The tree is walked twice; when the two passes disagree (a process appeared or vanished
    in between) the snapshot is marked inconsistent with the difference. Nothing is
    signalled (a permission check with signal 0 delivers nothing).

    :param root: where the tree starts (default: the calling process): a PID or a process
        object (``subprocess.Popen``, ``multiprocessing.Process``, ``psutil.Process``).
    :param include_root: record ``root`` itself, not only what is below it.
    :param exclude: PIDs left out, each with its whole subtree.
    :param describe: also read what each process is (command line, user, RSS, CPU times;
        through psutil, after both passes so that the passes stay close together).
    :param pss: also read each process's proportional set size (implies ``describe``;
        the kernel walks the process's mappings, about 0.5 ms a process).
    :raises InvalidArgumentError: if a PID is not a positive int, or an option is not
        True or False.
    :raises NoSuchProcessError: if ``root`` does not exist.
    """
    from ._checks import as_pid

    root = None if root is None else as_pid("root", root)
    if isinstance(exclude, str | bytes) or not isinstance(exclude, Iterable):
        raise InvalidArgumentError("exclude", "must be an iterable of PIDs")
    excluded = frozenset(as_pid("exclude", pid) for pid in exclude)
    _flags(include_root=include_root, describe=describe, pss=pss)
    fs = ProcFS()
    start = os.getpid() if root is None else root
    if fs.stat(start) is None:
        raise NoSuchProcessError(start)
    taken_at = time.time()
    records, first = _pass(fs, start, include_root, excluded, _Reader(fs))
    _, second = _pass(fs, start, include_root, excluded, None)
    appeared = tuple(sorted(set(second) - set(first)))
    vanished = tuple(sorted(set(first) - set(second)))
    moved = tuple(sorted(k for k in set(first) & set(second) if first[k] != second[k]))
    consistent = not (appeared or vanished or moved)
    found = tuple(records)
    if describe or pss:
        found = described(found, fs, pss=pss)
    return TreeSnapshot(
        root=root,
        include_root=include_root,
        records=found,
        consistent=consistent,
        consistency="two passes agree" if consistent else "changed",
        appeared=appeared + moved,
        vanished=vanished + moved,
        taken_at=taken_at,
    )


def snapshot_of_freeze(
    identities: tuple[tuple[int, int], ...],
    already_stopped: tuple[tuple[int, int], ...],
    report: FreezeReport,
    frozen: bool,
    *,
    describe: bool = True,
    pss: bool = False,
) -> TreeSnapshot:
    """The snapshot of what a freeze stopped (``identities``, parents first) and found
    stopped already, as :meth:`ProcessesGuard.snapshot` asks for it; ``describe`` and
    ``pss`` as for :func:`snapshot`, read after the states were (the freeze was proven
    before this is called), with two reads left out that could block while the tree is
    frozen: the command line and PSS of a process with a task not proven stopped (in ``D``,
    say, maybe holding its memory-map lock), and user names served by an NSS daemon (names
    come from ``/etc/passwd`` only).

    Consistent when the freeze holds and every one of its processes is still the same
    process and stopped: nothing could have changed between the reads.

    :raises InvalidArgumentError: if ``describe`` or ``pss`` is not True or False.
    """
    _flags(describe=describe, pss=pss)
    fs = ProcFS()
    reader = _Reader(fs)
    wanted = dict(identities)
    wanted.update(already_stopped)
    order = {pid: i for i, (pid, _) in enumerate(identities)}
    for pid, _ in already_stopped:
        order.setdefault(pid, len(order))
    stats: dict[int, Stat] = {}
    vanished: list[tuple[int, int]] = []
    for pid, starttime in wanted.items():
        stat = fs.stat(pid)
        if stat is None or stat.starttime != starttime:
            vanished.append((pid, starttime))
        else:
            stats[pid] = stat
    # Order as a tree: a record's parent is the nearest ancestor that is in the set.
    kids: dict[int, list[int]] = {}
    tops: list[int] = []
    for pid in sorted(stats, key=order.__getitem__):
        parent = stats[pid].ppid
        (kids.setdefault(parent, []) if parent in stats else tops).append(pid)
    records: list[ProcessRecord] = []
    stack = [(pid, 0) for pid in reversed(tops)]
    while stack:
        pid, depth = stack.pop()
        record = reader.record(pid, stats[pid], depth)
        if record is None:
            vanished.append((pid, stats[pid].starttime))
            continue
        records.append(record)
        stack += [(kid, depth + 1) for kid in reversed(kids.get(pid, ()))]
    # A parent waiting for its stopped vfork child stays in D but cannot run (the guard
    # classified it): it does not make the snapshot inconsistent.
    in_vfork = set(report.blocked_in_vfork)
    # The signal and ptrace backends leave tasks in T or t; a cgroup-frozen task shows S
    # (cgroup-v2.rst), and the cgroup backend verified the freeze through the cgroup itself.
    by_signal = report.backend in ("signal", "ptrace")
    running = [
        r
        for r in records
        if by_signal
        and any(
            t.state not in STOPPED_STATES
            and t.state not in DEAD_STATES
            and not (t.state == "D" and r.pid in in_vfork)
            for t in r.threads
        )
    ]
    if not frozen:
        consistency, consistent = "not frozen", False
    elif vanished or running:
        consistency, consistent = "changed", False
    else:
        consistency, consistent = "frozen", True
    found = tuple(records)
    if describe or pss:
        # Nothing read may block while the tree is frozen (see treeguard._describe): the
        # memory map of a process not proven stopped may be locked by a task of it that
        # sleeps in the kernel, and an NSS daemon may be one of the frozen processes.
        unproven = {r.pid for r in running} if frozen else set()
        found = described(found, fs, pss=pss, unproven=unproven, users=files_user)
    return TreeSnapshot(
        root=None,
        include_root=True,
        records=found,
        consistent=consistent,
        consistency=consistency,
        vanished=tuple(sorted(vanished)),
    )
