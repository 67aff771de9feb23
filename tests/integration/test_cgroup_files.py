"""A cgroup v2 freezer's files held open (treeguard._cgroupfiles) on real cgroups: a thaw
that needs no descriptor, a cgroup made again under the same path, descriptors closed with
their owner, a forked child that opens its own. And the thaw of a v2 or v1 cgroup by
another process (thaw_cgroup), whose check of the directory and write go through one
descriptor of it.

What treeguard holds is looked at through /proc/self/fd (the target of each descriptor, its
inode), and whether a cgroup is frozen through its own files, read by path.
"""

from __future__ import annotations

import errno
import gc
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tests import proc
from tests.conftest import MakeCgroup, slot
from treeguard import ProcessesGuard, _thaw
from treeguard._backends._freezers import CgroupFreezer, V2Freezer, thaw_cgroup
from treeguard._drive import run_sync
from treeguard._report import FreezeReport
from treeguard._workers import WorkerTree, demo_spec, wide
from treeguard.cgroup import Cgroup


def _main_slots(tree: WorkerTree) -> list[int]:
    return [slot(i) for i in range(tree.size)]


def _frozen(path: str) -> bool:
    """What the cgroup's own cgroup.events says, read by path."""
    return "frozen 1" in proc.read_text(os.path.join(path, "cgroup.events")).splitlines()


def _held(path: str) -> dict[int, str]:
    """This process's descriptors of ``path`` (the directory) or of a file in it."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if target.removesuffix(" (deleted)") == path or target.startswith(path + "/"):
            found[int(name)] = target.removesuffix(" (deleted)")
    return found


def _open_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class FullTable:
    """Fills this process's descriptor table (os.dup until EMFILE, under a limit a few dozen
    slots above what is open), and frees it again."""

    def __init__(self) -> None:
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.dups: list[int] = []

    def fill(self) -> None:
        top = max(int(name) for name in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 64, self.limits[1]))
        while True:
            try:
                self.dups.append(os.dup(0))
            except OSError as err:
                assert err.errno == errno.EMFILE
                return

    def free(self) -> None:
        dups, self.dups = self.dups, []
        for fd in dups:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)


@pytest.fixture
def full_table() -> Iterator[FullTable]:
    table = FullTable()
    try:
        yield table
    finally:
        table.free()


@pytest.mark.parametrize("face", ["Cgroup.freeze", "guard"])
def test_the_thaw_works_with_a_full_descriptor_table(
    face: str,
    cgroup: MakeCgroup,
    make_tree: Callable[..., WorkerTree],
    full_table: FullTable,
) -> None:
    # Frozen first; then not one descriptor is left, and the thaw must still be written and
    # confirmed: through the descriptors the freeze holds, without even spending the two
    # kept in reserve for a thaw that must open something.
    cg = cgroup(2)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    guard = ProcessesGuard(tree.root, include_root=True, backend="cgroup")
    if face == "guard":
        guard.freeze()
    else:
        cg.freeze()
    try:
        assert _frozen(cg.path)
        assert proc.counters_still(tree.counters, tree.period)
        reserve = len(_thaw._reserve)
        assert reserve == 2
        full_table.fill()
        with pytest.raises(OSError, match="Too many open files"):
            os.open("/dev/null", os.O_RDONLY)
        if face == "guard":
            guard.release()
        else:
            cg.thaw()
        assert len(_thaw._reserve) == reserve  # not spent: nothing was opened
        full_table.free()
    finally:
        full_table.free()
        guard.release()  # (idempotent) with the table free again, if the above failed
        cg.thaw()
    assert not guard.frozen
    assert not _frozen(cg.path)
    assert proc.read_text(os.path.join(cg.path, "cgroup.freeze")).strip() == "0"
    proc.counters_moving(tree.counters, _main_slots(tree))
    guard.close()


def test_a_cgroup_made_again_under_the_same_path_is_frozen_through_its_own_files(
    cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    cg = cgroup(2)
    sleeper = cg.spawn(["sleep", "60"])
    cg.freeze()
    cg.thaw()
    old = _held(cg.path)
    old_inode = os.stat(cg.path).st_ino
    assert old, "the Cgroup holds its files from one freeze to the next"
    cg.kill()
    assert sleeper.wait(10) < 0
    # Removed and made again behind the Cgroup's back: another directory (inode).
    os.rmdir(cg.path)
    os.mkdir(cg.path)
    assert os.stat(cg.path).st_ino != old_inode
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    report = cg.freeze()
    try:
        assert _frozen(cg.path)
        assert proc.counters_still(tree.counters, tree.period)
        assert report.stopped == tree.size
        # Everything it holds now is of the new cgroup: the old descriptors were closed.
        held = _held(cg.path)
        assert held
        for fd, target in held.items():
            assert os.fstat(fd).st_ino == os.stat(target).st_ino, (fd, target)
    finally:
        cg.thaw()
    assert not _frozen(cg.path)
    proc.counters_moving(tree.counters, _main_slots(tree))


def test_a_cgroup_removed_while_frozen_is_thawed_through_nothing_else(
    cgroup: MakeCgroup,
) -> None:
    # The freezer froze an (empty) cgroup that is then removed and made again, frozen by
    # someone else: its thaw reaches the removed one only (ENODEV), never the new one.
    cg = cgroup(2)
    freezer = V2Freezer(cg.path)
    run_sync(freezer.freeze(1.0, FreezeReport()))
    assert freezer.froze and _frozen(cg.path)
    os.rmdir(cg.path)
    os.mkdir(cg.path)
    control = os.path.join(cg.path, "cgroup.freeze")
    with open(control, "w") as f:
        f.write("1")
    try:
        run_sync(freezer.thaw())
        assert not freezer.froze  # gone: nothing left to thaw
        assert proc.read_text(control).strip() == "1"
        assert _frozen(cg.path)
        assert _held(cg.path) == {}  # its own files, closed once the thaw was done
    finally:
        with open(control, "w") as f:
            f.write("0")


#: Per version: the control file, what freezes and what thaws, written by path.
_CONTROL = {2: ("cgroup.freeze", "1", "0"), 1: ("freezer.state", "FROZEN", "THAWED")}


def _write_control(version: int, path: str, value: str) -> None:
    with open(os.path.join(path, _CONTROL[version][0]), "w") as f:
        f.write(value)


def _frozen_v(version: int, path: str) -> bool:
    """What the kernel says of the v2 or v1 cgroup ``path``, read by path."""
    if version == 2:
        return _frozen(path)
    return proc.read_text(os.path.join(path, "freezer.state")).strip() == "FROZEN"


@pytest.mark.parametrize("version", [2, 1])
def test_a_cgroup_made_again_between_the_check_and_the_write_is_not_thawed(
    version: int, cgroup: MakeCgroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # thaw_cgroup (a token's, the watchdog helper's, `treeguard resume`'s) checks the
    # directory's inode, then writes the thaw. A cgroup removed and made again under the
    # same name in between, and frozen by someone else on purpose, is another cgroup: it
    # stays frozen, and the thaw counts its own cgroup as gone.
    outer = cgroup(version)  # removes what is left below it, even if this test fails
    path = os.path.join(outer.path, "target")
    os.mkdir(path)
    try:
        _write_control(version, path, _CONTROL[version][1])  # as a token's freeze left it
        proc.wait_until(lambda: _frozen_v(version, path), what="the first one frozen")
        inode = os.stat(path).st_ino
        made_again: list[int] = []
        write_control = CgroupFreezer.write_control

        def made_again_first(freezer: CgroupFreezer, value: str) -> None:
            # The window: after the check of the inode, before the thaw is written.
            if not made_again:
                os.rmdir(path)  # (empty: frozen or not, it may be removed)
                os.mkdir(path)
                made_again.append(os.stat(path).st_ino)
                _write_control(version, path, _CONTROL[version][1])
                proc.wait_until(lambda: _frozen_v(version, path), what="the new one frozen")
            write_control(freezer, value)

        monkeypatch.setattr(CgroupFreezer, "write_control", made_again_first)
        thawed = thaw_cgroup(version, path, inode)
        monkeypatch.undo()
        assert made_again and made_again[0] != inode
        assert os.stat(path).st_ino == made_again[0]
        assert _frozen_v(version, path)
        assert thawed == 0
        assert _held(path) == {}  # nothing left open
    finally:
        monkeypatch.undo()
        if os.path.isdir(path):
            _write_control(version, path, _CONTROL[version][2])
            os.rmdir(path)


@pytest.mark.parametrize("version", [2, 1])
def test_a_thaw_by_another_process_works_with_a_full_descriptor_table(
    version: int,
    cgroup: MakeCgroup,
    make_tree: Callable[..., WorkerTree],
    full_table: FullTable,
) -> None:
    # thaw_cgroup holds the directory open and opens its files relative to it: with not
    # one descriptor free, the two kept in reserve must do for the write and the wait.
    cg = cgroup(version)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    _write_control(version, cg.path, _CONTROL[version][1])
    proc.wait_until(lambda: _frozen_v(version, cg.path), what="the cgroup frozen")
    inode = os.stat(cg.path).st_ino
    _thaw.keep_reserve()
    assert len(_thaw._reserve) == 2
    try:
        full_table.fill()
        with pytest.raises(OSError, match="Too many open files"):
            os.open("/dev/null", os.O_RDONLY)
        thawed = thaw_cgroup(version, cg.path, inode)
        full_table.free()
        assert thawed == 1
        assert not _frozen_v(version, cg.path)
    finally:
        full_table.free()
        _write_control(version, cg.path, _CONTROL[version][2])
    assert _held(cg.path) == {}
    proc.counters_moving(tree.counters, _main_slots(tree))


def test_a_reserve_above_a_lowered_limit_is_moved_under_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reserve was opened while hundreds of descriptors were open, so it is numbered
    # high; the supervisor then closes those and lowers its limit under the reserve.
    # Closing the reserve would then free no slot the limit lets be used: the next freeze
    # must move it lower, and a thaw with a full table must still open its file.
    monkeypatch.setattr(_thaw, "_reserve", [])
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    padding = [os.open("/dev/null", os.O_RDONLY) for _ in range(300)]
    try:
        _thaw.keep_reserve()
    finally:
        for fd in padding:
            os.close(fd)
    high = list(_thaw._reserve)
    assert len(high) == 2 and min(high) >= 300
    dups: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(high), limits[1]))
        _thaw.keep_reserve()
        assert len(_thaw._reserve) == 2 and max(_thaw._reserve) < min(high)
        assert not set(_thaw._reserve) & set(high)
        for fd in high:  # the old ones are closed
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.fstat(fd)
        while True:
            try:
                dups.append(os.dup(0))
            except OSError as err:
                assert err.errno == errno.EMFILE
                break
        fd = _thaw.open_file("/dev/null", os.O_RDONLY)  # spends the reserve, and opens
        _thaw.close_fd(fd)
    finally:
        for fd in dups:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        for fd in _thaw._reserve:
            os.close(fd)


def test_descriptors_are_closed_with_their_owner(
    cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    cg = cgroup(2)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    # Once for what a process opens once for all (the reserve, the mount table).
    with ProcessesGuard(tree.root, include_root=True, backend="cgroup") as warm:
        pass
    warm.close()
    gc.collect()  # what earlier tests left to the collector (kept descriptors) goes now
    before = _open_count()
    assert _held(cg.path) == {}

    # A freezer of its own closes them once its thaw is confirmed.
    freezer = V2Freezer(cg.path)
    run_sync(freezer.freeze(1.0, FreezeReport()))
    assert _held(cg.path)
    run_sync(freezer.thaw())
    assert _held(cg.path) == {} and _open_count() == before

    # A Cgroup object keeps them from one freeze to the next, until it is collected...
    other = Cgroup(cg.path)
    other.freeze()
    other.thaw()
    kept = _held(cg.path)
    assert kept
    other.freeze()
    other.thaw()
    assert _held(cg.path) == kept  # the same descriptors, not opened again
    del other
    gc.collect()
    assert _held(cg.path) == {} and _open_count() == before

    # ... or removed (here by the fixture's own Cgroup, which froze it too).
    cg.freeze()
    cg.thaw()
    assert _held(cg.path)
    cg._close_files()
    assert _held(cg.path) == {} and _open_count() == before

    # A guard keeps them (and its process events) until it is closed, or collected.
    for end in ("close", "collect"):
        guard = ProcessesGuard(tree.root, include_root=True, backend="cgroup")
        for _ in range(3):
            with guard:
                assert _frozen(cg.path)
            assert _held(cg.path)
        if end == "close":
            guard.close()
        else:
            del guard
            gc.collect()
        assert _held(cg.path) == {} and _open_count() == before
    proc.counters_moving(tree.counters, _main_slots(tree))


@pytest.mark.parametrize("face", ["Cgroup.freeze", "guard"])
def test_a_forked_child_opens_its_own(
    face: str, cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    # The child's copies of the parent's descriptors are made to point at /dev/null: a
    # child that used them would read nothing and write into the void, and its freeze
    # would time out instead of freezing the cgroup.
    cg = cgroup(2)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    guard = ProcessesGuard(tree.root, include_root=True, backend="cgroup", timeout=2.0)
    for _ in range(2):
        if face == "guard":
            with guard:
                pass
        else:
            cg.freeze()
            cg.thaw()
    inherited = _held(cg.path)
    assert inherited

    def child() -> str:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in inherited:
            os.dup2(null, fd)
        if face == "guard":
            guard.freeze()
        else:
            cg.freeze(timeout=2.0)
        frozen = _frozen(cg.path)
        if face == "guard":
            guard.release()
        else:
            cg.thaw()
        return f"{frozen} {_frozen(cg.path)}"

    out = proc.in_child(child)
    assert out == "True False"  # frozen by the child, thawed by it
    # The parent's own descriptors are untouched, and still serve it.
    assert _held(cg.path) == inherited
    if face == "guard":
        with guard:
            assert _frozen(cg.path)
    else:
        cg.freeze()
        assert _frozen(cg.path)
        cg.thaw()
    assert not _frozen(cg.path)
    guard.close()
    proc.counters_moving(tree.counters, _main_slots(tree))


MANY_THREADS = r"""
import sys, threading
done = threading.Event()
for _ in range(999):
    threading.Thread(target=done.wait, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_task_list_longer_than_one_read_is_read_whole(cgroup: MakeCgroup) -> None:
    # One read of a kernfs seq file returns at most a page: 1,000 threads list in about
    # 6 KiB, which the census must read to its end.
    cg = cgroup(2)
    child = cg.spawn(
        [sys.executable, "-c", MANY_THREADS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "ready\n"
        tasks = len(os.listdir(f"/proc/{child.pid}/task"))
        assert tasks == 1000
        assert len(proc.read_text(os.path.join(cg.path, "cgroup.threads"))) > 4096
        report = cg.freeze()
        try:
            assert report.tasks == tasks
            assert report.stopped == 1
            assert _frozen(cg.path)
        finally:
            cg.thaw()
        for _ in range(2):
            with ProcessesGuard(child.pid, include_root=True, backend="cgroup") as guard:
                assert guard.report.tasks == tasks
                assert _frozen(cg.path)
        assert not _frozen(cg.path)
    finally:
        child.stdin.close()
        assert child.wait(10) == 0
        child.stdout.close()


@pytest.fixture
def high_descriptors() -> Iterator[None]:
    """Every descriptor number up to 1,100 taken, so that the next ones opened are past
    1,023, out of ``select()``'s reach (a supervisor with many files open)."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limits[0] < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, limits[1]), limits[1]))
    taken = []
    try:
        while not taken or taken[-1] < 1100:
            taken.append(os.dup(0))
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


@pytest.mark.parametrize("backend", ["cgroup", "signal"])
def test_a_supervisor_with_descriptors_past_1023_freezes_and_thaws(
    high_descriptors: None,
    backend: str,
    cgroup: MakeCgroup,
    make_tree: Callable[..., WorkerTree],
) -> None:
    cg = cgroup(2)
    # Enough tasks for the cgroup freeze to be written by a thread, which says through an
    # eventfd when it is over; the tree's start is waited for past 1,023 too.
    tree = make_tree(wide(60), spawn=cg.spawn)
    guard = ProcessesGuard(tree.root, include_root=True, backend=backend)  # type: ignore[arg-type]
    for _ in range(2):
        with guard:
            if backend == "cgroup":
                assert proc.read_text(f"{cg.path}/cgroup.events").count("frozen 1") == 1
            else:
                proc.assert_all_stopped(tree.pids)
        proc.assert_none_stopped(tree.pids)
    guard.close()
