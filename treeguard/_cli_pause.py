"""``treeguard pause`` and ``treeguard resume``: a freeze that outlives the command line,
kept in a state file (see :mod:`treeguard._statefile`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Protocol

from .errors import FreezeError, FrozenInterrupt, InvalidArgumentError

if TYPE_CHECKING:
    from ._guard import ProcessesGuard
    from ._report import FreezeReport
    from ._statefile import PauseState, StateJournal
    from ._token import Token
    from .cgroup import Cgroup

__all__ = ["INTERRUPTS", "NothingToPause", "cgroup_only", "cmd_pause", "cmd_resume", "heeded"]

#: Signals that usually end the CLI: never while a tree is half frozen or a token unsaved.
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def heeded() -> list[int]:
    """The :data:`INTERRUPTS` this process was not started ignoring (SIGHUP under
    nohup(1), SIGINT in a script's background job): ignored before, ignored now."""
    return [sig for sig in INTERRUPTS if signal.getsignal(sig) is not signal.SIG_IGN]


class NothingToPause(FreezeError):
    """The tree has nothing left to stop: it is frozen already (by someone else)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why

    def message(self) -> str:
        return f"nothing to pause: {self.why}; no state file was written"


def cmd_pause(args: argparse.Namespace) -> int:
    from ._statefile import StateJournal, create_exclusive, remove_checked

    hold = _cgroup_hold(args) if args.cgroup is not None else _guard_hold(args)
    path: str = args.state
    # No handler may interrupt the freeze half way, and the default action of SIGTERM would
    # leave a tree stopped with an unfinished state file: block the interrupting signals
    # before the state file exists and until the token is safely on disk, then act on one
    # that arrived meanwhile (pthread_sigmask(3)). The mask is read before it is changed, so
    # that it is always restored: the handler of a signal that came just before runs (in
    # the main thread) at the latest as the call that blocks returns, and no later one runs
    # until the mask is restored. SIGKILL is left to the journal and the watchdog.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
        fd = create_exclusive(path)
        try:
            report, token = _pause(hold, StateJournal(fd), args.max_frozen)
        except BaseException:
            # Nothing is left stopped. The file we created, unless someone put another at
            # its path since (a resume took ours away, another pause made its own there).
            remove_checked(path, os.fstat(fd))
            raise
        finally:
            os.close(fd)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    lease = "" if args.max_frozen is None else f" (thawed in {args.max_frozen:g} s if not)"
    skipped = f", skipped {len(report.skipped)}" if report.skipped else ""
    what = f"in cgroup {args.cgroup}" if args.cgroup else f"at and below PID {args.pid}"
    print(
        f"treeguard: froze {report.stopped} process(es) ({report.tasks} tasks) {what} "
        f"with the {_kind(token)} backend{skipped}; "
        f"resume with: treeguard resume --state {path}{lease}"
    )
    return 0


class _Hold(Protocol):
    """What a pause freezes: a guard's tree, or a cgroup given by path."""

    def freeze(self, journal: StateJournal) -> FreezeReport: ...
    def release(self) -> None: ...
    def token(self) -> Token: ...
    def detach(self) -> None: ...


class _GuardHold:
    def __init__(self, guard: ProcessesGuard) -> None:
        self.guard = guard

    def freeze(self, journal: StateJournal) -> FreezeReport:
        self.guard._journal = journal  # the guard's journal hook: the state file, the helper
        self.guard.freeze()
        return self.guard.report

    def release(self) -> None:
        self.guard.release()

    def token(self) -> Token:
        from ._token import Token

        backend = self.guard._backend
        assert backend is not None
        return Token(backend.name, backend.describe())

    def detach(self) -> None:
        self.guard._detach()  # the state file owns the freeze now


def _guard_hold(args: argparse.Namespace) -> _GuardHold:
    from ._guard import ProcessesGuard

    if args.pid is None:
        raise InvalidArgumentError("PID", "give the root of the tree, or --cgroup PATH")
    args.backend = args.backend or "signal"
    if args.backend == "ptrace":
        # A ptrace hold belongs to the thread that seized the tree and ends when it exits
        # (ptrace(2): a dead tracer's tracees are detached), so it cannot outlive pause.
        raise InvalidArgumentError(
            "--backend",
            "ptrace cannot pause: a ptrace hold ends when treeguard exits; pause with "
            "--backend signal or cgroup, or hold the tree with ptrace while a command runs: "
            "treeguard freeze --backend ptrace PID -- CMD",
        )
    options = {
        "root": args.pid,
        "include_root": True,
        "exclude": args.exclude,
        "backend": args.backend,
        "timeout": args.timeout,
        "partial_ok": args.partial_ok,
    }
    # Validate everything before the state file exists and before any process is touched.
    ProcessesGuard(**options, max_frozen=args.max_frozen)
    return _GuardHold(ProcessesGuard(**options))


class _CgroupHold:
    """A cgroup frozen whole by :meth:`Cgroup.freeze` (and its checks), journaled first."""

    def __init__(self, cgroup: Cgroup, timeout: float) -> None:
        self.cgroup = cgroup
        self.timeout = timeout
        self.inode = 0
        self.was_frozen = False
        self.journal: StateJournal | None = None

    def freeze(self, journal: StateJournal) -> FreezeReport:
        cg = self.cgroup
        if cg.frozen:
            raise NothingToPause(f"the cgroup {cg.path} was frozen already")
        # Which cgroup (inodes are never reused), read as it is frozen: one made again at
        # the path since the command started is the one frozen, and the one to thaw.
        self.inode = os.stat(cg.path).st_ino
        self.journal = journal
        journal.freezing_cgroup(cg.version, cg.path, self.inode)  # the file, then the helper
        report = cg.freeze(timeout=self.timeout)
        # Found frozen by its own freeze (someone froze it since the check above): theirs,
        # nothing of this pause's; its thaw and the helper's leave it frozen.
        backend = cg._freezer
        self.was_frozen = backend is None or bool(backend.describe()["was_frozen"])
        return report

    def release(self) -> None:
        self.cgroup.thaw()  # nothing if it was frozen before
        if self.journal is not None:
            self.journal.released()  # thawed: the helper must not thaw it again

    def token(self) -> Token:
        from ._token import Token

        cg = self.cgroup
        return Token(
            "cgroup",
            {
                "version": cg.version,
                "path": cg.path,
                "inode": self.inode,
                "was_frozen": self.was_frozen,
            },
        )

    def detach(self) -> None:
        pass  # a Cgroup thaws only when told to (thaw(), or leaving its ``with`` block)


def _cgroup_hold(args: argparse.Namespace) -> _CgroupHold:
    from ._checks import check_seconds
    from .cgroup import Cgroup

    cgroup_only(args)
    check_seconds("timeout", args.timeout)
    if args.max_frozen is not None:
        check_seconds("max_frozen", args.max_frozen)
    return _CgroupHold(Cgroup(args.cgroup), args.timeout)


def cgroup_only(args: argparse.Namespace) -> None:
    """--cgroup names what to freeze: not with PID or the options of a tree."""
    if args.pid is not None:
        raise InvalidArgumentError("--cgroup", "give PID or --cgroup PATH, not both")
    given = [
        flag
        for flag, on in (
            ("--exclude", args.exclude),
            ("--backend", args.backend),
            ("--partial-ok", args.partial_ok),
        )
        if on
    ]
    if given:
        raise InvalidArgumentError(
            "--cgroup", f"freezes the cgroup whole: {', '.join(given)} do not apply"
        )


def _kind(token: Token) -> str:
    """``signal`` or ``cgroup``: what froze (``auto`` chose one of them)."""
    from ._backends import _kind as kind

    return kind(token.backend, token.payload)


def _nothing_stopped(token: Token, report: FreezeReport) -> str | None:
    """Why this pause holds nothing (a state file would resume nothing), or None."""
    if _kind(token) == "cgroup":
        if token.payload.get("was_frozen"):
            return f"the cgroup {token.payload.get('path')} was frozen already"
        return None
    if report.stopped:
        return None
    already = sum(1 for why in report.skipped.values() if str(why) == "already stopped")
    if already:
        return f"every process was stopped already ({already}, by someone else)"
    return "no process of the tree could be stopped"


def _pause(
    hold: _Hold, journal: StateJournal, max_frozen: float | None
) -> tuple[FreezeReport, Token]:
    """Freeze with ``journal`` and a watchdog, leave it frozen, and hand the lease (if any)
    to the helper. Whatever it raises, nothing is left stopped."""
    from ._thaw import pidfd_inode
    from ._watchdog import Watchdog
    from .errors import WatchdogError
    from .procfs import ProcFS

    dog = Watchdog.start()  # its PID is blocked by every guard of this process
    try:
        journal.inner = dog.journal
        dog.arm(max_frozen)
        # The helper counts the lease from now: by this time it has thawed the tree.
        lease_ends = None if max_frozen is None else time.time() + max_frozen
        report = hold.freeze(journal)
        try:
            if dog.lease_expired():
                raise WatchdogError(
                    f"the lease (--max-frozen {max_frozen}) ran out before the freeze "
                    "completed; everything was thawed: raise it"
                )
            token = hold.token()
            why = _nothing_stopped(token, report)
            if why is not None:
                raise NothingToPause(why)
            journal.completed(token)
            # One ignored is pending only because it was blocked: not an interrupt.
            arrived = sorted(signal.sigpending() & set(heeded()))
            if arrived:
                signal.sigtimedwait(arrived, 0)  # consume it: the pause is undone
                raise FrozenInterrupt(arrived[0])
            if max_frozen is not None:
                # Recorded before it is handed the tree, so that `resume` can stop it.
                fd = os.pidfd_open(dog.pid)  # our child, not reaped: the PID is its own
                try:
                    stat = ProcFS().stat(dog.pid)
                    assert stat is not None
                    assert lease_ends is not None
                    journal.helper((dog.pid, stat.starttime, pidfd_inode(fd)), lease_ends)
                finally:
                    os.close(fd)
                dog.hand_over()
            else:
                dog.journal.released()  # frozen on purpose: the helper must not thaw it
        except BaseException:
            hold.release()
            raise
        hold.detach()
        return report, token
    finally:
        dog.close()  # a no-op once handed over


def cmd_resume(args: argparse.Namespace) -> int:
    from ._statefile import parse_state, read_checked, remove_checked

    path: str = args.state
    data, info = read_checked(path, settled=True)  # never while its pause still runs
    failed = _undo(parse_state(data))
    if failed:
        # Left in place: run resume again once they may be signalled (as their owner).
        shown = ",".join(map(str, failed))
        print(f"treeguard: error: cannot resume PID(s) {shown} (not permitted)", file=sys.stderr)
        return 4
    remove_checked(path, info)
    return 0


def _undo(state: PauseState) -> list[int]:
    """Thaw what a state file records (idempotent); stop a lease's helper. Returns the PIDs
    that could not be signalled."""
    from . import _token
    from ._backends._freezers import thaw_cgroup
    from ._thaw import resume_relay, thaw_identities

    token = state.token
    if token is not None and (state.version == 1 or "stopped" not in token.payload):
        # A version 1 file has nothing else; a cgroup's token knows whether the cgroup was
        # frozen before the pause (then it stays so).
        _token.thaw(token)
    elif token is None:
        for version, path, inode in state.cgroups:  # cut short: we wrote each freeze
            thaw_cgroup(version, path, inode)
    # Every process journaled, whether or not the pause got to stop it (the journal is
    # written first); children first, each checked by its identity before the signal.
    failed = thaw_identities(state.stopped)[1]
    for pid, starttime in state.watchers:  # then a relay above it that stopped itself
        resume_relay(pid, starttime)
    if state.helper is not None:
        _stop_helper(*state.helper)
    return failed


def _stop_helper(pid: int, starttime: int, inode: int) -> None:
    """SIGKILL the helper of a lease: the tree is thawed, its late thaw could only resume
    processes someone stopped since. Only that very process, and only a treeguard helper."""
    from ._thaw import close_fd, open_identity
    from .procfs import HELPER_COMM, ProcFS

    fs = ProcFS()
    fd = open_identity(pid, starttime, inode, fs)
    if fd < 0:
        return  # gone: the lease ran out (it thawed), or it was stopped already
    try:
        stat = fs.stat(pid)
        if stat is not None and stat.comm == HELPER_COMM:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        close_fd(fd)
