"""Freeze here, thaw elsewhere: tokens against real trees, thawed in this and other processes."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

import treeguard
from tests import proc
from tests.conftest import IN_CI, slot
from tests.integration import test_reliability
from tests.integration.test_reliability import _relay_settled
from treeguard._thaw import has_pidfs
from treeguard._workers import WorkerTree, demo_spec, wide
from treeguard.procfs import ProcFS

MakeTree = Callable[..., WorkerTree]
# A fixture of that module, used here too: ``su`` above a sleeper, torn down whatever happens.
relay = test_reliability.relay

THAW_FROM_STDIN = (
    "import sys, treeguard\nprint(treeguard.thaw(treeguard.Token.from_json(sys.stdin.read())))\n"
)


def _thaw_elsewhere(text: str) -> subprocess.CompletedProcess[str]:
    """Thaw a token in a fresh interpreter, which knows nothing but the JSON."""
    return subprocess.run(
        [sys.executable, "-c", THAW_FROM_STDIN],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _starttime(pid: int) -> int:
    stat = ProcFS().stat(pid)
    assert stat is not None
    return stat.starttime


def _running(tree: WorkerTree, indexes: list[int] | None = None) -> None:
    chosen = range(tree.size) if indexes is None else indexes
    proc.wait_until(lambda: not proc.stopped([tree.pids[i] for i in chosen]), what="a thaw")
    proc.counters_moving(tree.counters, [slot(i) for i in chosen])


@pytest.fixture
def frozen(make_tree: MakeTree) -> Iterator[tuple[WorkerTree, treeguard.Token]]:
    """A ticking tree frozen into a token; thawed afterwards whatever the test did."""
    tree = make_tree(demo_spec())
    token = treeguard.freeze(tree.root, include_root=True)
    try:
        yield tree, token
    finally:
        treeguard.thaw(token)


def test_the_token_owns_the_freeze(frozen: tuple[WorkerTree, treeguard.Token]) -> None:
    tree, token = frozen
    assert set(token.pids) == set(tree.pids)
    assert token.pids[0] == tree.root  # stop order: parent-first
    assert token.identities == tuple((p, _starttime(p)) for p in token.pids)
    gc.collect()  # no guard object left to thaw on collection
    proc.assert_all_stopped(tree.pids)
    assert proc.counters_still(tree.counters, tree.period)
    assert treeguard.thaw(token) == tree.size
    _running(tree)
    assert treeguard.thaw(token) == tree.size  # twice: harmless, the tree just runs on
    _running(tree)


def test_thawed_by_another_process(frozen: tuple[WorkerTree, treeguard.Token]) -> None:
    tree, token = frozen
    done = _thaw_elsewhere(token.to_json())
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == tree.size
    _running(tree)


FULL_TABLE_THAW = """
import json, os, sys, treeguard
token = treeguard.Token.from_json(sys.stdin.read())
filler = []
while True:  # the whole table, to the last slot
    try:
        filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        break
try:
    treeguard.thaw(token)
    outcome = ["thawed"]
except treeguard.FreezeError as err:
    outcome = [type(err).__name__, str(err)]
for fd in filler:
    os.close(fd)
outcome.append(treeguard.thaw(token))  # again, with descriptors: the rest
print(json.dumps(outcome))
"""


def test_a_full_table_is_not_taken_for_a_permission_problem(
    frozen: tuple[WorkerTree, treeguard.Token],
) -> None:
    # A process whose descriptor table is full cannot open the pidfds a thaw needs: it says
    # so (not "may not be signalled"), names what it could not resume, and a second thaw
    # once descriptors are free resumes every process.
    tree, token = frozen
    done = subprocess.run(
        [sys.executable, "-c", FULL_TABLE_THAW],
        input=token.to_json(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    kind, message, resumed = json.loads(done.stdout)
    assert kind == "FreezeError", message
    assert "no file descriptor" in message and "thaw again" in message
    assert resumed == tree.size
    _running(tree)


def test_a_pid_with_another_starttime_is_not_signalled(make_tree: MakeTree) -> None:
    """A record whose starttime differs names a different process: the other process must
    thaw only the matching record and leave the live process with that PID stopped."""
    tree = make_tree(wide(3))
    good, wrong = tree.pids[1], tree.pids[2]
    with treeguard.ProcessesGuard(tree.root, include_root=True):
        forged = treeguard.Token(
            "signal",
            {
                "stopped": [[good, _starttime(good)], [wrong, _starttime(wrong) + 1]],
                "already_stopped": [],
            },
        )
        done = _thaw_elsewhere(forged.to_json())
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) == 1
        _running(tree, [1])  # the matching record was thawed (both were handled by then)
        assert proc.not_stopped([wrong]) == {}
        assert proc.counters_still(lambda: tree.counters()[slot(2) : slot(2) + 1], tree.period)
        proc.assert_all_stopped([tree.root, wrong])
    _running(tree)


def test_the_pidfs_inode_decides_where_the_kernel_has_one(make_tree: MakeTree) -> None:
    """Two processes can share (pid, starttime) when a PID is reused within one clock tick;
    a token records each process's pidfs inode too (Linux 6.9+), and a record whose inode
    is not the live process's is never signalled, though its starttime matches."""
    if not has_pidfs():  # CI's kernel has it: never skip there
        (pytest.fail if IN_CI else pytest.skip)("no pidfs on this kernel (Linux < 6.9)")
    tree = make_tree(wide(3))
    good, wrong = tree.pids[1], tree.pids[2]
    with treeguard.ProcessesGuard(tree.root, include_root=True) as guard:
        records = guard._backend.describe()["stopped"]  # type: ignore[union-attr]
        inodes = {pid: inode for pid, _, inode in records}  # type: ignore[misc]
        fds = [os.pidfd_open(pid) for pid in (good, wrong)]
        try:  # what the kernel says, independently of treeguard
            assert inodes[good] == os.fstat(fds[0]).st_ino
            assert inodes[wrong] == os.fstat(fds[1]).st_ino
        finally:
            for fd in fds:
                os.close(fd)
        forged = treeguard.Token(
            "signal",
            {
                "stopped": [
                    [good, _starttime(good), inodes[good]],
                    [wrong, _starttime(wrong), inodes[wrong] + 1],  # "the same tick, reused"
                ],
                "already_stopped": [],
            },
        )
        done = _thaw_elsewhere(forged.to_json())
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) == 1
        _running(tree, [1])
        assert proc.counters_still(lambda: tree.counters()[slot(2) : slot(2) + 1], tree.period)
        proc.assert_all_stopped([tree.root, wrong])
    _running(tree)


def test_a_process_that_is_gone_is_skipped(frozen: tuple[WorkerTree, treeguard.Token]) -> None:
    tree, token = frozen
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_identity = [gone.pid, _starttime(gone.pid)] if ProcFS().stat(gone.pid) else None
    gone.wait()
    payload = token.payload
    if gone_identity is not None:
        payload["stopped"].insert(0, gone_identity)
    payload["stopped"].insert(0, [4 * 1024 * 1024, 1])  # a PID nobody has here
    assert treeguard.thaw(treeguard.Token("signal", payload)) == tree.size
    _running(tree)


def test_a_token_without_relays_still_thaws(frozen: tuple[WorkerTree, treeguard.Token]) -> None:
    """A token written without the ``relays`` member (it is optional) thaws its tree."""
    tree, token = frozen
    payload = token.payload
    assert payload.pop("relays") == []  # the tree's parent is this process: no relay
    old = treeguard.Token.from_json(treeguard.Token("signal", payload).to_json())
    assert "relays" not in old.payload
    assert treeguard.thaw(old) == tree.size
    _running(tree)


def test_processes_already_stopped_stay_stopped(make_tree: MakeTree) -> None:
    tree = make_tree(wide(3))
    held = tree.pids[2]
    os.kill(held, signal.SIGSTOP)
    try:
        proc.wait_until(lambda: proc.stopped([held]), what="the SIGSTOP")
        token = treeguard.freeze(tree.root, include_root=True)
        try:
            assert token.already_stopped == ((held, _starttime(held)),)
            assert held not in token.pids
            again = treeguard.Token.from_json(token.to_json())
        finally:
            treeguard.thaw(again)
        _running(tree, [0, 1])
        proc.assert_all_stopped([held])
    finally:
        os.kill(held, signal.SIGCONT)
    _running(tree)


def test_a_tampered_token_signals_nobody(frozen: tuple[WorkerTree, treeguard.Token]) -> None:
    tree, token = frozen
    text = token.to_json()
    for bad in (
        text.replace('"version":1', '"version":7'),
        text.replace(f"[{tree.root},", f"[{tree.root + 1},", 1),
        text[:-2],
    ):
        assert bad != text
        done = _thaw_elsewhere(bad)
        assert done.returncode != 0
        assert "TokenError" in done.stderr
    proc.assert_all_stopped(tree.pids)
    assert proc.counters_still(tree.counters, tree.period)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"watchdog": True},
        {"max_frozen": 5.0},
        {"root": -3},
        {"timeout": "1"},
        {"colour": "blue"},
    ],
)
def test_bad_arguments_touch_nothing(kwargs: dict[str, object], make_tree: MakeTree) -> None:
    tree = make_tree(wide(2))
    with pytest.raises(treeguard.InvalidArgumentError):
        treeguard.freeze(**kwargs)  # type: ignore[arg-type]
    assert not proc.stopped(tree.pids)


# -- a job-control relay above the tree ----------------------------------------------------


@pytest.mark.parametrize("where", ["here", "elsewhere"])
def test_a_relay_above_the_tree_is_resumed(
    relay: Callable[[str], tuple[int, int]], where: str
) -> None:
    """``su`` waits for its child with WUNTRACED and stops itself when the child stops: a
    job-control relay above the frozen tree. The token names it, and its thaw, in this
    process or another, resumes it after the tree, as a guard's own thaw does."""
    su, child = relay("su")
    token = treeguard.freeze(child, include_root=True)
    try:
        proc.assert_all_stopped([child])
        proc.wait_until(lambda: proc.state(su) == "T", 5, "su to relay the stop")
    finally:
        if where == "here":
            treeguard.thaw(token)
        else:
            done = _thaw_elsewhere(token.to_json())
    if where == "elsewhere":
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) == 1  # the processes of the tree; not the relay
    proc.wait_until(lambda: _relay_settled(su, child), 5, "su and its child to run on")
    proc.assert_none_stopped([su, child])
    (pid, start, *inode), *others = token.payload["relays"]
    assert (pid, start, others) == (su, proc.starttime(su), [])
    if inode and inode[0]:
        fd = os.pidfd_open(su)  # what the kernel says, independently of treeguard
        try:
            assert inode == [os.fstat(fd).st_ino]
        finally:
            os.close(fd)


def test_a_relay_is_resumed_only_if_it_is_the_one_that_relayed(
    relay: Callable[[str], tuple[int, int]],
) -> None:
    """A parent stopped before the freeze relayed nothing: it is not named, and stays
    stopped. A record of a relay whose starttime or inode is not the live process's names
    another process: that one is never resumed. The record that matches resumes it."""
    su, child = relay("su")
    os.kill(su, signal.SIGSTOP)  # su is this test's, started by the fixture
    try:
        proc.wait_until(lambda: proc.state(su) == "T", 5, "su to stop")
        token = treeguard.freeze(child, include_root=True)
        try:
            assert token.payload["relays"] == []
        finally:
            assert treeguard.thaw(token) == 1
        proc.assert_none_stopped([child])
        proc.assert_all_stopped([su])
        start = proc.starttime(su)
        forged = [[su, start + 1]]
        if has_pidfs():
            fd = os.pidfd_open(su)
            try:
                forged.append([su, start, os.fstat(fd).st_ino + 1])
            finally:
                os.close(fd)
        for record in forged:
            empty = {"stopped": [], "already_stopped": []}
            assert treeguard.thaw(treeguard.Token("signal", {**empty, "relays": [record]})) == 0
            proc.assert_all_stopped([su])
        # The control: the true record resumes it, so the checks above could have failed.
        treeguard.thaw(treeguard.Token("signal", {**empty, "relays": [[su, start]]}))
        proc.assert_none_stopped([su])
    finally:
        os.kill(su, signal.SIGCONT)
    proc.wait_until(lambda: _relay_settled(su, child), 5, "su and its child to run on")
