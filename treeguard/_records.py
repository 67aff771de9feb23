"""The records of a snapshot: one :class:`ProcessRecord` per process, with its threads, its
decoded signal state (:class:`SignalState`), what it is (command line, user, memory, CPU
time) and the warnings a freezer should heed. :class:`treeguard._snapshot.TreeSnapshot`
holds them in tree order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ._jsonshape import check
from .errors import InvalidArgumentError

__all__ = ["REASONS", "WARNING_KINDS", "ProcessRecord", "SignalState", "ThreadRecord"]

#: Why a process cannot be frozen (``ProcessRecord.reason``).
REASONS = (
    "zombie",  # it cannot run, so there is nothing to stop
    "kernel thread",  # no user space to stop
    "no permission",  # the caller may not signal it (kill(2) EPERM)
    "other PID namespace",  # not in the caller's PID namespace (CRIU's and the kernel's check)
    "caller",  # the calling process or one of its ancestors (a freezer never stops these)
)

#: Kinds of :attr:`TreeSnapshot.warnings`: what a user should know before using the
#: signal backend on this tree.
WARNING_KINDS = (
    "catches SIGCONT",  # its handler runs on the thaw: it notices the freeze
    "catches SIGCHLD",  # it is told (CLD_STOPPED/CLD_CONTINUED) when a child stops
    "traced",  # a tracer (TracerPid != 0) or ptrace-stop (t): SIGSTOP goes to the tracer
    "uninterruptible",  # a task in D stops only when it leaves the kernel
    "job-control relay",  # su/runuser/sudo: stops itself when its child stops
)

#: Programs that wait for their child with WUNTRACED and pass its stop on by stopping
#: themselves (util-linux su and runuser, sudo): a signal freeze of the child is seen.
_RELAYS = frozenset({"su", "runuser", "sudo", "doas"})


@dataclass(frozen=True, slots=True)
class SignalState:
    """A process's signal masks, decoded; ``pending`` is its main thread's own."""

    pending: tuple[str, ...] = ()
    shared_pending: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    caught: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ThreadRecord:
    """One thread: its state and its own pending and blocked signals."""

    tid: int
    state: str
    pending: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """One process of a snapshot. ``reason`` says why it cannot be frozen (see
    :data:`REASONS`), ``None`` when it can.

    What the process is, each ``None`` when it was not read or could not be (the process
    exited, or the caller may not read it): ``cmdline`` (its arguments), ``user`` (the
    name of ``uid``), ``rss`` and ``pss`` (resident and proportional set size, bytes),
    ``cpu_user`` and ``cpu_system`` (CPU time spent in user and kernel mode, seconds).
    """

    pid: int
    tgid: int
    ppid: int
    depth: int
    name: str
    state: str
    starttime: int
    uid: int
    tracer_pid: int
    reason: str | None
    signals: SignalState
    threads: tuple[ThreadRecord, ...]
    cmdline: tuple[str, ...] | None = None
    user: str | None = None
    rss: int | None = None
    pss: int | None = None
    cpu_user: float | None = None
    cpu_system: float | None = None

    @property
    def freezable(self) -> bool:
        """Whether a freezer may stop this process."""
        return self.reason is None

    @property
    def identity(self) -> tuple[int, int]:
        """``(pid, starttime)``: names this process for good."""
        return (self.pid, self.starttime)

    def warnings(self) -> list[tuple[str, str]]:
        """``(kind, detail)`` of each warning about this process (see :data:`WARNING_KINDS`)."""
        found: list[tuple[str, str]] = []
        if self.reason in ("zombie", "kernel thread"):
            return found
        for sig in ("SIGCONT", "SIGCHLD"):
            if sig in self.signals.caught:
                found.append((f"catches {sig}", f"has a {sig} handler"))
        traced = [t.tid for t in self.threads if t.state == "t"]
        if self.tracer_pid or traced:
            by = f"by PID {self.tracer_pid}" if self.tracer_pid else "in ptrace-stop"
            found.append(("traced", f"is traced {by}"))
        stuck = [t.tid for t in self.threads if t.state == "D"]
        if stuck:
            found.append(("uninterruptible", f"task(s) {_ids(stuck)} in D"))
        if self.name in _RELAYS:
            found.append(
                (
                    "job-control relay",
                    "stops itself when its child stops: the signal backend freezes it before "
                    "its children and resumes it after them (inside the tree), or resumes it "
                    "after the thaw (as the tree's parent); the cgroup backend is invisible to it",
                )
            )
        return found

    def to_dict(self) -> dict[str, Any]:
        """This record in the JSON layout of :mod:`treeguard._snapshot` (schema 1)."""
        data = asdict(self)
        data["freezable"] = self.freezable
        data["signals"] = {k: list(v) for k, v in data["signals"].items()}
        data["threads"] = [
            {**t, "pending": list(t["pending"]), "blocked": list(t["blocked"])}
            for t in data["threads"]
        ]
        data["cmdline"] = None if self.cmdline is None else list(self.cmdline)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProcessRecord:
        """The record :meth:`to_dict` wrote; members added to schema 1 later may be absent.

        :raises InvalidArgumentError: if a member is missing, of the wrong type or out of the
            range the shipped JSON Schema allows (members it does not name are ignored).
        """
        check(data, "snapshot-1", what="process record", ref="#/$defs/process", open_objects=True)
        return cls.from_checked(data)

    @classmethod
    def from_checked(cls, data: Mapping[str, Any]) -> ProcessRecord:
        """:meth:`from_dict` of a record the schema was checked on already."""
        try:
            sig = data["signals"]
            cmdline = data.get("cmdline")
            return cls(
                **{k: _int(data[k]) for k in ("pid", "tgid", "ppid", "depth", "starttime")},
                uid=_int(data["uid"]),
                tracer_pid=_int(data["tracer_pid"]),
                name=_str(data["name"]),
                state=_str(data["state"]),
                reason=None if data["reason"] is None else _str(data["reason"]),
                signals=SignalState(**{k: _names(sig[k]) for k in _SIGNAL_KEYS}),
                threads=tuple(
                    ThreadRecord(
                        _int(t["tid"]), _str(t["state"]), _names(t["pending"]), _names(t["blocked"])
                    )
                    for t in data["threads"]
                ),
                cmdline=None if cmdline is None else _names(cmdline),
                user=None if data.get("user") is None else _str(data["user"]),
                rss=_opt_int(data.get("rss")),
                pss=_opt_int(data.get("pss")),
                cpu_user=_opt_float(data.get("cpu_user")),
                cpu_system=_opt_float(data.get("cpu_system")),
            )
        except (KeyError, TypeError, ValueError) as err:
            problem = f"missing member {err}" if isinstance(err, KeyError) else str(err)
            raise InvalidArgumentError("snapshot", f"process record: {problem}") from None


_SIGNAL_KEYS = ("pending", "shared_pending", "blocked", "ignored", "caught")


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, not {value!r}")
    return value


def _opt_int(value: object) -> int | None:
    return None if value is None else _int(value)


def _opt_float(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, not {value!r}")
    return float(value)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, not {value!r}")
    return value


def _names(values: object) -> tuple[str, ...]:
    if not isinstance(values, list):
        raise TypeError(f"expected a list of strings, not {values!r}")
    return tuple(_str(v) for v in values)


def _ids(values: Iterable[int]) -> str:
    return ",".join(map(str, values))
