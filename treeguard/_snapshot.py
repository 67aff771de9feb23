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

Description: each record also says what the process is (command line, user, memory, CPU
time), read through psutil after the walk (see :mod:`treeguard._describe`); a value that
could not be read is ``None``.

JSON (``TreeSnapshot.to_json()``, ``"schema": 1``; members are only ever added, and
:meth:`TreeSnapshot.from_json` reads documents written before they were): the layout is the
JSON Schema ``treeguard/schemas/snapshot-1.schema.json`` shipped in the package, documented
on the formats page of the documentation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, final

from ._jsonshape import check
from ._records import (
    REASONS,
    WARNING_KINDS,
    ProcessRecord,
    SignalState,
    ThreadRecord,
    _ids,
    _int,
)
from ._signames import decode_sigmask, printable, signal_name
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


#: Longest command line :meth:`TreeSnapshot.render` shows (the JSON has all of it).
CMDLINE_SHOWN = 100


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _shown(cmdline: tuple[str, ...]) -> str:
    """The first line of a command line, at most :data:`CMDLINE_SHOWN` characters, safe to
    print (an argument may be a whole script, ``python -c``, ``sh -c``)."""
    first, newline, _ = " ".join(cmdline).partition("\n")
    # Cut before escaping: a command line may be megabytes long.
    shown = printable(first[: CMDLINE_SHOWN + 1])
    if len(shown) > CMDLINE_SHOWN:
        return shown[: CMDLINE_SHOWN - 3] + "..."
    return shown + "..." if newline else shown


def _pairs(values: object) -> tuple[tuple[int, int], ...]:
    if not isinstance(values, list):
        raise TypeError(f"expected a list of [pid, starttime], not {values!r}")
    return tuple((_int(pid), _int(starttime)) for pid, starttime in values)


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

    @property
    def memory(self) -> dict[str, Any]:
        """The tree's memory in bytes, summed over the processes whose value was read:
        ``rss`` (a page several processes share counts once for each), ``pss`` (a shared
        page divided among its sharers: a page shared only inside the tree counts once);
        either ``None`` when no process's value was read. ``unread`` lists the processes
        with user memory (not zombies or kernel threads) left out of a sum: their RSS, or
        their PSS when PSS was read, could not be read.

        When no memory was read at all (a snapshot taken with ``describe=False``, or one
        whose processes all vanished before they were described) there is no sum to leave
        anything out of: ``rss`` and ``pss`` are ``None`` and ``unread`` is empty."""
        live = [r for r in self.records if r.reason not in ("zombie", "kernel thread")]
        rss = [r.rss for r in live if r.rss is not None]
        pss = [r.pss for r in live if r.pss is not None]
        unread = [r.pid for r in live if r.rss is None or (pss and r.pss is None)]
        return {
            "rss": sum(rss) if rss else None,
            "pss": sum(pss) if pss else None,
            "unread": unread if rss or pss else [],
        }

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
            "memory": self.memory,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TreeSnapshot:
        """The snapshot :meth:`to_dict` wrote, by this treeguard or an older one: members
        added to schema 1 since read as ``None`` when absent, members this treeguard does
        not know are ignored, and derived members (``freezable``, ``warnings``,
        ``memory``) are computed again.

        Everything the shipped JSON Schema refuses is refused (types, ranges, names of
        states and signals, finite numbers), except members it does not name.

        :raises InvalidArgumentError: if ``data`` is not a snapshot of schema 1 (the message
            names the first wrong member).
        """
        if isinstance(data, Mapping) and data.get("schema", SCHEMA) != SCHEMA:
            problem = f"schema {data['schema']!r} (this treeguard reads {SCHEMA})"
            raise InvalidArgumentError("snapshot", f"not a snapshot: {problem}")
        check(data, "snapshot-1", what="snapshot", open_objects=True)
        try:
            root, include_root, consistent = data["root"], data["include_root"], data["consistent"]
            if not (isinstance(include_root, bool) and isinstance(consistent, bool)):
                raise TypeError("include_root and consistent are true or false")
            return cls(
                root=None if root is None else _int(root),
                include_root=include_root,
                records=tuple(ProcessRecord.from_checked(p) for p in data["processes"]),
                consistent=consistent,
                consistency=str(data["consistency"]),
                appeared=_pairs(data["difference"]["appeared"]),
                vanished=_pairs(data["difference"]["vanished"]),
                taken_at=float(data["taken_at"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, InvalidArgumentError):
                raise
            problem = f"missing member {err}" if isinstance(err, KeyError) else str(err)
            raise InvalidArgumentError("snapshot", f"not a snapshot: {problem}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> TreeSnapshot:
        """The snapshot :meth:`to_json` wrote (see :meth:`from_dict`).

        :raises InvalidArgumentError: if ``text`` is not JSON or not a snapshot of schema 1.
        """
        try:
            data = json.loads(text)
        except (ValueError, TypeError, RecursionError) as err:  # nesting deeper than the stack
            raise InvalidArgumentError("snapshot", f"not JSON: {err}") from None
        if not isinstance(data, dict):
            raise InvalidArgumentError("snapshot", "a snapshot is a JSON object")
        return cls.from_dict(data)

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
            if rec.rss is not None:
                line += f", RSS {_size(rec.rss)}"
            if rec.reason:
                line += f"  not freezable: {rec.reason}"
            if rec.cmdline:
                line += f"  cmd: {_shown(rec.cmdline)}"
            lines.append(line)
        for w in self.warnings:
            lines.append(f"warning: PID {w['pid']} {w['detail']} ({w['kind']})")
        tasks = sum(len(r.threads) for r in records)
        summary = f"{_count(len(records), 'process', 'processes')}, {_count(tasks, 'task')}"
        memory = self.memory
        for key in ("rss", "pss"):
            if memory[key] is not None:
                summary += f", {key.upper()} {_size(memory[key])}"
        if memory["unread"]:
            summary += f" ({_count(len(memory['unread']), 'process', 'processes')} unread)"
        summary += "; "
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
