"""The ``treeguard`` command line: ``demo``, ``tree``, ``freeze``, ``pause``, ``resume``,
``status``, ``doctor``.

Every subcommand goes through the library's faces (:class:`ProcessesGuard`,
:class:`~treeguard.cgroup.Cgroup`, :func:`treeguard.snapshot`, tokens, the state file, the
identity checks of :mod:`treeguard._thaw`); nothing here signals a process of the tree
itself (only CMD, and the helper of a lease that `resume` ends).
``_cli_freeze``, ``_cli_pause``, ``_cli_status`` and ``_cli_doctor`` hold the subcommands.
Errors are one line on stderr and a distinct exit status (see :data:`EPILOG`); ``freeze``
passes CMD's status through, so its own failures use 125..127 as ``timeout(1)`` and
``env(1)`` do.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ._backends import BACKENDS
from ._cli_doctor import cmd_doctor
from ._cli_doctor import register as add_doctor
from ._cli_freeze import CannotRun, cmd_freeze
from ._cli_pause import NothingToPause, cmd_pause, cmd_resume
from ._cli_status import cmd_status, cmd_tree
from ._version import __version__
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

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1  # any other failure: a demo check failed, a cgroup error
EXIT_USAGE = 2  # bad arguments (argparse's own status)
EXIT_NO_PROCESS = 3
EXIT_PERMISSION = 4
EXIT_UNSTABLE = 5  # a task did not stop in time, or the tree kept forking
EXIT_STATE = 6  # unsafe state file or invalid token
EXIT_NOTHING = 7  # pause: the tree is frozen already
EXIT_NOT_FROZEN = 8  # status: not (wholly) frozen now
EXIT_PIPE = 128 + signal.SIGPIPE  # stdout closed early: what a shell shows for `ps | head`
# freeze: timeout(1), env(1) and POSIX shells use these; CMD rarely exits with them.
EXIT_OWN = 125  # treeguard freeze itself failed (CMD did not run, or its status is lost)

EPILOG = """\
exit status:
  0    success (status: the tree is frozen)
  1    any other failure (a demo check failed; the cgroup backend cannot be used here)
  2    bad arguments
  3    no such process
  4    permission denied (a process of the tree may not be signalled)
  5    timeout or unstable tree (a task did not stop, or processes kept forking);
       nothing was left stopped
  6    unsafe state file (symlink, not yours, writable by others, exists) or bad token
  7    pause: nothing to stop (the tree is frozen already); no state file was written
  8    status: the tree is not frozen now (running, partly frozen, or gone)
  141  the output was closed early (tree --json | head)
freeze PID -- CMD exits with CMD's status (128+S when CMD died of signal S, or when
treeguard was interrupted by signal S: the tree was thawed), or with:
  125  treeguard freeze itself failed (any of 1..6 above; the reason is on stderr)
  126  CMD was found but cannot be executed
  127  CMD was not found
"""

#: The command line's name for each option of :class:`ProcessesGuard`.
FLAGS = {
    "root": "PID",
    "include_root": "PID",
    "exclude": "--exclude",
    "timeout": "--timeout",
    "max_frozen": "--max-frozen",
    "partial_ok": "--partial-ok",
    "backend": "--backend",
    "path": "--cgroup",
}


def _status_of(err: BaseException) -> int:
    # Order matters: StateFileError is a PermissionError, FreezePermissionError is one too.
    if isinstance(err, StateFileError | TokenError):
        return EXIT_STATE
    if isinstance(err, InvalidArgumentError):
        return EXIT_USAGE
    if isinstance(err, NothingToPause):
        return EXIT_NOTHING
    if isinstance(err, NoSuchProcessError):
        return EXIT_NO_PROCESS
    if isinstance(err, FreezePermissionError | PermissionError):
        return EXIT_PERMISSION
    if isinstance(err, StopTimeoutError | TreeUnstableError | TimeoutError):
        return EXIT_UNSTABLE
    return EXIT_FAILED


def _describe(err: BaseException) -> str:
    """The error's message, naming command-line flags rather than Python options."""
    if isinstance(err, InvalidArgumentError):
        return f"{FLAGS.get(err.name, err.name)}: {err.problem}"
    return str(err)


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


class _Version(argparse.Action):
    """``--version``: the version the package defines once (``_version``; the build reads
    it too)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"treeguard {__version__}")
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """argparse, with the status of a usage error chosen per subcommand (``freeze``: 125)."""

    usage_status = EXIT_USAGE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: dict[str, _Parser] = {}  # the subcommands' parsers, by name

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(self.usage_status, f"{self.prog}: error: {message}\n")


def _parser() -> _Parser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="treeguard",
        description="Freeze a whole process tree, prove every task stopped, always thaw it.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, helptext: str, description: str, usage: str | None = None
    ) -> argparse.ArgumentParser:
        made = sub.add_parser(
            name,
            help=helptext,
            description=textwrap.fill(description, 78),
            epilog=EPILOG,
            formatter_class=fmt,
            usage=usage,
        )
        assert isinstance(made, _Parser)  # add_subparsers makes them of the parent's class
        parser.commands[name] = made
        return made

    add(
        "demo",
        "freeze a small worker tree and prove it stopped",
        "Start a tree of worker processes that tick counters, freeze it, show it, prove no "
        "counter moved while frozen, thaw it, show the counters moving again, tear it down.",
    )

    tree = add(
        "tree",
        "show the tree below a process, with states and signal state",
        "Show the processes below PID (PID included) with their state, thread count, "
        "resident memory (RSS) and command line, the tree's total, and warnings for the "
        "signal freezer. Nothing is signalled.",
    )
    tree.add_argument("pid", nargs="?", type=_pid, default=1, metavar="PID", help="default: 1")
    tree.add_argument("--json", action="store_true", help="print the JSON snapshot (schema 1)")
    tree.add_argument(
        "--pss",
        action="store_true",
        help="also read each process's proportional set size (shared pages divided among "
        "their sharers; slower: the kernel walks each process's mappings)",
    )

    def freeze_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "pid", nargs="?", type=_pid, metavar="PID", help="root of the tree (frozen too)"
        )
        p.add_argument(
            "--cgroup",
            metavar="PATH",
            help="instead of a tree: freeze this cgroup directory whole (a service's, a "
            "container's); not one that holds treeguard",
        )
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
            default=None,
            help="how to freeze (default: signal)",
        )
        p.add_argument(
            "--timeout",
            type=_seconds,
            default=1.0,
            metavar="S",
            help="seconds the freeze may take (default: 1)",
        )
        p.add_argument(
            "--partial-ok",
            action="store_true",
            help="skip (and report) processes that may not be signalled instead of failing",
        )

    freeze = add(
        "freeze",
        "freeze a tree while a command runs",
        "Freeze the tree rooted at PID (PID included), run CMD, thaw, and exit with CMD's "
        "status. Ctrl-C, SIGTERM or SIGHUP during CMD still thaw the tree, and a watchdog "
        "helper thaws it if treeguard itself dies (kill -9; with --backend ptrace the "
        "kernel does).",
        usage=f"treeguard freeze [-h] [--exclude PID] [--backend {{{','.join(BACKENDS)}}}] "
        "[--timeout S] [--partial-ok] {PID | --cgroup PATH} -- CMD [ARGS ...]",
    )
    parser.commands["freeze"].usage_status = EXIT_OWN
    freeze_options(freeze)

    pause = add(
        "pause",
        "freeze a tree and save a token to resume it later",
        "Freeze the tree rooted at PID (PID included) and leave it frozen; the state file "
        "(created with mode 0600, never overwritten) lets `treeguard resume` thaw it. Each "
        "process is recorded in the state file before it is stopped, so that `resume` also "
        "undoes a pause that was cut short; a pause killed while it freezes is thawed by its "
        "watchdog helper. With --max-frozen, that helper stays and thaws the tree when the "
        "lease runs out (`resume` before then stops it). A tree with nothing left to stop "
        "(frozen already) is refused. Not with --backend ptrace (its hold ends with "
        "treeguard).",
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
        "whose start time differs from the record is never signalled. A state file whose "
        "pause still runs is refused: resume once that pause has ended.",
    )
    resume.add_argument("--state", required=True, metavar="FILE", help="state file to read")

    status = add(
        "status",
        "tell whether a paused tree (or a PID's tree) is frozen now",
        "Tell whether the tree a state file records (--state), or the tree rooted at PID, "
        "is frozen now, by which backend (signal: tasks stopped; ptrace: tasks in tracing "
        "stop; cgroup: its cgroup frozen), since when (the state file's time), and whether "
        "the lease's helper still runs. Exit status 0 if frozen, 8 if not. Nothing is "
        "signalled; each process is checked by its identity, not its PID alone.",
    )
    which = status.add_mutually_exclusive_group(required=True)
    which.add_argument("pid", nargs="?", type=_pid, metavar="PID", help="root of a tree")
    which.add_argument("--state", metavar="FILE", help="state file written by pause")
    status.add_argument("--json", action="store_true", help="print JSON (schema 1)")
    add_doctor(add)
    return parser


# -- subcommands --------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run

    return run()


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _cmd_demo,
    "tree": cmd_tree,
    "freeze": cmd_freeze,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "status": cmd_status,
    "doctor": cmd_doctor,
}


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; everything after the first ``--`` is CMD, options included (split
    off before argparse sees it: argparse.REMAINDER would also swallow treeguard's own
    options after PID)."""
    cmd: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, cmd = argv[:at], argv[at + 1 :]
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "freeze" and extra and not cmd:
        given = list(argv)
        for word in extra:  # argparse keeps the order; options may follow the words
            given.remove(word)
        shown = shlex.join([*given, "--", *extra])
        parser.commands["freeze"].error(
            f"unexpected {shlex.join(extra)!r}: did you mean `treeguard {shown}`? (CMD "
            "comes after '--')"
        )
    if extra:
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if cmd and args.command != "freeze":
        parser.error(f"'--' is only for 'treeguard freeze', not '{args.command}'")
    args.cmd = cmd
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return its exit status (see :data:`EPILOG`).

    :param argv: the arguments (default: ``sys.argv[1:]``).
    """
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    try:
        status = _run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except BrokenPipeError:
        # The reader went away (`tree --json | head`): stop quietly, as `ps` does. Python
        # ignores SIGPIPE, so the write failed with EPIPE (signal(7)); the rest of the
        # output goes nowhere, so that the flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE


def _run(args: argparse.Namespace) -> int:
    """Run one subcommand; turn its failure into one line on stderr and an exit status."""
    own = args.command == "freeze"  # CMD's status passes through: its own are 125..127
    try:
        return _COMMANDS[args.command](args)
    except FrozenInterrupt as err:  # the tree was thawed before this propagated
        print(f"treeguard: {err}", file=sys.stderr)
        return 128 + err.signum
    except CannotRun as err:
        print(f"treeguard: error: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        print("treeguard: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        raise
    except (FreezeError, OSError) as err:
        print(f"treeguard: error: {_describe(err)}", file=sys.stderr)
        return EXIT_OWN if own else _status_of(err)
