"""The watchdog's supervisor side: one helper process per guard that thaws the tree if the
supervisor dies, or when a lease runs out.

:meth:`Watchdog.start` starts the helper (:mod:`treeguard._helper`, a fresh interpreter of
about 25 ms); the guard reuses it for every freeze and excludes it from the freeze, and so
does every other guard of this process (:func:`helper_pids`); guards of other processes know
it by its name. The guard tells it what it stops through the journal
(:mod:`treeguard._journal`), arms it before each freeze (:meth:`Watchdog.arm`), and
:meth:`Watchdog.close` quits and reaps it. :meth:`Watchdog.hand_over` (``treeguard pause
--max-frozen``) lets the supervisor exit with the helper still watching the lease.

The helper runs in its own session (terminal signals and the supervisor's process group
signals do not reach it) and inherits no descriptor of the supervisor but its journal and
pipes. When the supervisor dies, the helper is re-parented to the nearest child subreaper or
to PID 1, which reaps it after it exits.
"""

from __future__ import annotations

import mmap
import os
import select
import sys
import time
from typing import TYPE_CHECKING, Any

from ._journal import (
    _CGROUP,
    _CGROUP_OFFSET,
    _EXPIRED_OFFSET,
    _FLAGS,
    _FLAGS_OFFSET,
    _HEADER,
    _MAGIC,
    _SIZE,
    FROZEN,
    IDLE,
    OUTLIVE,
    LockedJournal,
    lock,
    unlock,
)
from .errors import WatchdogError

if TYPE_CHECKING:
    import subprocess

__all__ = ["START_TIMEOUT", "Watchdog", "helper_pids"]

#: How long :meth:`Watchdog.start` waits for the helper to report ready.
START_TIMEOUT = 10.0

# The live helpers of this process (every guard's), whatever guard started them: no guard
# of this process may stop any of them (two guards in one process).
_live: set[Watchdog] = set()


def helper_pids() -> frozenset[int]:
    """The PIDs of this process's watchdog helpers that run (or have not been reaped: a
    PID is listed only while it cannot have been reused)."""
    return frozenset(dog.pid for dog in tuple(_live) if dog._proc.returncode is None)


_BOOTSTRAP = (
    "import sys, types\n"
    "pkg = types.ModuleType('treeguard')\n"
    "pkg.__path__ = [sys.argv[1]]\n"
    "sys.modules['treeguard'] = pkg\n"
    "from treeguard._helper import _helper_main\n"
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
    journal: LockedJournal

    def __init__(self, proc: subprocess.Popen[bytes], memfd: int, mem: mmap.mmap, cmd: int) -> None:
        self._proc = proc
        self._memfd = memfd
        self._mem = mem
        self._cmd = cmd
        self._owner = os.getpid()
        self._closed = False
        self.pid = proc.pid
        self.journal = LockedJournal(mem, memfd)

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
            # A process group of its own: neither the terminal's signals (sent to the
            # foreground group) nor one sent to the supervisor's group reach it. Not a
            # session of its own: with autogroup scheduling (sched(7)) a new session is a
            # new scheduling group, which a busy machine was seen to keep off the CPU for
            # seconds, delaying the helper's start and so its thaw. (Python 3.10 has no
            # process_group: a session there.)
            group: dict[str, Any] = (
                {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
            )
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
                cwd="/",  # keeps no directory busy (a handed-over helper outlives us)
                **group,
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
        locked = lock(self._memfd)
        try:
            gen = _HEADER.unpack_from(self._mem, 0)[4] + 1
            self.journal._count = 0
            _HEADER.pack_into(self._mem, 0, _MAGIC, FROZEN, 0, 0, gen, 0, deadline)
            _CGROUP.pack_into(self._mem, _CGROUP_OFFSET, 0, 0, 0)
        finally:
            if locked:
                unlock(self._memfd)
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
