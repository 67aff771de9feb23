"""The ``treeguard`` command line: ``demo``, ``tree``, ``freeze``, ``pause``, ``resume``.

Every subcommand goes through the library's public faces (:class:`ProcessesGuard`,
:func:`treeguard.snapshot`, tokens); nothing here freezes or reads /proc by itself.
Errors are one line on stderr and a distinct exit status (see :data:`EPILOG`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ._backends import BACKENDS
from .errors import (
    FreezeError,
    FreezePermissionError,
    FrozenInterrupt,
    InvalidArgumentError,
    NoSuchProcessError,
    StateFileError,
    StopTimeoutError,
    TokenError,
    TreeUnstableError,
)

if TYPE_CHECKING:
    from ._guard import ProcessesGuard
    from ._statefile import PauseState, StateJournal

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1  # any other failure: a demo check failed, a cgroup error
EXIT_USAGE = 2  # bad arguments (argparse's own status)
EXIT_NO_PROCESS = 3
EXIT_PERMISSION = 4
EXIT_UNSTABLE = 5  # a task did not stop in time, or the tree kept forking
EXIT_STATE = 6  # unsafe state file or invalid token
EXIT_NOT_FOUND = 127  # CMD could not be run (as shells report it)

EPILOG = """\
exit status:
  0    success (freeze: CMD succeeded)
  1    any other failure (a demo check failed; the cgroup backend cannot be used here)
  2    bad arguments
  3    no such process
  4    permission denied (a process of the tree may not be signalled)
  5    timeout or unstable tree (a task did not stop, or processes kept forking);
       nothing was left stopped
  6    unsafe state file (symlink, not yours, writable by others, exists) or bad token
  127  CMD could not be started
  N    freeze: CMD's own exit status; 128+S when CMD died of signal S, or when
       treeguard was interrupted by signal S (the tree was thawed)
"""

#: Signals that usually end the CLI: never while a tree is half frozen or a token unsaved.
_INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _status_of(err: BaseException) -> int:
    # Order matters: StateFileError is a PermissionError, FreezePermissionError is one too.
    if isinstance(err, StateFileError | TokenError):
        return EXIT_STATE
    if isinstance(err, InvalidArgumentError):
        return EXIT_USAGE
    if isinstance(err, NoSuchProcessError):
        return EXIT_NO_PROCESS
    if isinstance(err, FreezePermissionError | PermissionError):
        return EXIT_PERMISSION
    if isinstance(err, StopTimeoutError | TreeUnstableError | TimeoutError):
        return EXIT_UNSTABLE
    return EXIT_FAILED


def _pid(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a PID: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a PID is positive, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="treeguard",
        description="Freeze a whole process tree, prove every task stopped, always thaw it.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, helptext: str, description: str, usage: str | None = None
    ) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=helptext,
            description=textwrap.fill(description, 78),
            epilog=EPILOG,
            formatter_class=fmt,
            usage=usage,
        )

    add(
        "demo",
        "freeze a small worker tree and prove it stopped",
        "Start a tree of worker processes that tick counters, freeze it, show it, prove no "
        "counter moved while frozen, thaw it, show the counters moving again, tear it down.",
    )

    tree = add(
        "tree",
        "show the tree below a process, with states and signal state",
        "Show the processes below PID (PID included) with their state, thread count and "
        "warnings for the signal freezer. Nothing is signalled.",
    )
    tree.add_argument("pid", nargs="?", type=_pid, default=1, metavar="PID", help="default: 1")
    tree.add_argument("--json", action="store_true", help="print the JSON snapshot (schema 1)")

    def freeze_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("pid", type=_pid, metavar="PID", help="root of the tree (frozen too)")
        p.add_argument(
            "--exclude",
            type=_pid,
            action="append",
            default=[],
            metavar="PID",
            help="leave PID and its subtree running (repeatable)",
        )
        p.add_argument(
            "--backend",
            choices=BACKENDS,
            default="signal",
            help="how to freeze (default: signal)",
        )
        p.add_argument(
            "--timeout",
            type=_seconds,
            default=1.0,
            metavar="S",
            help="seconds the freeze may take (default: 1)",
        )

    freeze = add(
        "freeze",
        "freeze a tree while a command runs",
        "Freeze the tree rooted at PID (PID included), run CMD, thaw, and exit with CMD's "
        "status. Ctrl-C, SIGTERM or SIGHUP during CMD still thaw the tree, and a watchdog "
        "helper thaws it if treeguard itself dies (kill -9).",
        usage=f"treeguard freeze [-h] [--exclude PID] [--backend {{{','.join(BACKENDS)}}}] "
        "[--timeout S] PID -- CMD [ARGS ...]",
    )
    freeze_options(freeze)

    pause = add(
        "pause",
        "freeze a tree and save a token to resume it later",
        "Freeze the tree rooted at PID (PID included) and leave it frozen; the state file "
        "(created with mode 0600, never overwritten) lets `treeguard resume` thaw it. Each "
        "process is recorded in the state file before it is stopped, so that `resume` also "
        "undoes a pause that was cut short; a pause killed while it freezes is thawed by its "
        "watchdog helper. With --max-frozen, that helper stays and thaws the tree when the "
        "lease runs out (`resume` before then stops it).",
    )
    freeze_options(pause)
    pause.add_argument("--state", required=True, metavar="FILE", help="state file to create")
    pause.add_argument(
        "--max-frozen",
        type=_seconds,
        default=None,
        metavar="S",
        help="a lease: thaw the tree after S seconds even if nobody resumes it",
    )

    resume = add(
        "resume",
        "thaw a tree paused by `treeguard pause`",
        "Thaw what `treeguard pause` froze, then remove the state file. The file must be a "
        "regular file (not a symlink) owned by you and writable by nobody else; a process "
        "whose start time differs from the record is never signalled.",
    )
    resume.add_argument("--state", required=True, metavar="FILE", help="state file to read")
    return parser


# -- subcommands --------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run

    return run()


def _cmd_tree(args: argparse.Namespace) -> int:
    from ._snapshot import snapshot

    snap = snapshot(args.pid, include_root=True)
    # JSON escapes every control character itself; render() escapes names (see printable).
    print(snap.to_json(indent=2) if args.json else snap.render())
    return EXIT_OK


@contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """Ignore SIGINT, SIGTERM and SIGHUP while cleaning up in bounded time."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _INTERRUPTS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _end_child(child: subprocess.Popen[bytes], signum: int) -> None:
    """Pass ``signum`` on to CMD and wait for it (never leave it orphaned)."""
    with _interrupts_ignored():
        if child.poll() is None:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass
            try:
                child.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _cmd_freeze(args: argparse.Namespace) -> int:
    from ._freezethaw import freezethaw

    cmd: list[str] = args.cmd
    if not cmd:
        raise InvalidArgumentError("CMD", "give the command to run after '--'")
    started: list[subprocess.Popen[bytes]] = []

    def run_cmd() -> int:
        try:
            started.append(subprocess.Popen(cmd))
        except OSError as err:
            raise _CannotRun(cmd[0], err.strerror or str(err)) from None
        return started[0].wait()

    # freezethaw holds SIGINT, SIGTERM and SIGHUP back while CMD runs, thaws, and then hands
    # them to these handlers, which end CMD with the same signal (and treeguard with 128+N).
    # The watchdog thaws when nothing of treeguard can run any more (SIGKILL, a crash).
    def interrupted(signum: int, frame: object) -> None:
        raise FrozenInterrupt(signum)

    ending = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, interrupted) for sig in ending}
    try:
        status = freezethaw(
            run_cmd,
            root=args.pid,
            include_root=True,
            exclude=args.exclude,
            backend=args.backend,
            timeout=args.timeout,
            watchdog=True,
        )
    except FrozenInterrupt as interrupt:
        if started:
            _end_child(started[0], interrupt.signum)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status


class _CannotRun(Exception):
    def __init__(self, cmd: str, why: str) -> None:
        super().__init__(f"cannot run {cmd!r}: {why}")


def _cmd_pause(args: argparse.Namespace) -> int:
    from ._guard import ProcessesGuard
    from ._statefile import StateJournal, create_exclusive

    options = {
        "root": args.pid,
        "include_root": True,
        "exclude": args.exclude,
        "backend": args.backend,
        "timeout": args.timeout,
    }
    # Validate everything before the state file exists and before any process is touched.
    ProcessesGuard(**options, max_frozen=args.max_frozen)
    guard = ProcessesGuard(**options)
    path: str = args.state
    fd = create_exclusive(path)
    # No handler may interrupt the freeze half way, and the default action of SIGTERM would
    # leave a tree stopped with an unfinished state file: block the interrupting signals
    # until the token is safely on disk, then act on one that arrived meanwhile
    # (pthread_sigmask(3)). SIGKILL is left to the journal and the watchdog.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        count = _pause(guard, StateJournal(fd), args.max_frozen)
    except BaseException:
        os.close(fd)
        fd = -1
        os.unlink(path)  # we created it just now, exclusively; nothing is left stopped
        raise
    finally:
        if fd >= 0:
            os.close(fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    lease = "" if args.max_frozen is None else f" (thawed in {args.max_frozen:g} s if not)"
    print(
        f"treeguard: froze {count} process(es) at and below PID {args.pid}; "
        f"resume with: treeguard resume --state {path}{lease}"
    )
    return EXIT_OK


def _pause(guard: ProcessesGuard, journal: StateJournal, max_frozen: float | None) -> int:
    """Freeze with ``journal`` and a watchdog, leave the tree frozen, and hand the lease (if
    any) to the helper. Whatever it raises, nothing is left stopped."""
    from ._thaw import pidfd_inode
    from ._token import Token
    from ._watchdog import Watchdog
    from .errors import WatchdogError
    from .procfs import ProcFS

    dog = Watchdog.start()  # its PID is blocked by every guard of this process
    try:
        journal.inner = dog.journal
        guard._journal = journal  # the guard's journal hook: the state file, then the helper
        dog.arm(max_frozen)
        guard.freeze()
        try:
            if dog.lease_expired():
                raise WatchdogError(
                    f"the lease (--max-frozen {max_frozen}) ran out before the freeze "
                    "completed; everything was thawed: raise it"
                )
            backend = guard._backend
            assert backend is not None
            token = Token(backend.name, backend.describe())
            journal.completed(token)
            arrived = sorted(signal.sigpending() & set(_INTERRUPTS))
            if arrived:
                signal.sigtimedwait(arrived, 0)  # consume it: the pause is undone
                raise FrozenInterrupt(arrived[0])
            if max_frozen is not None:
                # Recorded before it is handed the tree, so that `resume` can stop it.
                fd = os.pidfd_open(dog.pid)  # our child, not reaped: the PID is its own
                try:
                    stat = ProcFS().stat(dog.pid)
                    assert stat is not None
                    journal.helper((dog.pid, stat.starttime, pidfd_inode(fd)))
                finally:
                    os.close(fd)
                dog.hand_over()
            else:
                dog.journal.released()  # frozen on purpose: the helper must not thaw it
        except BaseException:
            guard.release()
            raise
        count = len(guard.pids)
        guard._detach()  # the state file owns the freeze now
        return count
    finally:
        dog.close()  # a no-op once handed over


def _cmd_resume(args: argparse.Namespace) -> int:
    from ._statefile import parse_state, read_checked, remove_checked

    path: str = args.state
    data, info = read_checked(path)
    failed = _undo(parse_state(data))
    if failed:
        # Left in place: run resume again once they may be signalled (as their owner).
        shown = ",".join(map(str, failed))
        print(f"treeguard: error: cannot resume PID(s) {shown} (not permitted)", file=sys.stderr)
        return EXIT_PERMISSION
    remove_checked(path, info)
    return EXIT_OK


def _undo(state: PauseState) -> list[int]:
    """Thaw what a state file records (idempotent); stop a lease's helper. Returns the PIDs
    that could not be signalled."""
    from . import _token
    from ._backends._cgroup import thaw_cgroup
    from ._thaw import thaw_identities

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
    if state.helper is not None:
        _stop_helper(*state.helper)
    return failed


def _stop_helper(pid: int, starttime: int, inode: int) -> None:
    """SIGKILL the helper of a lease: the tree is thawed, its late thaw could only resume
    processes someone stopped since. Only that very process, and only a treeguard helper."""
    from ._thaw import close_pidfd, open_identity
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
        close_pidfd(fd)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _cmd_demo,
    "tree": _cmd_tree,
    "freeze": _cmd_freeze,
    "pause": _cmd_pause,
    "resume": _cmd_resume,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return its exit status (see :data:`EPILOG`).

    :param argv: the arguments (default: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is CMD, options included: split it off before argparse
    # sees it (argparse.REMAINDER would also swallow treeguard's own options after PID).
    cmd: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, cmd = argv[:at], argv[at + 1 :]
    args = _parser().parse_args(argv)
    if cmd and args.command != "freeze":
        _parser().error(f"'--' is only for 'treeguard freeze', not '{args.command}'")
    args.cmd = cmd
    try:
        return _COMMANDS[args.command](args)
    except FrozenInterrupt as err:  # the tree was thawed before this propagated
        print(f"treeguard: {err}", file=sys.stderr)
        return 128 + err.signum
    except _CannotRun as err:
        print(f"treeguard: error: {err}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except FreezeError as err:
        print(f"treeguard: error: {err}", file=sys.stderr)
        return _status_of(err)
    except KeyboardInterrupt:
        print("treeguard: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except OSError as err:
        print(f"treeguard: error: {err}", file=sys.stderr)
        return _status_of(err)
