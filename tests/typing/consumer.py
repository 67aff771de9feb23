"""A user's code with option mistakes, for the type check CI runs (``mypy``, strict, with
``warn_unused_ignores``): each mistake is marked with the error mypy must report there, so a
line that stopped being an error fails the check as an unused ignore. Not a test module:
pytest does not collect it, and nothing here runs."""

import treeguard


def mistakes() -> None:
    treeguard.ProcessesGuard(backend="cgroups")  # type: ignore[arg-type]
    treeguard.ProcessesGuard(scope="galaxy")  # type: ignore[arg-type]
    treeguard.ProcessesGuard(tmeout=1.0)  # type: ignore[call-arg]
    treeguard.guard(backend="sigstop")  # type: ignore[arg-type]
    treeguard.guard(tmeout=1.0)  # type: ignore[call-arg]
    treeguard.freeze(watchdog=True)  # type: ignore[call-arg]
    treeguard.freezethaw(lambda a: a, 1, tmeout=1.0)  # type: ignore[call-arg]
    treeguard.freezethaw(lambda a: a, "one", "two")  # type: ignore[arg-type, misc]
    treeguard.ProcesGuard()  # type: ignore[attr-defined]


def correct() -> treeguard.AsyncGuard:
    treeguard.freezethaw(lambda a: a, 1, timeout=1.0)
    with treeguard.ProcessesGuard(1, backend="cgroup", scope="tree", timeout=1.0) as g:
        assert g.report.stopped >= 0
    return treeguard.guard(1, monitor_pid=2, backend="cgroup", watchdog=True)
