"""The watchdog: a helper process that thaws the tree if the supervisor dies, or when a lease
runs out, and the child-subreaper switch.

How it works
------------

:meth:`Watchdog.start` starts one helper per guard (a fresh interpreter, ``python -I -S``,
that loads only what it needs, not the package's ``__init__``: about 25 ms). The guard
reuses it for every freeze and excludes it from the freeze.

The supervisor tells the helper what it stops through a *journal* in shared memory (a
``memfd`` mapped by both): a header (state, generation, lease deadline, record count,
``expired`` flag, flags) and one ``(pid, starttime, inode)`` record per process (the inode
of its pidfd on kernels with pidfs, 0 elsewhere), written BEFORE the process is sent
SIGSTOP. Appending a record is two plain memory writes, no system call, so the
journal adds well under a microsecond per process to a freeze. A cgroup freeze records the
cgroup instead (version, directory, inode), BEFORE ``cgroup.freeze`` is written; the helper
thaws it only if the directory still has that inode (cgroupfs never reuses one), so a cgroup
removed and made again under the same name is left alone.

The helper sleeps in ``poll(2)`` on a pidfd of the supervisor (readable once it has exited,
see pidfd_open(2)) and on a command pipe (``arm``, ``quit``). poll(2) takes an ``int`` of
milliseconds (about 24.8 days at most), so a longer lease is waited for in polls of at most
:data:`MAX_POLL` seconds: any finite lease works.

- the supervisor died while the journal says *frozen*: the helper thaws the cgroup recorded
  (writing ``cgroup.freeze`` or ``freezer.state``) and every process record with
  :func:`treeguard._thaw.thaw_identities` (which signals through pidfds and skips any PID
  that names another process now), then exits. It thaws every record it can: one it may
  not signal (EPERM: another user's process met with ``partial_ok=True``), or anything
  else that goes wrong for one record or for the cgroup, is written to its stderr and
  skipped, never the end of the thaw;
- the lease deadline passed while *frozen*: it thaws the same way, sets ``expired`` and goes
  on watching; the guard reports ``lease_expired`` on release, and a freeze still in progress
  when the lease runs out fails with :class:`~treeguard.errors.WatchdogError` (thawed);
- the supervisor released: the journal is cleared and the helper goes back to sleep;
- ``close()`` sends ``quit`` and reaps the helper;
- :meth:`Watchdog.hand_over` (``treeguard pause --max-frozen``) sets the *outlive* flag: the
  supervisor may then exit without the helper thawing; it thaws when the lease runs out (or
  on SIGTERM) and exits.

Every helper names itself :data:`~treeguard.procfs.HELPER_COMM` (``/proc/self/comm``)
before it reports ready, so that no guard, of this process or another, stops it; this
process's live helpers are also listed by :func:`helper_pids`, which every guard of this
process blocks.

Arming and releasing take an ``flock(2)`` on the journal that the helper also holds while it
thaws for an expired lease, so a late lease thaw never reaches a later freeze.

The helper runs in its own session (terminal signals and the supervisor's process group
signals do not reach it) and ignores SIGINT, SIGHUP and SIGPIPE; SIGTERM makes it thaw (if
frozen) and exit. It inherits no descriptor of the supervisor but its journal and pipes.

When the supervisor dies, the helper is re-parented to the nearest child subreaper or to
PID 1, which reaps it after it exits (a PID 1 that never reaps, as in some containers,
keeps one zombie per dead supervisor). In normal operation :meth:`Watchdog.close` reaps it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from .errors import WatchdogError
from .procfs import HELPER_COMM

if TYPE_CHECKING:
    import subprocess

# The helper imports this module without the package's __init__, then the core's thaw:
# nothing else (subprocess and ctypes are imported where they are used, by the supervisor).

__all__ = ["MAX_POLL", "Watchdog", "helper_pids", "set_subreaper"]

# -- the journal's layout (native byte order; both sides run on the same machine) --------------

_MAGIC = 0x54475744  # "TGWD"
#: magic, state, expired, pad, generation, count, deadline (CLOCK_MONOTONIC seconds, 0: none)
_HEADER = struct.Struct("=IIIIQQd")
_COUNT = struct.Struct("=Q")
_COUNT_OFFSET = 24
_EXPIRED_OFFSET = 8
#: The header's fourth field: flags the helper reads when the supervisor is gone.
_FLAGS = struct.Struct("=I")
_FLAGS_OFFSET = 12
#: The supervisor handed the freeze over (:meth:`Watchdog.hand_over`): its exit does not
#: thaw; the lease's end does.
OUTLIVE = 1
#: The cgroup a freeze wrote (version, 0: none; length of its path; inode), then the path.
_CGROUP = struct.Struct("=IIQ")
_CGROUP_OFFSET = 64
_PATH_OFFSET = _CGROUP_OFFSET + _CGROUP.size
_PATH_MAX = 4096
_RECORD = struct.Struct("=qQQ")  # pid, starttime, pidfs inode (0: none)
_RECORDS_OFFSET = _PATH_OFFSET + _PATH_MAX
#: Records the journal holds: far more processes than any tree (PID_MAX_LIMIT is 4 Mi, but
#: pid_max defaults to 32 Ki or 4 Mi and one freeze records each process once or twice). The
#: memfd is sparse: only the pages that records touch take memory.
CAPACITY = 1 << 20
_SIZE = _RECORDS_OFFSET + CAPACITY * _RECORD.size

IDLE, FROZEN = 0, 1

#: How long :meth:`Watchdog.start` waits for the helper to report ready.
START_TIMEOUT = 10.0
#: The longest single poll(2) of the helper, in seconds: far below the ``int`` of
#: milliseconds that poll(2) takes (2**31 - 1 ms, about 24.8 days).
MAX_POLL = 3600.0

# The live helpers of this process (every guard's), whatever guard started them: no guard
# of this process may stop any of them (two guards in one process).
_live: set[Watchdog] = set()


def helper_pids() -> frozenset[int]:
    """The PIDs of this process's watchdog helpers that run (or have not been reaped: a
    PID is listed only while it cannot have been reused)."""
    return frozenset(dog.pid for dog in tuple(_live) if dog._proc.returncode is None)


class _Journal:
    """The supervisor's side of the journal: what the signal backend calls."""

    __slots__ = ("_count", "_mem", "_owner")

    def __init__(self, mem: mmap.mmap) -> None:
        self._mem = mem
        self._count = 0
        self._owner = os.getpid()

    def stopping(self, pid: int, starttime: int, inode: int = 0) -> None:
        """Record ``(pid, starttime, inode)``; called before the process is sent SIGSTOP.

        :raises WatchdogError: if the lease ran out (the freeze then thaws and fails), or
            if the journal is full.
        """
        mem, n = self._mem, self._count
        if n >= CAPACITY:
            raise WatchdogError(f"journal full ({CAPACITY} processes); nothing was left stopped")
        _RECORD.pack_into(mem, _RECORDS_OFFSET + n * _RECORD.size, pid, starttime, inode)
        self._count = n + 1
        # The record is complete before the count says so: the helper reads only counted ones.
        _COUNT.pack_into(mem, _COUNT_OFFSET, n + 1)
        self.check()

    def freezing_cgroup(self, version: int, path: str, inode: int) -> None:
        """Record the cgroup directory ``path`` (cgroup v1 or v2, with its inode); called
        before its freeze is written.

        :raises WatchdogError: if the lease ran out, or the path does not fit the journal.
        """
        raw = os.fsencode(path)
        if len(raw) > _PATH_MAX:
            raise WatchdogError(f"a cgroup path of {len(raw)} bytes does not fit the journal")
        mem = self._mem
        # Version 0 while the record is written: the helper reads only a complete one.
        _CGROUP.pack_into(mem, _CGROUP_OFFSET, 0, len(raw), inode)
        mem[_PATH_OFFSET : _PATH_OFFSET + len(raw)] = raw
        _CGROUP.pack_into(mem, _CGROUP_OFFSET, version, len(raw), inode)
        self.check()

    def check(self) -> None:
        """:raises WatchdogError: if the lease ran out (the helper thawed what was recorded)."""
        if self._mem[_EXPIRED_OFFSET]:
            raise WatchdogError(
                "the lease (max_frozen) ran out before the freeze completed; everything "
                "was thawed: raise max_frozen"
            )

    def released(self) -> None:
        """The supervisor thawed the tree: the helper must not thaw it again."""
        if os.getpid() != self._owner:
            return  # a forked child of the supervisor: the journal is not its to clear
        self._count = 0
        _set_state(self._mem, IDLE)


def _set_state(mem: mmap.mmap, state: int) -> None:
    """Set the state and clear the records, keeping the rest of the header."""
    magic, _, expired, pad, gen, _, deadline = _HEADER.unpack_from(mem, 0)
    _HEADER.pack_into(mem, 0, magic, state, expired, pad, gen, 0, deadline)
    _CGROUP.pack_into(mem, _CGROUP_OFFSET, 0, 0, 0)


def _lock(fd: int, give_up: float = 5.0) -> bool:
    """Take the journal lock; False if it stayed busy for ``give_up`` seconds."""
    deadline = time.monotonic() + give_up
    delay = 0.0001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.005)


def _unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


class _LockedJournal(_Journal):
    """The journal as the guard uses it: :meth:`released` takes the lock, so that once it
    returns the helper can no longer thaw for this freeze and ``expired`` is final."""

    __slots__ = ("_fd",)

    def __init__(self, mem: mmap.mmap, fd: int) -> None:
        super().__init__(mem)
        self._fd = fd

    def released(self) -> None:
        if os.getpid() != self._owner:
            return
        locked = _lock(self._fd)
        try:
            super().released()
        finally:
            if locked:
                _unlock(self._fd)


_BOOTSTRAP = (
    "import sys, types\n"
    "pkg = types.ModuleType('treeguard')\n"
    "pkg.__path__ = [sys.argv[1]]\n"
    "sys.modules['treeguard'] = pkg\n"
    "from treeguard._watchdog import _helper_main\n"
    "_helper_main(sys.argv[2:])\n"
    "import os\n"
    "os._exit(0)  # nothing to flush or finalize: exit at once\n"
)


class Watchdog:
    """One helper process per guard, reused across freezes.

    It learns each process before it is stopped (through :attr:`journal`), thaws them all if
    the supervisor dies before releasing, or when the lease set by :meth:`arm` runs out.

    ::

        dog = Watchdog.start()          # about 25 ms, once
        dog.arm(max_frozen=5.0)         # before each freeze
        ...                             # freeze with plan.journal = dog.journal
        dog.close()                     # quit and reap the helper
    """

    pid: int
    journal: _LockedJournal

    def __init__(self, proc: subprocess.Popen[bytes], memfd: int, mem: mmap.mmap, cmd: int) -> None:
        self._proc = proc
        self._memfd = memfd
        self._mem = mem
        self._cmd = cmd
        self._owner = os.getpid()
        self._closed = False
        self.pid = proc.pid
        self.journal = _LockedJournal(mem, memfd)

    @classmethod
    def start(cls) -> Watchdog:
        """Start the helper and wait until it watches this process.

        :raises WatchdogError: if the helper could not be started or did not report ready
            within :data:`START_TIMEOUT` seconds.
        """
        import subprocess

        memfd = os.memfd_create("treeguard-watchdog")  # close-on-exec: for the helper only
        fds: list[int] = []
        proc: subprocess.Popen[bytes] | None = None
        try:
            os.ftruncate(memfd, _SIZE)
            mem = mmap.mmap(memfd, _SIZE)
            _HEADER.pack_into(mem, 0, _MAGIC, IDLE, 0, 0, 0, 0, 0.0)
            cmd_r, cmd_w = os.pipe()
            ready_r, ready_w = os.pipe()
            fds += (cmd_r, cmd_w, ready_r, ready_w)
            package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            argv = [str(memfd), str(cmd_r), str(ready_w), str(os.getpid())]
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    _BOOTSTRAP,
                    os.path.join(package_dir, "treeguard"),
                    *argv,
                ],
                pass_fds=(memfd, cmd_r, ready_w),  # and nothing else (close_fds)
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # no terminal or process-group signal reaches it
                cwd="/",  # keeps no directory busy (a handed-over helper outlives us)
            )
            os.close(cmd_r)
            os.close(ready_w)
            fds.remove(cmd_r)
            fds.remove(ready_w)
            poller = select.poll()
            poller.register(ready_r, select.POLLIN)
            if not poller.poll(START_TIMEOUT * 1000) or os.read(ready_r, 1) != b"r":
                raise WatchdogError(
                    f"the helper did not start (exit status {proc.poll()}); see its stderr"
                )
            os.close(ready_r)
            fds.remove(ready_r)
        except BaseException as err:
            for fd in fds:
                os.close(fd)
            if proc is not None:
                proc.kill()
                proc.wait()
            os.close(memfd)
            if isinstance(err, OSError):
                raise WatchdogError(f"cannot start the helper: {err}") from err
            raise
        dog = cls(proc, memfd, mem, cmd_w)
        _live.add(dog)
        return dog

    def arm(self, max_frozen: float | None) -> None:
        """Called before a freeze starts: forget the previous freeze, start the lease.

        :param max_frozen: seconds from now after which the helper thaws the tree, or None.
        :raises WatchdogError: if the helper is no longer running (nothing is frozen yet).
        """
        if not self.alive():
            raise WatchdogError(
                f"the helper (PID {self.pid}) is gone (status {self._proc.returncode}): "
                "freezing without it would not be safe"
            )
        deadline = 0.0 if max_frozen is None else time.monotonic() + max_frozen
        locked = _lock(self._memfd)
        try:
            gen = _HEADER.unpack_from(self._mem, 0)[4] + 1
            self.journal._count = 0
            _HEADER.pack_into(self._mem, 0, _MAGIC, FROZEN, 0, 0, gen, 0, deadline)
            _CGROUP.pack_into(self._mem, _CGROUP_OFFSET, 0, 0, 0)
        finally:
            if locked:
                _unlock(self._memfd)
        try:
            os.write(self._cmd, b"a")  # wake it up: a new deadline
        except OSError as err:
            self.journal.released()
            raise WatchdogError(f"the helper (PID {self.pid}) does not listen: {err}") from err

    def lease_expired(self) -> bool:
        """Whether the watchdog thawed the tree because the lease ran out."""
        return not self._mem.closed and bool(self._mem[_EXPIRED_OFFSET])

    def alive(self) -> bool:
        """Whether the helper still runs (and watches): False once it exited or was killed,
        or after :meth:`close` or :meth:`hand_over`."""
        if self._closed:
            return False
        if self._proc.poll() is not None:
            _live.discard(self)  # reaped: its PID may name another process from now on
            return False
        return True

    def hand_over(self) -> None:
        """Leave the current freeze to the helper: from now on it thaws only when the lease
        runs out (or on SIGTERM), not when this process exits, and then exits itself. This
        object lets the helper go (it is re-parented when this process exits); a helper is
        handed over at most once. For ``treeguard pause --max-frozen``.

        :raises WatchdogError: if there is no lease to keep (armed without ``max_frozen``),
            or the helper is gone.
        """
        if not self.alive():
            raise WatchdogError(f"the helper (PID {self.pid}) is gone: nothing to hand over")
        if not _HEADER.unpack_from(self._mem, 0)[6]:
            raise WatchdogError("only a freeze with a lease (max_frozen) can be handed over")
        # The flag is in the shared journal, read by the helper when it finds us gone: set
        # before the command pipe is closed below (its EOF is how it learns we left).
        flags = _FLAGS.unpack_from(self._mem, _FLAGS_OFFSET)[0]
        _FLAGS.pack_into(self._mem, _FLAGS_OFFSET, flags | OUTLIVE)
        self._closed = True
        _live.discard(self)
        os.close(self._cmd)
        self._mem.close()
        os.close(self._memfd)
        # Never waited for by this process: mark it so, or Popen would warn that it still
        # runs when collected and keep it in its list of children to reap.
        self._proc.returncode = 0

    def close(self) -> None:
        """Stop the helper and reap it (idempotent). If the journal still says frozen, the
        helper thaws what it recorded before it exits."""
        if self._closed or os.getpid() != self._owner:
            return
        import subprocess

        self._closed = True
        _live.discard(self)
        try:
            os.write(self._cmd, b"q")
        except OSError:
            pass  # it is gone already; the wait below reaps it
        os.close(self._cmd)
        try:
            self._proc.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._mem.close()
        os.close(self._memfd)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running"
        return f"<Watchdog helper PID {self.pid} {state}>"


# -- the helper's side ---------------------------------------------------------------------------


class _Helper:
    def __init__(self, mem: mmap.mmap, lock_fd: int) -> None:
        self.mem = mem
        self.lock_fd = lock_fd
        self.thaw_identities: (
            Callable[[Iterable[tuple[int, ...]]], tuple[int, list[int]]] | None
        ) = None
        self.thaw_cgroup: Callable[[int, str, int | None], int] | None = None

    def load(self) -> None:
        from ._backends._cgroup import thaw_cgroup
        from ._thaw import has_pidfs, thaw_identities

        has_pidfs()  # learned now, not when the thaw is short of descriptors

        self.thaw_identities = thaw_identities
        self.thaw_cgroup = thaw_cgroup

    def header(self) -> tuple[int, int, int, int, int, int, float]:
        return _HEADER.unpack_from(self.mem, 0)

    def records(self) -> list[tuple[int, int, int]]:
        count = min(_COUNT.unpack_from(self.mem, _COUNT_OFFSET)[0], CAPACITY)
        return [
            _RECORD.unpack_from(self.mem, _RECORDS_OFFSET + i * _RECORD.size) for i in range(count)
        ]

    def cgroup(self) -> tuple[int, str, int] | None:
        """``(version, path, inode)`` of the cgroup recorded, if any."""
        version, length, inode = _CGROUP.unpack_from(self.mem, _CGROUP_OFFSET)
        if not version:
            return None
        raw = bytes(self.mem[_PATH_OFFSET : _PATH_OFFSET + min(length, _PATH_MAX)])
        return version, os.fsdecode(raw), inode

    def outlive(self) -> bool:
        """Whether the supervisor handed the freeze over (its exit does not thaw)."""
        return bool(self.header()[3] & OUTLIVE)

    def thaw(self) -> None:
        """Thaw the cgroup and every record that can be thawed; never raises.

        thaw_identities signals last first (children first), each through a pidfd opened
        before its identity is checked: a PID that now names another process is skipped.
        thaw_cgroup likewise leaves alone a directory whose inode changed. The records are
        thawed one call each, so that nothing one of them raises stops the rest.
        """
        try:
            if self.thaw_identities is None or self.thaw_cgroup is None:
                self.load()
            assert self.thaw_identities is not None
            assert self.thaw_cgroup is not None
        except Exception as err:  # noqa: BLE001 - nothing can be thawed: say why, and live
            _complain(f"cannot load the thaw: {err!r}")
            return
        cgroup = self.cgroup()
        if cgroup is not None:
            try:
                self.thaw_cgroup(*cgroup)
            except Exception as err:  # noqa: BLE001 - the records below must still be thawed
                _complain(f"cannot thaw the cgroup {cgroup[1]!r}: {err!r}")
        failed: list[str] = []
        for record in reversed(self.records()):
            try:
                failed += map(str, self.thaw_identities((record,))[1])
            except Exception as err:  # noqa: BLE001 - one process never ends the thaw
                failed.append(f"{record[0]} ({err!r})")
        if failed:
            _complain(f"could not thaw PID(s) {', '.join(failed)}; every other one was thawed")

    def thaw_if_frozen(self) -> None:
        if self.header()[1] == FROZEN:
            self.thaw()

    def expire(self) -> None:
        """The lease ran out: thaw under the lock, unless the supervisor released meanwhile."""
        if not _lock(self.lock_fd):
            return  # the supervisor holds it (arming or releasing): nothing to thaw then
        try:
            magic, state, expired, flags, gen, count, deadline = self.header()
            if state != FROZEN or expired or not deadline or time.monotonic() < deadline:
                return
            self.mem[_EXPIRED_OFFSET] = 1  # first, so that the freeze stops stopping
            self.thaw()
        finally:
            _unlock(self.lock_fd)


def _complain(what: str) -> None:
    """A line on the helper's stderr (the supervisor's, inherited); never raises."""
    try:
        sys.stderr.write(f"treeguard watchdog (PID {os.getpid()}): {what}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001, S110 - a closed stderr must not stop a thaw
        pass


def _name_self() -> None:
    """Take the helper's command name, by which every guard recognises it (proc(5):
    writing ``/proc/self/comm`` sets the calling thread's name, here the main thread's,
    which is the process's)."""
    with open("/proc/self/comm", "wb") as comm:
        comm.write(HELPER_COMM)


def _helper_main(argv: Sequence[str]) -> None:
    """The helper process: ``memfd cmd_fd ready_fd supervisor_pid``."""
    memfd, cmd_fd, ready_fd, supervisor = (int(a) for a in argv)
    _name_self()  # before anything else: no guard may stop it from here on
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    # The signal mask survives fork and execve (sigprocmask(2)): a supervisor that blocks
    # SIGTERM while it freezes (treeguard pause) must not pass that on.
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda *_: None)  # handled through the wakeup fd
    mem = mmap.mmap(memfd, 0)
    # A second open file description of the memfd: flock(2) locks belong to one, so the
    # supervisor's and ours exclude each other.
    lock_fd = os.open(f"/proc/self/fd/{memfd}", os.O_RDWR | os.O_CLOEXEC)
    helper = _Helper(mem, lock_fd)
    try:
        pidfd = os.pidfd_open(supervisor)
    except ProcessLookupError:
        pidfd = -1
    # The pidfd names our parent only if it is still our parent now: a supervisor that died
    # before this line has re-parented us, and its PID may name a stranger.
    if pidfd < 0 or os.getppid() != supervisor:
        helper.thaw_if_frozen()
        return
    # Ready only once it can thaw at once: the core's import (about 10 ms) is paid here,
    # not after the supervisor died.
    helper.load()
    os.write(ready_fd, b"r")
    os.close(ready_fd)
    _watch(helper, pidfd, cmd_fd, wake_r)


def _watch(helper: _Helper, pidfd: int, cmd_fd: int, wake_r: int) -> None:
    """The helper's loop, until it has nothing left to guard."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(cmd_fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    supervised = True  # the supervisor is alive and has not handed over
    detached = False
    while True:
        _, state, expired, _, _, _, deadline = helper.header()
        timeout: float | None = None
        if state == FROZEN and deadline and not expired:
            # Capped: poll(2) takes an int of milliseconds; a longer lease takes more polls.
            timeout = min(max(0.0, deadline - time.monotonic()), MAX_POLL) * 1000.0
        elif not supervised:
            return  # handed over, and the lease ran out (thawed) or nothing is frozen
        events = dict(poller.poll(timeout))
        if wake_r in events:  # SIGTERM: thaw (a handed-over freeze too) and go
            os.read(wake_r, 4096)
            helper.thaw_if_frozen()
            return
        if cmd_fd in events:
            try:
                data = os.read(cmd_fd, 4096)
            except OSError:
                data = b""
            if b"q" in data:
                helper.thaw_if_frozen()
                return
            if not data:  # the supervisor closed its end: it exited, or handed over
                poller.unregister(cmd_fd)
                supervised = False
        if pidfd in events:  # the supervisor exited; it cannot hold the lock any more
            poller.unregister(pidfd)
            supervised = False
        if not supervised:
            if not helper.outlive():
                helper.thaw_if_frozen()
                return
            if not detached:
                # Handed over: let go of the supervisor's stderr, which may be a pipe that
                # its caller reads to the end (``$(treeguard pause ...)`` would wait for
                # the lease). Complaints from now on go nowhere.
                detached = True
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                os.close(null)
        if timeout is not None and deadline and time.monotonic() >= deadline:
            helper.expire()


# -- subreaper -----------------------------------------------------------------------------------

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def set_subreaper(enable: bool = True) -> None:
    """Make the calling process a child subreaper (PR_SET_CHILD_SUBREAPER, see prctl(2)).

    A descendant orphaned by its parent's exit (a double-forking daemon) is then re-parented
    to this process instead of PID 1, so it stays in the tree and is frozen with it. The
    consequences: this process must reap such orphans (``os.waitpid``), or they remain
    zombies once they exit; ``os.wait()`` may return PIDs it never started; the flag is not
    inherited by children and survives ``execve``.

    :param enable: ``False`` clears the flag.
    :raises WatchdogError: if the kernel refuses (Linux before 3.4).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enable), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise WatchdogError(f"PR_SET_CHILD_SUBREAPER failed: {os.strerror(err)}")


def is_subreaper() -> bool:
    """Whether the calling process is a child subreaper (PR_GET_CHILD_SUBREAPER)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int(0)
    if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) != 0:
        raise WatchdogError(f"PR_GET_CHILD_SUBREAPER failed: {os.strerror(ctypes.get_errno())}")
    return bool(flag.value)
