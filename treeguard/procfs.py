"""Reading and parsing /proc. Pure: nothing here signals or changes any process.

Every reader returns ``None`` when the process (or thread) is gone, because a process can
exit between any two reads; callers treat that as "exited", never as an error. Files are
read with one ``os.open``/``os.read``/``os.close`` each: for a tree of a thousand processes
the syscall count per process, not the parsing, decides the cost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ProcfsParseError

__all__ = [
    "HELPER_COMM",
    "PF_EXITING",
    "PF_KTHREAD",
    "ProcFS",
    "STOPPED_STATES",
    "Stat",
    "parse_stat",
    "parse_stat_brief",
    "parse_state",
]

#: ``/proc/PID/stat`` states in which a task cannot run: stopped, traced-stopped.
STOPPED_STATES = frozenset("Tt")
#: States of a task that is gone or going: zombie, dead (``X``, ``x`` on old kernels).
DEAD_STATES = frozenset("ZXx")
#: ``flags`` bits (include/linux/sched.h): a kernel thread; a task that has begun to exit.
PF_KTHREAD = 0x00200000
PF_EXITING = 0x00000004
#: The command name (comm) of every treeguard helper process (the watchdog): no guard, of
#: this process or another, ever stops a process of that name.
HELPER_COMM = b"treeguard-wd"

_O_FLAGS = os.O_RDONLY | os.O_CLOEXEC
# seq_file's first buffer is one page (fs/seq_file.c); a record that does not fit is held
# back for the next read, so a short read means EOF only when it ends well before a page.
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_RECORD_SLACK = 64
# Errors that mean "this process or thread is gone" when reading its /proc files.
_GONE = (FileNotFoundError, ProcessLookupError)
# ProcFS.has_children_files() of the system's /proc, once known.
_CHILDREN_FILES: dict[str, bool] = {}


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of ``/proc/PID/stat`` (or ``/proc/PID/task/TID/stat``) treeguard uses.

    ``comm`` is the raw bytes between the parentheses; :attr:`name` is its decoded form.
    ``starttime`` (clock ticks after boot) together with ``pid`` names a process for good:
    a recycled PID gets a later starttime.
    """

    pid: int
    comm: bytes
    state: str
    ppid: int
    pgrp: int
    session: int
    flags: int
    num_threads: int
    starttime: int

    @property
    def name(self) -> str:
        """``comm`` decoded as UTF-8; undecodable bytes appear as ``\\xNN``."""
        return self.comm.decode("utf-8", "backslashreplace")

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def is_dead(self) -> bool:
        """Whether the process never runs again: a zombie (or being reaped) with no other
        thread. A leader that exited alone shows ``Z`` while its other threads run."""
        return dead(self.state, self.num_threads)


def dead(state: str, num_threads: int) -> bool:
    """:attr:`Stat.is_dead` of a stat line read in brief (its state and thread count)."""
    return state in DEAD_STATES and num_threads <= 1


def _tail(data: bytes) -> list[bytes] | None:
    """The fields after the command name of a stat line, split at spaces (state first,
    the 21st the rest of the line), if the fast paths may take the line: bytes, ``PID (``
    ahead, a space after the last ``)``, more after starttime, and every field either fast
    path reads checked as the full checks of :func:`parse_stat` check it, so that both
    take only lines those accept. ``None`` otherwise: the full checks say what is wrong."""
    if type(data) is not bytes:
        return None  # text, a bytearray or a stranger: the full checks (or their error)
    space = data.find(b" ")
    close = data.rfind(b")")
    if 0 < space < close - 1 and data[space + 1] == 0x28 and data[:space].isdigit():
        f = data[close + 1 :].split(b" ", 21)
        if (
            len(f) == 22
            and not f[0]
            and len(f[1]) == 1
            and f[1].isalpha()
            and _signed(f[2])
            and _signed(f[3])
            and _signed(f[4])
            and f[7].isdigit()
            and f[18].isdigit()
            and f[20].isdigit()
        ):
            del f[0]
            return f
    return None


def _signed(field: bytes) -> bool:
    """Whether ``field`` is an integer as the full checks accept one where signed."""
    return (field[1:] if field[:1] == b"-" else field).isdigit()


def _number(field: bytes, what: str, data: bytes, signed: bool = False) -> int:
    # bytes.isdigit() is ASCII-only; int() alone would accept "+1", " 1" and "1_0".
    digits = field[1:] if signed and field[:1] == b"-" else field
    if not digits.isdigit():
        raise ProcfsParseError(f"{what} is not an integer", data)
    return int(field)


def parse_stat(data: bytes | str) -> Stat:
    """Parse one ``/proc/PID/stat`` line.

    The command name may hold any byte but NUL, ``)`` and newlines included, so it is
    delimited by the first ``" ("`` after the PID and the LAST ``)`` of the line (proc(5)).

    :param data: the file's content, as bytes or as text (text is encoded back with
        ``surrogateescape``, so bytes decoded that way round-trip).
    :raises ProcfsParseError: if the data is not a well-formed stat line.
    """
    if type(data) is bytes:  # (as _tail checks: this tells the type checker)
        # The fast path (the freezer parses a stat per process): one split, the fields
        # used checked as the full checks below check them (a line it leaves is refused
        # there, with the reason).
        f = _tail(data)
        if f is not None:
            space = data.find(b" ")
            return Stat(
                int(data[:space]),
                data[space + 2 : data.rfind(b")")],
                f[0].decode("ascii"),
                int(f[1]),
                int(f[2]),
                int(f[3]),
                int(f[6]),
                int(f[17]),
                int(f[19]),
            )
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as err:
            raise ProcfsParseError("text that is not encodable", data) from err
    elif isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
    else:
        raise ProcfsParseError(f"expected bytes or str, got {type(data).__name__}", None)
    space = raw.find(b" ")
    close = raw.rfind(b")")
    if space <= 0 or raw[space + 1 : space + 2] != b"(" or close < space + 2:
        raise ProcfsParseError("no 'PID (comm)' prefix", raw)
    rest = raw[close + 1 :]
    ended = rest.endswith(b"\n")
    if ended:
        rest = rest[:-1]
    if rest[:1] != b" ":
        raise ProcfsParseError("no space after the command name", raw)
    # After ')' come: state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    # cmajflt utime stime cutime cstime priority nice num_threads itrealvalue starttime ...
    fields = rest[1:].split(b" ", 20)
    if len(fields) < 20:
        raise ProcfsParseError(f"only {len(fields)} fields after the command name", raw)
    if len(fields) == 20 and not ended:
        # The kernel writes more fields after starttime, and a newline: a line that stops
        # at starttime was cut short, maybe inside it (a short read).
        raise ProcfsParseError("the line ends at starttime without a newline (cut short?)", raw)
    state = fields[0]
    if len(state) != 1 or not state.isalpha():
        raise ProcfsParseError("the state is not one letter", raw)
    return Stat(
        pid=_number(raw[:space], "pid", raw),
        comm=raw[space + 2 : close],
        state=state.decode("ascii"),
        # A task being reaped shows -1 for its process group and session.
        ppid=_number(fields[1], "ppid", raw, signed=True),
        pgrp=_number(fields[2], "pgrp", raw, signed=True),
        session=_number(fields[3], "session", raw, signed=True),
        flags=_number(fields[6], "flags", raw),
        num_threads=_number(fields[17], "num_threads", raw),
        starttime=_number(fields[19], "starttime", raw),
    )


def parse_stat_brief(data: bytes) -> tuple[str, int, int]:
    """``(state, num_threads, starttime)`` of a stat line: what the freezer's verification
    needs, without building a :class:`Stat`.

    :raises ProcfsParseError: if the data is not a well-formed stat line.
    """
    f = _tail(data)
    if f is None:
        st = parse_stat(data)  # the authority on what is wrong with the line
        return st.state, st.num_threads, st.starttime
    return f[0].decode("ascii"), int(f[17]), int(f[19])


#: The most bytes of a command name a stat line holds (fs/proc/array.c writes at most 63,
#: a kernel thread's full name; a user task's is at most 15).
_COMM_MAX = 64


def parse_state(data: bytes) -> str:
    """The state letter of a stat line, all the proof needs of a thread.

    Only the state field is checked: a whole line (one ``read`` returns the whole line,
    newline included) whose last ``)`` ends the command name, then `` X `` with ``X`` a
    letter. Anything else gets the full checks of :func:`parse_stat` (their state, or their
    error); the other fields are not looked at. A newline at the end does not by itself
    say the line is whole: one cut short right after a newline inside the command name
    ends in one too, with a ``)`` of the name as its last. What follows the command name
    of a whole line is longer than any command name (fields of a kernel of any age), so
    a line with no more than 64 bytes after its last ``)`` gets the full checks.

    :raises ProcfsParseError: if the state cannot be read.
    """
    if type(data) is bytes and data[-1:] == b"\n":
        close = data.rfind(b")")
        field = data[close + 1 : close + 4]
        whole = len(data) - close > _COMM_MAX  # else maybe cut inside the command name
        if close > 0 and whole and field[:1] == field[2:] == b" " and field[1:2].isalpha():
            return chr(field[1])
    return parse_stat(data).state


def parse_children(data: bytes) -> list[int]:
    """Parse a ``children`` file: PIDs separated by spaces (with a trailing space)."""
    try:
        return [int(p) for p in data.split()]
    except ValueError as err:
        raise ProcfsParseError("children file holds a non-number", data) from err


class ProcFS:
    """A /proc mount to read from. ``root`` lets tests point it at a synthetic tree."""

    __slots__ = ("root",)

    def __init__(self, root: str = "/proc") -> None:
        self.root = root

    def read(self, path: str, size: int = 4096) -> bytes | None:
        """Read a whole file below :attr:`root`; ``None`` if it (or its process) is gone."""
        try:
            fd = os.open(f"{self.root}/{path}", _O_FLAGS)
        except _GONE:
            return None
        try:
            data = os.read(fd, size)
            # seq_file hands out only whole records that fit its buffer (one page at first):
            # a long children file comes in page-sized pieces, so a read that came close to
            # a page (or to ``size``) may not be the end: read on until EOF.
            if len(data) >= min(size, _PAGE) - _RECORD_SLACK:
                chunks = [data]
                while chunk := os.read(fd, 65536):
                    chunks.append(chunk)
                data = b"".join(chunks)
            return data
        except _GONE:
            return None
        finally:
            os.close(fd)

    def stat(self, pid: int, tid: int | None = None) -> Stat | None:
        """The stat of a process, or of one of its threads; ``None`` if gone."""
        data = self.read(f"{pid}/stat" if tid is None else f"{pid}/task/{tid}/stat")
        return None if data is None else parse_stat(data)

    def open_stat(self, pid: int, keep: bool) -> tuple[int, Stat] | None:
        """Read a process's stat; with ``keep``, also return the open descriptor (else -1).

        A /proc file holds the process it was opened for, not its PID number: once that
        process is reaped, reading it again fails (``None`` from :meth:`reread_brief`)
        even if the PID was reused. Re-reading costs one ``pread`` instead of three calls.
        """
        found = self.open_read(f"{pid}/stat")
        if found is None:
            return None
        fd, data = found
        if not keep:
            os.close(fd)
            fd = -1
        try:
            return fd, parse_stat(data)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def open_read(self, path: str) -> tuple[int, bytes] | None:
        """Open a small file below :attr:`root` and read it whole (one read: a stat line),
        keeping it open for :meth:`reread`: ``(descriptor, data)``; ``None`` if it (or its
        process) is gone."""
        try:
            fd = os.open(f"{self.root}/{path}", _O_FLAGS)
        except _GONE:
            return None
        try:
            return fd, os.read(fd, 4096)
        except _GONE:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def reread(fd: int) -> bytes | None:
        """Read again a stat descriptor kept by :meth:`open_stat`; ``None`` if gone."""
        try:
            return os.pread(fd, 4096, 0)
        except _GONE:
            return None

    def tids(self, pid: int) -> list[int] | None:
        """The thread ids of a process; ``None`` if it is gone."""
        try:
            return [int(t) for t in os.listdir(f"{self.root}/{pid}/task")]
        except _GONE:
            return None

    def has_thread(self, pid: int, tid: int) -> bool:
        """Whether ``tid`` is a thread of the process ``pid`` now (``/proc/PID/task/TID``
        exists; looked up with the effective IDs, as a stat would, without building one)."""
        return os.access(f"{self.root}/{pid}/task/{tid}", os.F_OK, effective_ids=True)

    def children(self, pid: int, tid: int) -> list[int] | None:
        """Children forked by one thread (``/proc/PID/task/TID/children``); ``None`` if gone.

        Only the thread that forked a child lists it, so a process's children are the union
        over its threads. The file exists only with CONFIG_PROC_CHILDREN.
        """
        data = self.read(f"{pid}/task/{tid}/children", 65536)
        return None if data is None else parse_children(data)

    def has_children_files(self) -> bool:
        """Whether this kernel provides ``children`` files (CONFIG_PROC_CHILDREN). A fact of
        the running kernel: asked of the system's /proc once per process."""
        known = _CHILDREN_FILES.get(self.root)
        if known is None:
            known = os.path.exists(f"{self.root}/self/task/{os.getpid()}/children") or (
                os.path.exists(f"{self.root}/1/task/1/children")
            )
            if self.root == "/proc":
                _CHILDREN_FILES[self.root] = known
        return known

    def pids(self) -> list[int]:
        """Every process visible in this /proc (a snapshot: it changes as you read)."""
        return [int(name) for name in os.listdir(self.root) if name.isdigit()]

    def wchan(self, pid: int, tid: int) -> str | None:
        """The kernel function a task sleeps in (``0`` when not permitted to see it)."""
        data = self.read(f"{pid}/task/{tid}/wchan")
        return None if data is None else data.decode("ascii", "replace").strip()

    def status(self, pid: int, tid: int | None = None) -> dict[str, str] | None:
        """``/proc/PID/status`` (or a thread's) as a mapping of field to raw value."""
        data = self.read(f"{pid}/status" if tid is None else f"{pid}/task/{tid}/status")
        if data is None:
            return None
        fields: dict[str, str] = {}
        for line in data.decode("utf-8", "backslashreplace").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key] = value.strip()
        return fields
