"""Every rule about arguments, in one place: what a PID, a process, a number of seconds and
the freezing options must be. Each raises one clear error and touches no process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from .errors import FreezeError, InvalidArgumentError, NoSuchProcessError
from .procfs import ProcFS

__all__ = [
    "MAX_SECONDS",
    "SCOPES",
    "check_guard",
    "PID_MAX_LIMIT",
    "as_pid",
    "check_options",
    "check_pid",
    "check_proc",
    "check_process",
    "check_seconds",
]

#: Linux's PID_MAX_LIMIT: no PID is larger on any configuration.
PID_MAX_LIMIT = 4 * 1024 * 1024


def check_pid(name: str, value: object) -> int:
    """``value`` as a PID, or :class:`InvalidArgumentError` saying what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(name, f"a PID must be an int, not {type(value).__name__}")
    if not 0 < value <= PID_MAX_LIMIT:
        raise InvalidArgumentError(name, f"a PID is between 1 and {PID_MAX_LIMIT}, not {value}")
    return value


#: The longest timeout or lease accepted, in seconds (a year): far beyond any freeze, and
#: small enough for every clock and poll(2) it is handed to.
MAX_SECONDS = 365 * 24 * 3600.0


def check_seconds(name: str, value: object) -> float:
    """``value`` as a positive number of seconds up to :data:`MAX_SECONDS`, or
    :class:`InvalidArgumentError` saying what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(name, f"must be a number of seconds, not {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not (seconds > 0 and math.isfinite(seconds)) or seconds > MAX_SECONDS:
        raise InvalidArgumentError(
            name, f"must be a positive number of seconds up to {MAX_SECONDS:g}, not {value!r}"
        )
    return seconds


def check_process(
    name: str, pid: int, fs: ProcFS, *, zombie_ok: bool = True, keep: bool = False
) -> int:
    """Raise unless ``pid`` names a process (not a thread) visible here.

    :returns: with ``keep``, a pidfd of it, opened before its stat was read (``-1`` if none
        could be had); else ``-1``.
    :raises NoSuchProcessError: if there is no such process (or, unless ``zombie_ok``, only
        its zombie: it will never run again).
    :raises InvalidArgumentError: if ``pid`` is a thread of another process.
    """
    # The stat line (the kernel formats /proc/PID/status, fifty lines with memory figures,
    # in several times as long) says whether it lives, and a pidfd whether it leads its
    # thread group (pidfd_open refuses another thread, EINVAL).
    fd = -1
    if fs.root == "/proc":
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise NoSuchProcessError(pid) from None
        except OSError:
            pass  # a thread (EINVAL), or no descriptor to spare: the status file says
    try:
        stat = fs.stat(pid)
        if stat is None or (not zombie_ok and stat.is_dead):
            raise NoSuchProcessError(pid)
        if fd < 0:
            status = fs.read(f"{pid}/status")
            if status is None:
                raise NoSuchProcessError(pid)
            tgid = _field(status, b"Tgid") or str(pid)
            if tgid != str(pid):
                raise InvalidArgumentError(
                    name, f"{pid} is a thread of process {tgid}, not a process: give {tgid}"
                )
        if keep or fd < 0:
            return fd
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    os.close(fd)
    return -1


def _field(status: bytes, key: bytes) -> str:
    """The value of the line ``key:`` of a status file, or ``""``."""
    head = key + b":"
    at = 0 if status.startswith(head) else status.find(b"\n" + head) + 1
    if at == 0 and not status.startswith(head):
        return ""
    end = status.find(b"\n", at)
    return status[at + len(head) : end if end >= 0 else None].decode("ascii", "replace").strip()


def check_proc(fs: ProcFS) -> None:
    """Raise unless ``fs`` is the /proc of this process's PID namespace.

    A /proc mounted for another PID namespace (``unshare --pid --fork`` without
    ``--mount-proc``) names other processes by the same numbers: trusting it would freeze
    strangers and report success. ``/proc/self`` there names this process by its number in
    that namespace; it is this process's own /proc only if that is ``os.getpid()``.
    """
    try:
        seen = os.readlink(f"{fs.root}/self")
    except OSError:
        seen = "?"
    if seen != str(os.getpid()):
        raise FreezeError(
            f"{fs.root} belongs to another PID namespace (its /proc/self is {seen}, this "
            f"process is {os.getpid()}): mount a /proc for this namespace (unshare "
            "--mount-proc, or mount -t proc proc /proc in a new mount namespace)"
        )


def check_options(*, timeout: object, max_passes: object, partial_ok: object) -> None:
    check_seconds("timeout", timeout)
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1:
        raise InvalidArgumentError("max_passes", f"must be an int >= 1, not {max_passes!r}")
    if not isinstance(partial_ok, bool):
        raise InvalidArgumentError("partial_ok", f"must be True or False, not {partial_ok!r}")


def as_pid(name: str, value: object) -> int:
    """The PID of a process given as a PID, a ``subprocess.Popen``, a started
    ``multiprocessing.Process`` or a ``psutil.Process``.

    :raises InvalidArgumentError: if ``value`` is none of those (or not started).
    :raises NoSuchProcessError: if the object's process has ended (a Popen or Process that
        was waited for: its PID may name another process by now), or a ``psutil.Process``
        whose PID names another process now (psutil compares its creation time).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return check_pid(name, value)
    pid = getattr(value, "pid", None)
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise InvalidArgumentError(
            name,
            "give a PID, a subprocess.Popen, a started multiprocessing.Process or a "
            f"psutil.Process, not {value!r}",
        )
    check_pid(name, pid)
    is_running = getattr(value, "is_running", None)
    if callable(is_running) and hasattr(value, "create_time"):  # psutil.Process
        if not is_running():
            raise NoSuchProcessError(pid)
    elif getattr(value, "returncode", None) is not None:  # a Popen that was reaped
        raise NoSuchProcessError(pid)
    elif getattr(value, "exitcode", None) is not None:  # a joined multiprocessing.Process
        raise NoSuchProcessError(pid)
    return pid


#: What a freeze covers: the tree below a root, or the caller's whole PID namespace.
SCOPES = ("tree", "namespace")


def check_guard(
    *,
    root: object,
    include_root: object,
    exclude: object,
    timeout: object,
    max_passes: object,
    partial_ok: object,
    scope: object,
    backend: object,
    backends: tuple[str, ...],
    watchdog: object,
    max_frozen: object,
    subreaper: object,
) -> tuple[int | None, tuple[int, ...], bool]:
    """Check every option of :class:`~treeguard.ProcessesGuard` before anything runs.

    :returns: the root's PID (None: the caller), the excluded PIDs, and whether a watchdog
        helper is wanted (a lease asks for one; ptrace, whose watchdog is the kernel, never).
    :raises InvalidArgumentError: if an option is of the wrong type or out of range.
    :raises NoSuchProcessError: if ``root`` or an ``exclude`` names no process.
    """
    root_pid = None if root is None else as_pid("root", root)
    if isinstance(exclude, str | bytes) or not isinstance(exclude, Iterable):
        raise InvalidArgumentError("exclude", "must be an iterable of PIDs")
    excluded = tuple(as_pid("exclude", pid) for pid in exclude)
    check_options(timeout=timeout, max_passes=max_passes, partial_ok=partial_ok)
    if not isinstance(include_root, bool):
        raise InvalidArgumentError("include_root", "must be True or False")
    if scope not in SCOPES:
        raise InvalidArgumentError("scope", f"must be one of {SCOPES}, not {scope!r}")
    if scope == "namespace" and root is not None:
        raise InvalidArgumentError("root", "scope='namespace' covers the whole namespace")
    if include_root:
        if root_pid is None or root_pid == os.getpid():
            raise InvalidArgumentError("include_root", "the calling process cannot freeze itself")
        if root_pid == 1:
            raise InvalidArgumentError("include_root", "PID 1 is never frozen")
    for flag, value in (("watchdog", watchdog), ("subreaper", subreaper)):
        if not isinstance(value, bool):
            raise InvalidArgumentError(flag, f"must be True or False, not {value!r}")
    if max_frozen is not None:
        check_seconds("max_frozen", max_frozen)
        watchdog = True  # the lease is kept by the watchdog
    if backend not in backends:
        raise InvalidArgumentError("backend", f"must be one of {backends}, not {backend!r}")
    if backend == "ptrace":
        if max_frozen is not None:
            raise InvalidArgumentError(
                "max_frozen",
                "a ptrace hold cannot be ended from another process (SIGCONT does not "
                "wake a traced task): use the signal or cgroup backend for a lease",
            )
        # The kernel is a ptrace hold's watchdog: it lets every tracee go when this
        # process dies. A helper would add nothing but a visible SIGCONT.
        watchdog = False
    fs = ProcFS()
    check_proc(fs)
    if root_pid is not None:
        check_process("root", root_pid, fs, zombie_ok=False)
    for pid in excluded:  # a typo must not leave the real monitor to be frozen
        check_process("exclude", pid, fs)
    return root_pid, excluded, bool(watchdog)
