"""cgroup files: reading and writing control files, waiting for a change, the writing
thread, and listing what a cgroup (and the ones below it) holds. The one place where cgroup
file I/O happens and ``OSError`` becomes :class:`~treeguard.errors.CgroupError`.
"""

from __future__ import annotations

import _thread
import errno
import os
import select
import time
from collections.abc import Callable
from typing import Protocol

from ._thaw import close_fd, open_file
from .errors import (
    CgroupError,
    CgroupUnavailableError,
)
from .procfs import ProcFS

__all__ = [
    "OWN_PREFIX",
    "holds_process",
    "parse_keyed",
    "procs_below",
    "read_file",
    "write_error",
    "write_file",
]

#: Name prefix of the cgroups :meth:`treeguard.cgroup.Cgroup.create` makes; ``auto`` picks
#: the cgroup backend only for a tree alone in one of these.
OWN_PREFIX = "treeguard-"

#: Longest stretch of enumeration between two points where an event loop may run.
_SLICE = 0.002
#: cgroup_file_notify() sends at most one notification per 10 ms per file
#: (CGROUP_FILE_NOTIFY_MIN_INTV, kernel/cgroup/cgroup.c), delaying later ones: the file is
#: also re-read at least this often, so that rate limit never adds up to 10 ms.
_RECHECK = 0.001
#: What a write to a file of a cgroup that was removed fails with.
_GONE_ERRNOS = (errno.ENOENT, errno.ENODEV, errno.ENOTDIR)


class _Events:
    """A cgroup's ``cgroup.events``, held open, and a descriptor that turns readable when it
    changes.

    When the kernel notifies a change of a cgroup file (kernfs_notify), every open
    descriptor of it raises POLLPRI at once (inotify hears of it later, from a workqueue).
    An epoll instance waiting for EPOLLPRI turns that into plain readability, the one
    condition drivers and event loops wait for. Reading through :attr:`fd` clears it;
    epoll reports a change made before it was set up, so none is missed between a read
    and the wait.
    """

    def __init__(self, path: str) -> None:
        try:
            self.fd = open_file(path, os.O_RDONLY | os.O_CLOEXEC)  # a thaw's wait too
        except (FileNotFoundError, NotADirectoryError):
            self.fd = -1
        self._owned = True
        self._epoll: select.epoll | None = None
        self._pollable = True

    @classmethod
    def on(cls, fd: int) -> _Events:
        """A watch of a descriptor of ``cgroup.events`` held by someone else (-1: none, the
        cgroup is gone), who closes it: :meth:`close` closes only the epoll instance."""
        watch = cls.__new__(cls)
        watch.fd, watch._owned = fd, False
        watch._epoll, watch._pollable = None, True
        return watch

    def read(self) -> dict[str, str] | None:
        """The file's fields, ``None`` if the cgroup is gone."""
        data = self._bytes()
        return None if data is None else parse_keyed(data.decode())

    def lines(self) -> list[bytes] | None:
        """The file's lines (``b"frozen 1"``, unparsed), ``None`` if the cgroup is gone."""
        data = self._bytes()
        return None if data is None else data.split(b"\n")

    def _bytes(self) -> bytes | None:
        if self.fd < 0:
            return None
        try:
            return os.pread(self.fd, 4096, 0)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENODEV):
                return None  # removed since it was opened
            raise

    def ready_fd(self) -> int | None:
        """The descriptor to wait on, or ``None`` if there is none (out of descriptors,
        or not a kernfs file): the caller then polls."""
        if self._epoll is None and self._pollable:
            try:
                epoll = select.epoll(1)
            except OSError:
                self._pollable = False
                return None
            try:
                epoll.register(self.fd, select.EPOLLPRI)
            except OSError:
                epoll.close()
                self._pollable = False
                return None
            self._epoll = epoll
        return None if self._epoll is None else self._epoll.fileno()

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            if self._owned:
                close_fd(fd)


def read_file(path: str) -> str | None:
    """A cgroup file's content, or ``None`` if it (or its cgroup) is gone."""
    data = _read_bytes(path)
    return None if data is None else data.decode("utf-8", "replace")


def _read_bytes(path: str) -> bytes | None:
    try:
        fd = open_file(path, os.O_RDONLY | os.O_CLOEXEC)  # a thaw's wait reads too
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as err:
        # A file of a cgroup removed after the open reads as ENODEV.
        if err.errno in (errno.ENOENT, errno.ENODEV):
            return None
        raise
    finally:
        close_fd(fd)


def write_file(path: str, value: str) -> None:
    """Write ``value`` to a cgroup control file, as one write(2).

    :raises ProcessLookupError: if ``value`` is a PID written to ``cgroup.procs`` (or
        ``tasks``) and that process is gone (ESRCH).
    :raises CgroupError: if the write fails otherwise (gone, read-only, not permitted).
    """
    try:
        # A thaw must not fail for want of a descriptor: the reserve is spent if need be.
        fd = open_file(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            close_fd(fd)
    except ProcessLookupError:
        raise
    except OSError as err:
        raise write_error(path, value, err) from err


def write_error(path: str, value: str, err: OSError) -> CgroupError:
    """The error of a write of ``value`` to the cgroup file ``path`` that failed with
    ``err`` (raise it ``from err``: :meth:`CgroupFreezer.write_control` looks at the cause)."""
    cls = CgroupUnavailableError if err.errno in (errno.EROFS, errno.EACCES) else CgroupError
    return cls(
        os.path.dirname(path),
        f"cannot write {value!r} to {os.path.basename(path)}: {err.strerror}",
    )


class _Writer:
    """One :func:`write_file` (``job``) in a short-lived thread of its own.

    Writing ``cgroup.freeze`` (or ``freezer.state``) returns only once the kernel has told
    every task of the cgroup to stop: 2.5 ms for 1,000 processes on this machine, 20 ms
    for 5,000 threads. Meanwhile the GIL is free, so the caller can do useful work (the
    census) and an event loop keeps running; ``done_fd`` (an eventfd) turns readable when
    the write is over. The thread is started only when there is a write to make: started
    earlier, to get ready while the cgroup was found, it took the GIL from that work and
    cost more than it hid (0.1 to 0.4 ms a freeze in A/B runs with 1,000 processes). Where
    no thread can be had, the write happens in the caller.

    Whoever comes first, the thread about to write or :meth:`close`, claims the writer (one
    ``dict.setdefault``, which nothing can interrupt half way): once closed, a thread that
    had not begun never writes, and one that had is waited for. So a thaw that closes the
    writer first is never overtaken by the freeze, however the caller was interrupted (the
    thread may not even have started). The caller never holds a lock here: an interrupt
    anywhere leaves nothing for the next call to wait on.
    """

    def __init__(self, job: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.done_fd = -1
        self._job = job
        self._claim: dict[str, str] = {}
        self._done = False

    def start(self) -> None:
        """Start the write (in the caller if no thread, or no descriptor to learn when it is
        over, can be had: a thaw must not fail for want of either)."""
        try:
            self.done_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            _thread.start_new_thread(self._run, ())
        except (RuntimeError, OSError):  # RLIMIT_NPROC, RLIMIT_NOFILE, ...
            if self._claim.setdefault("by", "caller") == "caller":
                t0 = time.perf_counter()
                try:
                    self._job()
                finally:
                    self.seconds = time.perf_counter() - t0

    def _run(self) -> None:
        if self._claim.setdefault("by", "thread") != "thread":
            return  # closed before this thread ran: the write must not happen now
        t0 = time.perf_counter()
        try:
            self._job()
        except BaseException as err:  # handed to the caller, see _write_during
            self.error = err
        finally:
            self.seconds = time.perf_counter() - t0
            # Over before it is said: the caller, woken by the eventfd, must find it over
            # at once (waiting for this thread to get the GIL back costs up to the
            # interpreter's 5 ms switch interval). The write to done_fd comes last:
            # close() closes it only once it reads readable.
            self._done = True
            os.eventfd_write(self.done_fd, 1)

    @property
    def over(self) -> bool:
        return self._done or self._claim.get("by") == "caller"

    def close(self) -> None:
        """Wait until the write is over, or make sure it never happens if it has not begun,
        even through KeyboardInterrupt (re-raised then): nothing may touch the cgroup
        before, or a thaw could land before the freeze. Idempotent; the write's own
        failure is left in :attr:`error`."""
        interrupted: BaseException | None = None
        claimed = self._claim.setdefault("by", "caller")
        if claimed == "thread" and self.done_fd >= 0:  # (closed already: it was over)
            # done_fd turns readable with the thread's last act: then it may be closed.
            # (poll, not select: a supervisor's descriptors may be numbered past 1,023.)
            done = select.poll()
            done.register(self.done_fd, select.POLLIN)
            while True:
                try:
                    if done.poll(_RECHECK * 1000):
                        break
                except BaseException as err:  # noqa: BLE001 - raised below, once it is over
                    interrupted = err
        fd, self.done_fd = self.done_fd, -1
        if fd >= 0:
            os.close(fd)
        if interrupted is not None:
            raise interrupted


def parse_keyed(text: str) -> dict[str, str]:
    """A flat-keyed cgroup file (``cgroup.events``: ``populated 1\\nfrozen 0``) as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key:
            out[key] = value.strip()
    return out


class Held(Protocol):
    """A cgroup directory's files held open (:class:`treeguard._cgroupfiles.CgroupFiles`):
    the listings below read the files of :attr:`path` through it."""

    path: str

    def read(self, name: str) -> bytes | None:
        """The whole file ``name``; ``None`` if the cgroup is gone."""
        ...


def _read_in(d: str, name: str, held: Held | None) -> bytes | None:
    """The file ``name`` of the cgroup ``d``, through ``held`` if it holds that cgroup;
    ``None`` if the cgroup (or the file) is gone."""
    if held is not None and d == held.path:
        return held.read(name)
    return _read_bytes(os.path.join(d, name))


def _subtree(path: str, held: Held | None = None) -> list[str]:
    """``path`` and every cgroup below it (the freezer is hierarchical in v1 and v2)."""
    dirs = [path]
    # A v2 cgroup counts its descendants in cgroup.stat: the usual leaf costs one small
    # read instead of a directory walk (a tenth of a millisecond less per freeze, cold).
    stat = _read_in(path, "cgroup.stat", held)
    if stat is not None and b"\nnr_descendants 0\n" in b"\n" + stat:  # (a line, unparsed)
        return dirs
    for top, subdirs, _ in os.walk(path):
        dirs += (os.path.join(top, d) for d in subdirs)
    return dirs


def _listing(dirs: list[str], name: str, held: Held | None = None) -> bytes:
    """The file ``name`` (``cgroup.procs``, ``cgroup.threads``, ``tasks``) of each cgroup
    of ``dirs``, one after the other (the one ``held`` holds read through it); a cgroup
    removed meanwhile lists nothing."""
    out = []
    for d in dirs:
        data = _read_in(d, name, held)
        if data is not None:
            out.append(data)
    return b"".join(out)  # each entry ends with a newline


def _ids(dirs: list[str], name: str, held: Held | None = None) -> set[int]:
    """The PIDs (or TIDs) listed in the file ``name`` of each cgroup of ``dirs``."""
    return set(map(int, _listing(dirs, name, held).split()))


def _procs(dirs: list[str], fs: ProcFS | None = None, held: Held | None = None) -> set[int]:
    """The processes in the cgroups ``dirs`` (``cgroup.procs``).

    A threaded v2 cgroup refuses to list its processes (EOPNOTSUPP: cgroup-v2.rst,
    "Threads"; a process is in it only through some of its threads): there, each thread of
    ``cgroup.threads`` stands for its thread group, read from ``/proc/TID/status``.
    """
    found: set[int] = set()
    for d in dirs:
        try:
            found |= _ids([d], "cgroup.procs", held)
        except OSError as err:
            if err.errno != errno.EOPNOTSUPP:
                raise
            fs = fs or ProcFS()
            for tid in _ids([d], "cgroup.threads", held):
                status = fs.status(tid)
                if status is not None and status.get("Tgid", "").isdigit():
                    found.add(int(status["Tgid"]))
    return found


def procs_below(path: str) -> list[int]:
    """Every process in the cgroup ``path`` and its descendants (``cgroup.procs``)."""
    return sorted(_procs(_subtree(path)))


def holds_process(path: str, pid: int, held: Held | None = None) -> bool:
    """Whether the process ``pid`` is in the cgroup ``path`` or one below it (its
    ``cgroup.procs`` lists it; the list is searched, not parsed)."""
    entry = b"%d\n" % pid
    for d in _subtree(path, held):
        try:
            listed = _read_in(d, "cgroup.procs", held)
        except OSError as err:
            if err.errno != errno.EOPNOTSUPP:
                raise
            if pid in _procs([d], held=held):  # threaded: from its threads
                return True
            continue
        if listed is not None and (listed.startswith(entry) or b"\n" + entry in listed):
            return True
    return False


def _unfrozen_tasks(pids: list[int], fs: ProcFS, frozen_shows: str) -> list[tuple[int, int, str]]:
    """``(pid, tid, state)`` of tasks that look runnable, to name in a timeout error."""
    late: list[tuple[int, int, str]] = []
    for pid in pids:
        for tid in fs.tids(pid) or ():
            st = fs.stat(pid, tid)
            if st is not None and st.state not in frozen_shows:
                late.append((pid, tid, st.state))
    return late
