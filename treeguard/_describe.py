"""What each process of a snapshot is: command line, user, memory (RSS, PSS), CPU times.

Read through psutil, one ``psutil.Process.oneshot()`` per process, after the tree was walked
(and for a guard's snapshot after the freeze was proven): never on a freeze's path, where
treeguard's own /proc readers enumerate and verify. A value that cannot be read is ``None``,
never an error: the process exited, or the caller may not read it (PSS comes from
``/proc/PID/smaps_rollup``, which needs ptrace read access, proc(5)). A process whose start
time changed while it was read was replaced by another under its PID: nothing read of it is
kept.

PSS costs most: the kernel walks every mapping of the process to divide shared pages among
their sharers, so it is read only when asked for.

Reading a frozen tree must not block, or the tree stays frozen. Two reads could: the command
line and PSS take the process's memory-map lock (``mmap_lock``), which a task sleeping in the
kernel may hold (a page fault waiting on a FUSE server that is frozen too never ends), so they
are skipped for the processes named ``unproven``; the user name goes through NSS (nscd, sssd,
LDAP, systemd-userdbd may answer, and any of them may be in the tree), so ``users=files_user``
reads ``/etc/passwd`` instead. RSS and CPU times come from ``/proc/PID/statm`` and
``/proc/PID/stat``, which take no such lock.
"""

from __future__ import annotations

import dataclasses
import pwd
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from ._records import ProcessRecord

if TYPE_CHECKING:
    from .procfs import ProcFS

__all__ = ["PASSWD", "describe", "files_user", "nss_user"]

#: The user database read by :func:`files_user`.
PASSWD = "/etc/passwd"


def nss_user(uid: int) -> str | None:
    """The name of ``uid`` in the user database, through NSS (``None`` if it has none)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def files_user(uid: int, passwd: str = PASSWD) -> str | None:
    """The name of ``uid`` in ``passwd`` itself, as NSS's ``files`` source finds it (the
    first line with that UID), asking no daemon; ``None`` if no line has it or the file
    cannot be read."""
    try:
        with open(passwd, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 3 and fields[2] == str(uid) and fields[0]:
                    return fields[0]
    except OSError:
        pass
    return None


def describe(
    records: tuple[ProcessRecord, ...],
    fs: ProcFS,
    *,
    pss: bool,
    unproven: Collection[int] = (),
    users: Callable[[int], str | None] = nss_user,
) -> tuple[ProcessRecord, ...]:
    """``records`` with what each process is filled in (see
    :class:`~treeguard._records.ProcessRecord`).

    :param fs: the reader whose ``stat`` confirms each process's identity after the read.
    :param pss: also read the proportional set size (slower, see the module's docstring).
    :param unproven: processes of a frozen tree not proven stopped outside the kernel: their
        command line and PSS, which take their memory-map lock, are left ``None``.
    :param users: how a UID is named (:func:`files_user` for a frozen tree).
    """
    import psutil  # imported here: only a snapshot that describes pays for it

    names: dict[int, str | None] = {}
    described: list[ProcessRecord] = []
    for record in records:
        values = _read(psutil, record.pid, pss, maps=record.pid not in unproven)
        stat = fs.stat(record.pid) if values else None
        if stat is None or stat.starttime != record.starttime:
            values = {}  # gone, or its PID names another process now
        if record.uid >= 0 and record.uid not in names:
            names[record.uid] = users(record.uid)
        values["user"] = names.get(record.uid)
        described.append(dataclasses.replace(record, **values))
    return tuple(described)


def _read(psutil: Any, pid: int, pss: bool, *, maps: bool) -> dict[str, Any]:
    """The values psutil could read of ``pid``, by field name; ``{}`` if it is gone. The
    command line and PSS only if ``maps`` (their reads take the memory-map lock)."""
    values: dict[str, Any] = {}
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return values
    readers: list[Callable[[], dict[str, Any]]] = [
        lambda: {"rss": proc.memory_info().rss},
        lambda: dict(zip(("cpu_user", "cpu_system"), proc.cpu_times()[:2], strict=True)),
    ]
    if maps:
        readers.append(lambda: {"cmdline": tuple(proc.cmdline())})
    if pss and maps:
        readers.append(lambda: {"pss": proc.memory_full_info().pss})
    with proc.oneshot():  # /proc/PID/stat and status read once for all of them
        for read in readers:
            try:
                values.update(read())
            except psutil.ZombieProcess:
                continue  # a zombie has no memory or arguments left: those stay None
            except psutil.NoSuchProcess:
                return {}
            except (psutil.AccessDenied, OSError):
                continue
    return values
