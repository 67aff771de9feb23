"""The state file of ``treeguard pause`` / ``treeguard resume``: written and read safely.

A state file names processes to resume, so whoever can write it could make ``resume``
signal processes of their choosing. It is therefore created exclusively (``O_CREAT |
O_EXCL``: never an existing file, never through a symlink, open(2)) with mode 0600, and
read only when it is a regular file, not a symlink (``O_NOFOLLOW``), owned by the caller and
writable by nobody else. The checks are made on the opened descriptor (``fstat``), and the
descriptor is compared with the path's ``lstat``, so a file swapped in between is noticed.
The token it holds is checked again by :func:`treeguard.thaw`, which never signals a
process whose starttime differs from the record.

The pause journal
-----------------

``treeguard pause`` holds an ``flock(2)`` on the state file from its creation to its own end
(its exit releases it, SIGKILL too); ``resume`` refuses a file whose pause still runs.

``treeguard pause`` writes the state file as a *journal* (format ``treeguard-pause``,
version 2), one JSON line per entry, each appended BEFORE what it records is done, so that
a pause cut short at any point (even by SIGKILL) leaves a file from which ``resume`` undoes
it::

    {"format": "treeguard-pause", "version": 2}   the header, before anything is stopped
    ["stop", pid, starttime, inode]                before that process is sent SIGSTOP
    ["watch", pid, starttime]                      before a process below it is stopped:
                                                   a parent outside the tree, running,
                                                   resumed if it stops itself (a relay)
    ["cgroup", version, path, inode]               before that cgroup's freeze is written
    ["token", {...}]                               the pause completed: the whole token
    ["helper", pid, starttime, inode, ends]        the watchdog helper keeping the lease,
                                                   which thaws by ``ends`` (Unix time)

``inode`` is the pidfs inode of the process (0 where the kernel has no pidfs), ``starttime``
the fallback identity (see :mod:`treeguard._thaw`). Each entry is one ``write(2)`` of a
whole line: once it returns, the line is in the page cache and survives the writer's
death (only a crash of the machine, which ends the processes too, could lose it); the
header and the token are also flushed to disk. A last line without its newline was cut
short and is ignored. A state file of version 1 (one line: the token, as written by
earlier versions) is still read.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import StateFileError, TokenError

if TYPE_CHECKING:
    from ._backends import Journal
    from ._token import Token

__all__ = [
    "FORMAT",
    "MAX_SIZE",
    "PauseState",
    "StateJournal",
    "create_exclusive",
    "parse_state",
    "read_checked",
    "remove_checked",
    "write_all",
]

#: A state file larger than this is not one of ours (a journal of every PID that Linux
#: allows, twice over, stays below it).
MAX_SIZE = 1 << 28
FORMAT = "treeguard-pause"
VERSION = 2
#: Linux's PID_MAX_LIMIT; starttime is an unsigned long long (proc(5)); an inode a u64.
_PID_MAX = 4 * 1024 * 1024
_U64_MAX = 2**64 - 1

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted at the path must not hang (it is refused after fstat).
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def create_exclusive(path: str) -> int:
    """Create ``path`` (mode 0600) and return a descriptor open for writing.

    :raises StateFileError: if ``path`` exists (a file, a symlink, anything) or cannot be
        created.
    """
    try:
        fd = os.open(path, _CREATE, 0o600)
    except FileExistsError:
        raise StateFileError(path, "it exists already (pause never overwrites a file)") from None
    except OSError as err:
        raise StateFileError(path, f"cannot create it: {err.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask did, never more than owner read/write
        # Held until the pause is over (its descriptor closed, by its exit too): a resume
        # meanwhile would thaw only what is journaled so far and remove the file the pause
        # goes on journaling to (see read_checked). A reader holds it only while it reads.
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        os.unlink(path)  # created just now, exclusively: ours
        raise
    return fd


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` and flush it to disk."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _check(path: str, info: os.stat_result) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise StateFileError(path, "it is a symbolic link")
    if not stat.S_ISREG(info.st_mode):
        raise StateFileError(path, "it is not a regular file")
    if info.st_uid != os.geteuid():
        raise StateFileError(path, f"it is owned by UID {info.st_uid}, not by you")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateFileError(
            path, f"it is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
        )


def read_checked(path: str, *, settled: bool = False) -> tuple[bytes, os.stat_result]:
    """Read a state file after checking it is safe to trust.

    :param settled: refuse a state file whose pause still runs (it holds the file's lock):
        for ``resume``, which must read all that the pause stopped.
    :returns: its content and its ``fstat`` (for :func:`remove_checked`).
    :raises StateFileError: if it is missing, a symlink, not a regular file, not owned by
        the caller, writable by group or others, swapped while opening, or too large; or,
        if ``settled``, if its pause is still running.
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        raise StateFileError(path, "it does not exist") from None
    except OSError as err:
        raise StateFileError(path, f"cannot look at it: {err.strerror}") from None
    _check(path, before)
    try:
        fd = os.open(path, _READ)
    except OSError as err:
        # ELOOP: a symlink was put there after the lstat.
        raise StateFileError(path, f"cannot open it safely: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        _check(path, info)
        if (info.st_dev, info.st_ino) != (before.st_dev, before.st_ino):
            raise StateFileError(path, "it was replaced while being opened")
        if info.st_size > MAX_SIZE:
            raise StateFileError(path, f"it is larger than {MAX_SIZE} bytes")
        if settled:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateFileError(
                    path, "a pause is still writing it; resume once that pause has ended"
                ) from None
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_SIZE:
                raise StateFileError(path, f"it is larger than {MAX_SIZE} bytes")
        return b"".join(chunks), info
    finally:
        os.close(fd)


def remove_checked(path: str, info: os.stat_result) -> None:
    """Remove ``path`` if it is still the file described by ``info``; else leave it."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino):
        os.unlink(path)


# -- the pause journal ------------------------------------------------------------------------

Identity = tuple[int, int, int]


class StateJournal:
    """A :class:`~treeguard._backends.Journal` that appends each process (and cgroup) to
    the state file before it is stopped (frozen), then tells ``inner`` (the watchdog's
    journal) the same. Writes the header when made.

    :param fd: the state file, just created by :func:`create_exclusive`.
    :param inner: the journal of the watchdog that also covers this freeze, if any.
    """

    __slots__ = ("_fd", "inner")

    def __init__(self, fd: int, inner: Journal | None = None) -> None:
        self._fd = fd
        self.inner = inner
        write_all(fd, _line({"format": FORMAT, "version": VERSION}))

    def _append(self, entry: list[Any]) -> None:
        # One write(2) of a whole line (os.write may write less to a full disk: go on).
        view = memoryview(_line(entry))
        while view:
            view = view[os.write(self._fd, view) :]

    def stopping(self, pid: int, starttime: int, inode: int = 0) -> None:
        self._append(["stop", pid, starttime, inode])
        if self.inner is not None:
            self.inner.stopping(pid, starttime, inode)

    def watching(self, pid: int, starttime: int) -> None:
        self._append(["watch", pid, starttime])
        if self.inner is not None:
            self.inner.watching(pid, starttime)

    def freezing_cgroup(self, version: int, path: str, inode: int) -> None:
        self._append(["cgroup", version, path, inode])
        if self.inner is not None:
            self.inner.freezing_cgroup(version, path, inode)

    def check(self) -> None:
        if self.inner is not None:
            self.inner.check()

    def released(self) -> None:
        # The freeze was undone (a failed pause): the caller removes the file.
        if self.inner is not None:
            self.inner.released()

    def completed(self, token: Token) -> None:
        """The pause completed: record the token and flush the file to disk."""
        write_all(self._fd, _line(["token", json.loads(token.to_json())]))

    def helper(self, identity: Identity, ends: float) -> None:
        """Record the watchdog helper that keeps the lease, and the Unix time by which it
        thaws the tree, before it is handed the tree."""
        write_all(self._fd, _line(["helper", *identity, round(ends, 3)]))


def _line(entry: object) -> bytes:
    return json.dumps(entry, separators=(",", ":"), allow_nan=False).encode() + b"\n"


@dataclass
class PauseState:
    """What a state file says to undo: a token (version 1, or a pause that completed), the
    processes and cgroups journaled, the lease's helper."""

    version: int
    token: Token | None = None
    stopped: list[Identity] = field(default_factory=list)
    #: Relays outside the tree, ``(pid, starttime)``: resumed after it if they stopped.
    watchers: list[tuple[int, int]] = field(default_factory=list)
    cgroups: list[tuple[int, str, int]] = field(default_factory=list)
    helper: Identity | None = None
    #: The Unix time by which the lease's helper thaws the tree (None: not recorded).
    lease_ends: float | None = None


def parse_state(data: bytes) -> PauseState:
    """Read a state file's content: a journal (version 2) or a bare token (version 1).

    :raises TokenError: if it is neither, or any complete entry is malformed.
    """
    from ._token import Token

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenError("the state file is not UTF-8 text") from None
    first, _, rest = text.partition("\n")
    try:
        head = json.loads(first)
    except ValueError:
        head = None
    if not (isinstance(head, dict) and head.get("format") == FORMAT):
        return PauseState(version=1, token=Token.from_json(text))  # checks every field
    if set(head) != {"format", "version"} or head["version"] != VERSION:
        raise TokenError(f"state file header {first!r}: this treeguard reads version {VERSION}")
    state = PauseState(version=VERSION)
    lines = rest.split("\n")
    # A last line without its newline was being written when the pause was cut short:
    # nothing was done after it, so it is dropped.
    for number, line in enumerate(lines[:-1], start=2):
        try:
            _entry(state, json.loads(line, parse_constant=_no_constant))
        except (ValueError, TypeError) as err:
            raise TokenError(f"state file line {number}: {err}") from None
    return state


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _int(value: object, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an int in {low}..{high}, not {value!r}")
    return value


def _identity(values: list[Any]) -> Identity:
    if len(values) != 3:
        raise ValueError("a process is [pid, starttime, inode]")
    pid, starttime, inode = values
    return (
        _int(pid, 1, _PID_MAX, "pid"),
        _int(starttime, 0, _U64_MAX, "starttime"),
        _int(inode, 0, _U64_MAX, "inode"),
    )


def _entry(state: PauseState, entry: object) -> None:
    from ._backends import validate_described
    from ._token import Token

    if not isinstance(entry, list) or not entry or not isinstance(entry[0], str):
        raise ValueError(f"not a journal entry: {entry!r}")
    kind, values = entry[0], entry[1:]
    if kind == "stop":
        state.stopped.append(_identity(values))
    elif kind == "watch":
        pid, starttime, _ = _identity([*values, 0])
        state.watchers.append((pid, starttime))
    elif kind == "helper":  # [pid, starttime, inode] and, since it is recorded, the end
        state.helper = _identity(values[:3])
        if len(values) == 4:
            ends = values[3]
            if isinstance(ends, bool) or not isinstance(ends, (int, float)) or ends < 0:
                raise ValueError(f"a lease ends at a Unix time, not {ends!r}")
            state.lease_ends = float(ends)
        elif len(values) != 3:
            raise ValueError("a helper is [pid, starttime, inode, ends]")
    elif kind == "cgroup":
        if len(values) != 3:
            raise ValueError("a cgroup is [version, path, inode]")
        version, path, inode = values
        # The rule of what a thawable cgroup is has its home with the backends.
        payload = {"version": version, "path": path, "inode": inode, "was_frozen": False}
        validate_described("cgroup", payload)
        state.cgroups.append((version, path, inode))
    elif kind == "token" and len(values) == 1 and isinstance(values[0], dict):
        state.token = Token.from_json(json.dumps(values[0]))
    else:
        raise ValueError(f"unknown journal entry {entry!r}")
