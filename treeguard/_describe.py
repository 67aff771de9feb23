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
"""

from __future__ import annotations

import dataclasses
import pwd
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._records import ProcessRecord

if TYPE_CHECKING:
    from .procfs import ProcFS

__all__ = ["describe"]


def describe(
    records: tuple[ProcessRecord, ...], fs: ProcFS, *, pss: bool
) -> tuple[ProcessRecord, ...]:
    """``records`` with what each process is filled in (see
    :class:`~treeguard._records.ProcessRecord`).

    :param fs: the reader whose ``stat`` confirms each process's identity after the read.
    :param pss: also read the proportional set size (slower, see the module's docstring).
    """
    import psutil  # imported here: only a snapshot that describes pays for it

    users: dict[int, str | None] = {}
    described: list[ProcessRecord] = []
    for record in records:
        values = _read(psutil, record.pid, pss)
        stat = fs.stat(record.pid) if values else None
        if stat is None or stat.starttime != record.starttime:
            values = {}  # gone, or its PID names another process now
        if record.uid >= 0 and record.uid not in users:
            users[record.uid] = _user(record.uid)
        values["user"] = users.get(record.uid)
        described.append(dataclasses.replace(record, **values))
    return tuple(described)


def _read(psutil: Any, pid: int, pss: bool) -> dict[str, Any]:
    """The values psutil could read of ``pid``, by field name; ``{}`` if it is gone."""
    values: dict[str, Any] = {}
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return values
    readers: list[Callable[[], dict[str, Any]]] = [
        lambda: {"cmdline": tuple(proc.cmdline())},
        lambda: {"rss": proc.memory_info().rss},
        lambda: dict(zip(("cpu_user", "cpu_system"), proc.cpu_times()[:2], strict=True)),
    ]
    if pss:
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


def _user(uid: int) -> str | None:
    """The name of ``uid`` in the user database (``None`` if it has none)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
