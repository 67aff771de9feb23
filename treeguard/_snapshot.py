"""Snapshots of a process tree with its signal state: what a freeze would find, or found.

A :class:`TreeSnapshot` lists the processes below a root in depth-first pre-order (the order
the kernel's own checkpoint code records a tree in), one :class:`ProcessRecord` each, with
every thread and the signal masks of ``/proc/PID/status`` and ``/proc/PID/task/TID/status``
decoded to names (proc(5): ``SigPnd``, ``ShdPnd``, ``SigBlk``, ``SigIgn``, ``SigCgt`` are
hexadecimal masks in which bit N-1 stands for signal N).

Consistency: a snapshot of a tree frozen by a guard (:meth:`ProcessesGuard.snapshot`) is
consistent when every process the guard stopped is still there and stopped. A snapshot of
a running tree is enumerated twice, as the kernel's checkpoint code counts twice; when the
two passes disagree the snapshot is marked inconsistent and :attr:`TreeSnapshot.difference`
says which processes appeared or vanished in between.

JSON schema (``TreeSnapshot.to_json()``, ``"schema": 1``; fields are only ever added)::

    {
      "schema": 1,
      "root": int | null,            # the PID the walk started at (null: from a guard)
      "include_root": bool,
      "taken_at": float,             # seconds since the epoch
      "consistent": bool,
      "consistency": str,            # "frozen", "two passes agree", "changed", "not frozen"
      "difference": {"appeared": [[pid, starttime], ...], "vanished": [[pid, starttime], ...]},
      "processes": [                 # depth-first pre-order, parents first
        {
          "pid": int, "tgid": int, "ppid": int, "depth": int,   # depth 0: a top record
          "name": str, "state": str, "starttime": int,          # starttime: clock ticks
          "uid": int,                                          # effective UID
          "tracer_pid": int,                                   # 0: not traced
          "freezable": bool, "reason": str | null,             # why not, see REASONS
          "signals": {"pending": [str], "shared_pending": [str], "blocked": [str],
                      "ignored": [str], "caught": [str]},
          "threads": [{"tid": int, "state": str, "pending": [str], "blocked": [str]}]
        }
      ],
      "warnings": [{"pid": int, "kind": str, "detail": str}]  # kind: see WARNING_KINDS
    }

Signal names are those of :mod:`signal` (``SIGUSR1``), real-time signals ``SIGRTMIN+k``, and
numbers without a name (32 and 33, which glibc reserves) ``SIG32``.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, final

from .errors import InvalidArgumentError

__all__ = [
    "REASONS",
    "SCHEMA",
    "WARNING_KINDS",
    "ProcessRecord",
    "SignalState",
    "ThreadRecord",
    "TreeSnapshot",
    "decode_sigmask",
    "printable",
    "signal_name",
]

#: Version of the JSON layout of :meth:`TreeSnapshot.to_json`.
SCHEMA = 1

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

_RT_MIN = int(signal.SIGRTMIN)
_RT_MAX = int(signal.SIGRTMAX)


def printable(name: str) -> str:
    """``name`` safe to print to a terminal: every character that is not printable (control
    characters such as ESC, which would start a terminal escape sequence; line breaks;
    other non-printables of Unicode) becomes its Python escape (``\\x1b``, ``\\n``,
    ``\\u200b``, ``\\U000e0001``), as :func:`ascii` writes it.

    A command name is chosen by the process itself (``/proc/PID/comm`` is writable by it,
    proc(5)): printed raw, it could move the cursor, rewrite the screen or set the title.
    """
    if name.isprintable():
        return name  # the common case, one pass in C
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in name)


def signal_name(number: int) -> str:
    """The name of signal ``number``: ``SIGUSR1``, ``SIGRTMIN+3``, or ``SIG32``."""
    if _RT_MIN <= number <= _RT_MAX:
        return "SIGRTMIN" if number == _RT_MIN else f"SIGRTMIN+{number - _RT_MIN}"
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def decode_sigmask(mask: str | int) -> tuple[str, ...]:
    """The signals set in a ``/proc/PID/status`` mask (hexadecimal text or an int).

    Bit N-1 stands for signal N (proc(5)).

    :raises InvalidArgumentError: if ``mask`` is not a hexadecimal number.
    """
    if isinstance(mask, str):
        try:
            value = int(mask, 16)
        except ValueError:
            raise InvalidArgumentError("mask", f"not a hexadecimal mask: {mask!r}") from None
    else:
        value = mask
    if value < 0:
        raise InvalidArgumentError("mask", f"a mask is not negative: {value}")
    names: list[str] = []
    number = 1
    while value:
        if value & 1:
            names.append(signal_name(number))
        value >>= 1
        number += 1
    return tuple(names)


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
    :data:`REASONS`), ``None`` when it can."""

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
        return data


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _ids(values: Iterable[int]) -> str:
    return ",".join(map(str, values))


@final
@dataclass(frozen=True)
class TreeSnapshot:
    """The processes below a root, depth-first pre-order, with threads and signal state.

    Iterate over it for the :class:`ProcessRecord` of each process; :meth:`render` draws
    it as a tree; :meth:`to_json` writes the documented schema (see :mod:`treeguard._snapshot`).
    """

    root: int | None
    include_root: bool
    records: tuple[ProcessRecord, ...]
    consistent: bool
    consistency: str
    appeared: tuple[tuple[int, int], ...] = ()
    vanished: tuple[tuple[int, int], ...] = ()
    taken_at: float = field(default_factory=time.time)

    def __iter__(self) -> Iterator[ProcessRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, pid: int) -> ProcessRecord:
        """The record of ``pid``.

        :raises KeyError: if ``pid`` is not in this snapshot.
        """
        for record in self.records:
            if record.pid == pid:
                return record
        raise KeyError(pid)

    @property
    def pids(self) -> tuple[int, ...]:
        """Every process of the snapshot, in pre-order."""
        return tuple(r.pid for r in self.records)

    @property
    def difference(self) -> dict[str, list[list[int]]]:
        """What changed between the two passes: ``appeared`` and ``vanished`` (pid,
        starttime) pairs (empty when consistent)."""
        return {
            "appeared": [list(i) for i in self.appeared],
            "vanished": [list(i) for i in self.vanished],
        }

    @property
    def warnings(self) -> list[dict[str, Any]]:
        """``{"pid", "kind", "detail"}`` of every warning, in pre-order."""
        return [
            {"pid": r.pid, "kind": kind, "detail": detail}
            for r in self.records
            for kind, detail in r.warnings()
        ]

    def to_dict(self) -> dict[str, Any]:
        """The snapshot in the JSON layout of schema 1 (plain dicts and lists)."""
        return {
            "schema": SCHEMA,
            "root": self.root,
            "include_root": self.include_root,
            "taken_at": self.taken_at,
            "consistent": self.consistent,
            "consistency": self.consistency,
            "difference": self.difference,
            "processes": [r.to_dict() for r in self.records],
            "warnings": self.warnings,
        }

    def to_json(self, *, indent: int | None = None) -> str:
        """The snapshot as JSON (schema 1, documented in :mod:`treeguard._snapshot`)."""
        return json.dumps(self.to_dict(), indent=indent)

    def unnoticed_by(self) -> dict[str, str]:
        """The backends whose freeze nothing in this tree would notice, each with its
        condition. The signal backend is there only if no process has a warning that says
        it would notice (a SIGCONT or SIGCHLD handler, a job-control relay, a tracer); ptrace
        only if no process is traced already (and this process may trace, which the kernel
        decides per task); the cgroup freezer always, for a tree alone in its cgroup."""
        kinds = {w["kind"] for w in self.warnings}
        found: dict[str, str] = {"cgroup": "when the tree is alone in a cgroup of its own"}
        if "traced" not in kinds:
            found["ptrace"] = "where this process may trace every process of it"
        if not kinds & {"catches SIGCONT", "catches SIGCHLD", "job-control relay", "traced"}:
            found["signal"] = "no process of it handles SIGCONT or SIGCHLD or relays a stop"
        return found

    def render(self) -> str:
        """A pstree-like drawing: one line per process with its state and thread count,
        then one line per warning and the consistency."""
        lines: list[str] = []
        last_at_depth: list[bool] = []
        records = self.records
        for i, rec in enumerate(records):
            # Is this the last sibling? Look ahead for the next record at depth <= its own.
            last = True
            for nxt in records[i + 1 :]:
                if nxt.depth <= rec.depth:
                    last = nxt.depth < rec.depth
                    break
            del last_at_depth[rec.depth :]
            prefix = "".join("   " if done else "│  " for done in last_at_depth[1:])
            if rec.depth > 0:
                prefix += "└─ " if last else "├─ "
            last_at_depth.append(last)
            n = len(rec.threads)
            name = printable(rec.name)
            line = f"{prefix}{name} [{rec.pid}] {rec.state}, {_count(n, 'thread')}"
            states = sorted({t.state for t in rec.threads} - {rec.state})
            if states:
                line += f" (also {''.join(states)})"
            if rec.reason:
                line += f"  not freezable: {rec.reason}"
            lines.append(line)
        for w in self.warnings:
            lines.append(f"warning: PID {w['pid']} {w['detail']} ({w['kind']})")
        tasks = sum(len(r.threads) for r in records)
        summary = f"{_count(len(records), 'process', 'processes')}, {_count(tasks, 'task')}; "
        if self.consistent:
            summary += f"consistent ({self.consistency})"
        else:
            summary += f"INCONSISTENT ({self.consistency})"
            if self.appeared:
                summary += f"; appeared: {_ids(p for p, _ in self.appeared)}"
            if self.vanished:
                summary += f"; vanished: {_ids(p for p, _ in self.vanished)}"
        lines.append(summary)
        return "\n".join(lines)
