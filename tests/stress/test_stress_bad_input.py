"""Bad input for every public entry point: one clear treeguard error, and no process touched.

Each case runs next to a live tree (module-wide) and checks afterwards that no task of it
stopped, that its counters move, and that no helper process was started.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

import treeguard
from tests import proc
from tests.stress._figures import add_figures
from treeguard import (
    FreezeError,
    InvalidArgumentError,
    NoSuchProcessError,
    ProcessesGuard,
    Token,
    TokenError,
)
from treeguard._workers import WorkerTree, wide

pytestmark = pytest.mark.slow

HUGE = (4 * 1024 * 1024 + 1, 2**31, 2**64)


def nonexistent_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) - 1
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


GONE = nonexistent_pid()
WRONG_PIDS: tuple[object, ...] = ("1", 1.0, True, None, [1], -1, 0, *HUGE)
WRONG_SECONDS: tuple[object, ...] = (
    "1",
    None,
    True,
    -1,
    0,
    math.nan,
    math.inf,
    -math.inf,
    10**400,
    1e300,
)


def guard_options() -> Iterator[tuple[str, dict[str, Any]]]:
    for value in WRONG_PIDS:
        if value is not None:
            yield f"root={value!r}", {"root": value}
    for value in (5, "12", b"12", [-1], [0], ["1"], [2**40], [None]):
        yield f"exclude={value!r}", {"exclude": value}
    for value in WRONG_SECONDS:
        yield f"timeout={value!r}", {"timeout": value}
    for value in (0, -1, 1.5, "3", True, None):
        yield f"max_passes={value!r}", {"max_passes": value}
    for name in ("partial_ok", "watchdog", "subreaper", "include_root"):
        for value in (1, "yes", None):
            yield f"{name}={value!r}", {name: value}
    for value in ("x", 1, None, "SIGNAL"):
        yield f"scope={value!r}", {"scope": value}
        yield f"backend={value!r}", {"backend": value}
    for value in WRONG_SECONDS:
        if value is not None:
            yield f"max_frozen={value!r}", {"max_frozen": value}
    yield "include_root without root", {"include_root": True}
    yield "include_root of PID 1", {"root": 1, "include_root": True}
    yield "include_root of the caller", {"root": os.getpid(), "include_root": True}
    yield "namespace with root", {"scope": "namespace", "root": 1}


async def enter_guard(**options: Any) -> None:
    async with treeguard.guard(**options):
        raise AssertionError("entered a guard with bad input")


def cases() -> Iterator[Any]:
    """``(id, call, expected error)`` for every entry point and every kind of bad input."""
    for label, options in guard_options():
        yield pytest.param(
            lambda o=options: ProcessesGuard(**o),
            InvalidArgumentError,
            id=f"ProcessesGuard {label}",
        )
        yield pytest.param(
            lambda o=options: treeguard.freezethaw(lambda: None, **o),
            InvalidArgumentError,
            id=f"freezethaw {label}",
        )
        yield pytest.param(
            lambda o=options: anyio.run(lambda: enter_guard(**o)),
            InvalidArgumentError,
            id=f"guard {label}",
        )
        if label.split("=")[0] not in ("watchdog", "max_frozen"):
            yield pytest.param(
                lambda o=options: treeguard.freeze(**o), InvalidArgumentError, id=f"freeze {label}"
            )
    # A PID that names no process: a clear error when the freeze starts, nothing signalled.
    yield pytest.param(
        lambda: ProcessesGuard(root=GONE).freeze(), NoSuchProcessError, id="ProcessesGuard gone"
    )
    yield pytest.param(lambda: treeguard.freeze(root=GONE), NoSuchProcessError, id="freeze gone")
    yield pytest.param(
        lambda: treeguard.freezethaw(lambda: None, root=GONE),
        NoSuchProcessError,
        id="freezethaw gone",
    )
    yield pytest.param(
        lambda: anyio.run(lambda: enter_guard(root=GONE)), NoSuchProcessError, id="guard gone"
    )
    yield pytest.param(lambda: treeguard.snapshot(GONE), NoSuchProcessError, id="snapshot gone")
    # A PID that is a thread, not a process; a monitor that names nothing (a typo must not
    # leave the real monitor to be frozen).
    for label, options, error in (
        ("root=a thread", {"root": THREAD}, InvalidArgumentError),
        ("exclude=[a thread]", {"exclude": [THREAD]}, InvalidArgumentError),
        ("exclude=[gone]", {"exclude": [GONE]}, NoSuchProcessError),
    ):
        yield pytest.param(
            lambda o=options: ProcessesGuard(**o), error, id=f"ProcessesGuard {label}"
        )
        yield pytest.param(lambda o=options: treeguard.freeze(**o), error, id=f"freeze {label}")
        yield pytest.param(
            lambda o=options: anyio.run(lambda: enter_guard(**o)), error, id=f"guard {label}"
        )
    yield pytest.param(
        lambda: treeguard.freeze_child_processes(GONE),
        NoSuchProcessError,
        id="freeze_child_processes monitor_pid=gone",
    )
    yield pytest.param(
        lambda: anyio.run(lambda: enter_guard(monitor_pid=GONE)),
        NoSuchProcessError,
        id="guard monitor_pid=gone",
    )
    # The other entry points' own arguments.
    for value in WRONG_PIDS:
        if value is not None:
            yield pytest.param(
                lambda v=value: treeguard.freeze_child_processes(v),
                InvalidArgumentError,
                id=f"freeze_child_processes monitor_pid={value!r}",
            )
            yield pytest.param(
                lambda v=value: anyio.run(lambda: enter_guard(monitor_pid=v)),
                InvalidArgumentError,
                id=f"guard monitor_pid={value!r}",
            )
            yield pytest.param(
                lambda v=value: treeguard.snapshot(v),
                InvalidArgumentError,
                id=f"snapshot root={value!r}",
            )
    for value in WRONG_SECONDS:
        yield pytest.param(
            lambda v=value: treeguard.freeze_child_processes(timeout=v),
            InvalidArgumentError,
            id=f"freeze_child_processes timeout={value!r}",
        )
    for value in (0, -1, "3"):
        yield pytest.param(
            lambda v=value: treeguard.freeze_child_processes(max_passes=v),
            InvalidArgumentError,
            id=f"freeze_child_processes max_passes={value!r}",
        )
    for value in (5, "12", [-1]):
        yield pytest.param(
            lambda v=value: treeguard.snapshot(exclude=v),
            InvalidArgumentError,
            id=f"snapshot exclude={value!r}",
        )
    yield pytest.param(
        lambda: treeguard.snapshot(include_root="x"),
        InvalidArgumentError,
        id="snapshot include_root",
    )
    yield pytest.param(
        lambda: treeguard.freeze(bogus=1), InvalidArgumentError, id="freeze unknown option"
    )
    yield pytest.param(
        lambda: treeguard.freezethaw(None), InvalidArgumentError, id="freezethaw fn=None"
    )
    yield pytest.param(lambda: treeguard.freezethaw(1), InvalidArgumentError, id="freezethaw fn=1")
    yield pytest.param(
        lambda: treeguard.freezethaw(print, bogus=1),
        InvalidArgumentError,
        id="freezethaw unknown option",
    )
    yield pytest.param(
        lambda: anyio.run(lambda: enter_guard(bogus=1)),
        InvalidArgumentError,
        id="guard unknown option",
    )
    # Tokens: wrong types, garbage, tampering.
    for value in (None, "abc", b"{}", {}, 123, [[1, 2]]):
        yield pytest.param(
            lambda v=value: treeguard.thaw(v), InvalidArgumentError, id=f"thaw {value!r}"
        )
    for text in ("", "garbage", "{}", "[]", "null", "1e999", b"\xff\xfe", '{"format": 1}', 7):
        yield pytest.param(
            lambda t=text: Token.from_json(t), TokenError, id=f"Token.from_json {text!r}"
        )
    good = Token("signal", {"stopped": [[GONE, 12345]], "already_stopped": []}).to_json()
    for old, new in ((str(GONE), str(GONE - 1)), ("12345", "12346"), ("signal", "cgroupX")):
        tampered = good.replace(old, new, 1)
        assert tampered != good
        yield pytest.param(lambda t=tampered: Token.from_json(t), TokenError, id=f"tampered {old}")
    for payload in (
        {"stopped": [[-1, 5]], "already_stopped": []},
        {"stopped": [[0, 5]], "already_stopped": []},
        {"stopped": [[2**40, 5]], "already_stopped": []},
        {"stopped": [[5, -5]], "already_stopped": []},
        {"stopped": [["5", 5]], "already_stopped": []},
        {"stopped": [[5]], "already_stopped": []},
        {"stopped": "all", "already_stopped": []},
        {"stopped": [[5, 1], [5, 1]], "already_stopped": []},
        {"stopped": []},
    ):
        yield pytest.param(
            lambda p=payload: Token("signal", p), TokenError, id=f"Token payload {payload}"
        )


def _a_thread() -> Iterator[int]:
    """The TID of a thread (not a process) that lives as long as the module's tests."""
    import threading

    stop = threading.Event()
    ready: list[int] = []
    worker = threading.Thread(
        target=lambda: (ready.append(threading.get_native_id()), stop.wait()), daemon=True
    )
    worker.start()
    proc.wait_until(lambda: ready, 5, "the thread to start")
    try:
        yield ready[0]
    finally:
        stop.set()
        worker.join()


_THREAD = _a_thread()
THREAD = next(_THREAD)
CASES = list(cases())


@pytest.fixture(scope="module")
def tree() -> Iterator[WorkerTree]:
    with WorkerTree(wide(3, threads=1), period=0.002) as t:
        yield t
    _THREAD.close()
    add_figures(bad_inputs=len(CASES))


def children() -> set[int]:
    with open(f"/proc/self/task/{os.getpid()}/children") as f:
        return {int(p) for p in f.read().split()}


@pytest.mark.parametrize(("call", "error"), CASES)
def test_bad_input_is_refused_and_touches_nothing(
    tree: WorkerTree, call: Callable[[], object], error: type[FreezeError]
) -> None:
    before = children()
    counters = tree.counters()
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, FreezeError)
    assert str(info.value)  # says what is wrong
    if isinstance(info.value, InvalidArgumentError):
        assert info.value.name and info.value.problem
    assert children() == before  # no helper started, nothing forked
    proc.assert_none_stopped(tree.pids)
    proc.wait_until(
        lambda: all(a != b for a, b in zip(tree.counters(), counters, strict=True) if b), 5
    )
