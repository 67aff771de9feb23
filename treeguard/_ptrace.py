"""ptrace(2), bound once, for the seize backend: the requests it makes, and errno turned into
treeguard errors in one place (:func:`error`).

Why ctypes from the standard library: the backend needs six requests (SEIZE, INTERRUPT,
DETACH, CONT, LISTEN, GETEVENTMSG) and nothing of a debugger. On PyPI, ``python-ptrace`` is a
debugger toolkit (breakpoints, disassembly, syscall decoding) that itself calls ptrace through
ctypes; ``ptrace`` (a C extension, last released 2010) and ``pyptrace`` (2017) are unmaintained
and predate nothing we need but are not kept up either. A dependency would bring much more
code than the one call it wraps. ``ctypes`` is imported on first use, not when treeguard is
imported.

Requests are per *thread* (ptrace(2): "tracee always means (one) thread") and, once a
thread is attached, must come from the very thread that attached it: the backend makes every
call from one tracer thread.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import Any

from .errors import FreezeError, FreezePermissionError, NoSuchProcessError

__all__ = [
    "OPTIONS",
    "PTRACE_EVENT_CLONE",
    "PTRACE_EVENT_FORK",
    "PTRACE_EVENT_STOP",
    "PTRACE_EVENT_VFORK",
    "WALL",
    "detach",
    "error",
    "geteventmsg",
    "has_cap_sys_ptrace",
    "interrupt",
    "permission_reason",
    "seize",
    "tracer_of",
    "yama_scope",
]

# Requests (include/uapi/linux/ptrace.h).
PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_GETEVENTMSG = 0x4201
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
_NAMES = {
    PTRACE_CONT: "PTRACE_CONT",
    PTRACE_DETACH: "PTRACE_DETACH",
    PTRACE_GETEVENTMSG: "PTRACE_GETEVENTMSG",
    PTRACE_SEIZE: "PTRACE_SEIZE",
    PTRACE_INTERRUPT: "PTRACE_INTERRUPT",
    PTRACE_LISTEN: "PTRACE_LISTEN",
}

# Events, reported in bits 8-15 of a ptrace-stop's status (``status >> 8`` of waitid's
# si_status): a fork, vfork or clone of a tracee, and PTRACE_EVENT_STOP, the stop that
# PTRACE_INTERRUPT, a group stop of a seized tracee, or a new auto-attached task reports.
PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_STOP = 128

# Options given with PTRACE_SEIZE: every child and thread a tracee creates is attached by the
# kernel and starts in a ptrace-stop, so that nothing born during the freeze runs.
PTRACE_O_TRACEFORK = 1 << PTRACE_EVENT_FORK
PTRACE_O_TRACEVFORK = 1 << PTRACE_EVENT_VFORK
PTRACE_O_TRACECLONE = 1 << PTRACE_EVENT_CLONE
OPTIONS = PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE

#: waitpid(2)'s ``__WALL``: wait for threads and for children of any exit signal.
WALL = 0x40000000
#: Bit of CAP_SYS_PTRACE in the capability masks of /proc/PID/status.
_CAP_SYS_PTRACE = 19

_lock = threading.Lock()
_bound: _Binding | None = None


class _Binding:
    """``long ptrace(long request, pid_t pid, void *addr, void *data)`` from the C library,
    with its argument and result types, and what calling it needs (errno is kept per thread
    by ctypes)."""

    def __init__(self) -> None:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).ptrace
        fn.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        fn.restype = ctypes.c_long
        self.call: Callable[..., int] = fn
        self.get_errno: Callable[[], int] = ctypes.get_errno
        self.ulong: Any = ctypes.c_ulong
        self.byref: Callable[[Any], Any] = ctypes.byref


def _binding() -> _Binding:
    global _bound
    if _bound is None:
        with _lock:
            if _bound is None:
                _bound = _Binding()
    return _bound


def _request(request: int, tid: int, data: Any = None) -> int:
    b = _bound or _binding()
    result = b.call(request, tid, None, data)
    if result == -1:
        raise error(b.get_errno(), request, tid)
    return result


def error(err: int, request: int, tid: int) -> FreezeError:
    """The treeguard error for ptrace ``request`` on ``tid`` failing with errno ``err``.

    ESRCH (no such thread, or not a tracee of ours in a ptrace-stop) is a
    :class:`NoSuchProcessError` (a ``ProcessLookupError``); EPERM a
    :class:`FreezePermissionError` that says why; EIO from PTRACE_SEIZE a kernel before 3.4.
    """
    name = _NAMES.get(request, str(request))
    if err == errno.ESRCH:
        return NoSuchProcessError(tid, "thread (or tracee in a ptrace-stop)")
    if err == errno.EPERM:
        return FreezePermissionError((tid,), permission_reason(tid))
    if err == errno.EIO and request == PTRACE_SEIZE:
        return FreezeError("this kernel has no PTRACE_SEIZE (Linux 3.4 and later have it)")
    return FreezeError(f"ptrace({name}, {tid}) failed: {os.strerror(err)}")


def seize(tid: int) -> None:
    """Attach to ``tid`` without stopping it, with :data:`OPTIONS` (PTRACE_SEIZE)."""
    _request(PTRACE_SEIZE, tid, OPTIONS)


def interrupt(tid: int) -> None:
    """Stop a seized ``tid`` in a PTRACE_EVENT_STOP, reported to waitid (PTRACE_INTERRUPT)."""
    _request(PTRACE_INTERRUPT, tid)


def detach(tid: int, sig: int = 0) -> None:
    """Let a tracee in a ptrace-stop go, delivering ``sig`` (0: none) as it resumes. A group
    stop in effect is kept: the task stops again as it leaves (kernel/ptrace.c,
    __ptrace_unlink reinstates JOBCTL_STOP_PENDING)."""
    _request(PTRACE_DETACH, tid, sig)


def geteventmsg(tid: int) -> int:
    """The message of the tracee's current event: the new task's TID for fork/vfork/clone."""
    b = _bound or _binding()
    value = b.ulong()
    if b.call(PTRACE_GETEVENTMSG, tid, None, b.byref(value)) == -1:
        raise error(b.get_errno(), PTRACE_GETEVENTMSG, tid)
    return int(value.value)


def _status(tid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            text = f.read().decode("utf-8", "backslashreplace")
    except OSError:
        return fields
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def tracer_of(tid: int) -> int:
    """The thread tracing ``tid`` (``TracerPid`` in proc(5): the tracer's thread ID, which
    is its PID for a single-threaded tracer); 0 if none, or if ``tid`` is gone."""
    value = _status(tid).get("TracerPid", "0")
    return int(value) if value.isdigit() else 0


def yama_scope() -> int | None:
    """Yama's ``ptrace_scope`` (0 to 3), ``None`` if this kernel has no Yama."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope", "rb") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None  # no Yama in this kernel


def has_cap_sys_ptrace() -> bool:
    """Whether this process holds CAP_SYS_PTRACE (in its user namespace)."""
    caps = int(_status(os.getpid()).get("CapEff", "0") or "0", 16)
    return bool(caps >> _CAP_SYS_PTRACE & 1)


def refusal(descendants: bool) -> str | None:
    """Why no ptrace freeze can work here, known before any process is touched (for
    ``backend="auto"``): Yama's ``ptrace_scope`` and this process's CAP_SYS_PTRACE. None if
    one may work (the kernel still says per task: another tracer, another user, ...).

    :param descendants: whether the tree is made of this process's descendants (all that
        Yama's scope 1 lets a process without CAP_SYS_PTRACE trace).
    """
    scope = yama_scope()
    if scope is None or scope == 0:
        return None
    privileged = has_cap_sys_ptrace()
    if scope == 3:
        return "Yama ptrace_scope is 3: no process may attach with ptrace"
    if scope == 2 and not privileged:
        return "Yama ptrace_scope is 2: only a process with CAP_SYS_PTRACE may attach"
    if scope == 1 and not privileged and not descendants:
        return "Yama ptrace_scope is 1: only this process's descendants may be traced"
    return None


def permission_reason(tid: int) -> str:
    """Why the kernel refuses to let this process trace ``tid``, as far as /proc tells:
    another tracer, another user, Yama's ``ptrace_scope``, or the process's own settings."""
    status = _status(tid)
    tracer = status.get("TracerPid", "0")
    if tracer not in ("", "0"):
        found = _status(int(tracer)) if tracer.isdigit() else {}
        owner = found.get("Tgid", tracer)  # the tracer's process, if a thread traces
        return (
            f"PID {tid} is already traced by PID {owner} ({found.get('Name', '?')}); a task "
            "has one tracer at a time (strace, gdb): detach it first"
        )
    if not status:
        return f"PID {tid} is gone"
    privileged = has_cap_sys_ptrace()
    uids = status.get("Uid", "").split()
    if not privileged and uids and any(int(u) != os.geteuid() for u in uids[:3]):
        return (
            f"PID {tid} belongs to uid {uids[0]}, not to this process's (uid {os.geteuid()}); "
            "tracing another user's process needs CAP_SYS_PTRACE"
        )
    scope = yama_scope()
    if scope == 3:
        return "Yama ptrace_scope is 3: no process may attach with ptrace until reboot"
    if scope == 2 and not privileged:
        return "Yama ptrace_scope is 2: only a process with CAP_SYS_PTRACE may attach"
    if scope == 1 and not privileged:
        return (
            f"Yama ptrace_scope is 1: PID {tid} is not a descendant of this process "
            "(freeze your own children, or grant CAP_SYS_PTRACE)"
        )
    return (
        f"the kernel refused to trace PID {tid} (a set-user-ID or non-dumpable process, or a "
        "security module's policy)"
    )
