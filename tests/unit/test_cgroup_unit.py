"""cgroup discovery from synthetic /proc text, and the freezers against fake cgroup
directories (plain files in tmp_path) for the paths a real kernel rarely takes."""

from __future__ import annotations

import os
import select
import threading
from pathlib import Path

import pytest

from treeguard import _backends, _cgroupfs
from treeguard._backends import Plan, _freezer_base, _freezer_v1
from treeguard._backends import _census as census_module
from treeguard._backends._freezers import V1Freezer, V2Freezer, thaw_cgroup
from treeguard._drive import YIELD, Steps, run_sync
from treeguard._report import FreezeReport
from treeguard._tree import ChildrenFiles
from treeguard.cgroup import Cgroup, Hierarchy, discover, parse_mountinfo, parse_proc_cgroup
from treeguard.errors import (
    CgroupError,
    CgroupUnavailableError,
    InvalidArgumentError,
    StopTimeoutError,
    TokenError,
)
from treeguard.procfs import ProcFS

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime shared:9 - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PURE_V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
PURE_V1 = (
    "25 24 0:22 / /cg/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    "26 24 0:23 / /cg/free\\040zer rw,nosuid - cgroup cgroup rw,freezer\n"
)
READ_ONLY = "30 23 0:26 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n"
OWN = "6:freezer:/ci/job\n4:cpu,cpuacct:/\n0::/user.slice/session-1.scope\n"


def test_hybrid_machine_has_both_hierarchies() -> None:
    found = parse_mountinfo(HYBRID)
    assert found == [
        Hierarchy(1, "/sys/fs/cgroup/freezer"),
        Hierarchy(2, "/sys/fs/cgroup/unified"),
    ]


def test_pure_v2_and_pure_v1_with_escaped_mountpoint() -> None:
    assert parse_mountinfo(PURE_V2) == [Hierarchy(2, "/sys/fs/cgroup")]
    assert parse_mountinfo(PURE_V1) == [Hierarchy(1, "/cg/free zer")]


def test_read_only_and_bind_mounted_hierarchies() -> None:
    assert parse_mountinfo(READ_ONLY)[0].read_only
    bind = "40 30 0:26 /ci/job /mnt/cg rw - cgroup2 cgroup2 rw\n"
    h = parse_mountinfo(bind)[0]
    assert h.directory("/ci/job/x") == "/mnt/cg/x"
    assert h.directory("/ci/job") == "/mnt/cg"
    assert h.directory("/ci/jobless") is None
    assert h.directory("/other") is None


def test_parse_proc_cgroup() -> None:
    assert parse_proc_cgroup(OWN) == {
        "freezer": "/ci/job",
        "cpu": "/",
        "cpuacct": "/",
        "": "/user.slice/session-1.scope",
    }
    assert parse_proc_cgroup("garbage\n") == {}


def _fake_proc(tmp_path: Path, mountinfo: str, own: str = OWN) -> ProcFS:
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "mountinfo").write_text(mountinfo)
    (tmp_path / "proc" / "self" / "cgroup").write_text(own)
    return ProcFS(str(tmp_path / "proc"))


def test_discover_maps_own_cgroups(tmp_path: Path) -> None:
    found = discover(_fake_proc(tmp_path, HYBRID))
    assert found.own_directory(2) == "/sys/fs/cgroup/unified/user.slice/session-1.scope"
    assert found.own_directory(1) == "/sys/fs/cgroup/freezer/ci/job"


def test_create_without_any_hierarchy_says_what_is_missing(tmp_path: Path) -> None:
    fs = _fake_proc(tmp_path, "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    with pytest.raises(CgroupUnavailableError, match="not mounted"):
        Cgroup.create(procfs=fs)
    with pytest.raises(CgroupUnavailableError, match="freezer controller is not mounted"):
        Cgroup.create(version=1, procfs=fs)


def test_create_on_a_read_only_hierarchy(tmp_path: Path) -> None:
    with pytest.raises(CgroupUnavailableError, match="read-only"):
        Cgroup.create(procfs=_fake_proc(tmp_path, READ_ONLY))


def test_create_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidArgumentError):
        Cgroup.create(version=3)
    with pytest.raises(InvalidArgumentError):
        Cgroup.create(name="../escape")
    with pytest.raises(CgroupUnavailableError):
        Cgroup("/nonexistent/cgroup")


def _fake_v2(tmp_path: Path) -> Path:
    d = tmp_path / "cg"
    d.mkdir()
    (d / "cgroup.freeze").write_text("0\n")
    (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    (d / "cgroup.procs").write_text("")
    (d / "cgroup.threads").write_text("")
    return d


def test_v2_timeout_leaves_the_cgroup_thawed(tmp_path: Path) -> None:
    d = _fake_v2(tmp_path)
    cg = Cgroup(str(d))
    assert cg.version == 2
    with pytest.raises(StopTimeoutError):
        cg.freeze(timeout=0.05)
    assert (d / "cgroup.freeze").read_text().strip() == "0"


def test_v2_frozen_by_someone_else_stays_frozen(tmp_path: Path) -> None:
    d = _fake_v2(tmp_path)
    (d / "cgroup.freeze").write_text("1\n")
    (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    cg = Cgroup(str(d))
    report = cg.freeze(timeout=0.5)
    assert "frozen 1" in report.verified_by
    cg.thaw()
    assert (d / "cgroup.freeze").read_text().strip() == "1"


class _StuckV1(V1Freezer):
    """freezer.state that never gets past FREEZING, recording every state written."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.written: list[str] = []

    def state(self) -> str:
        text = Path(self.file("freezer.state")).read_text().strip()
        return "FREEZING" if text == "FROZEN" else text

    def set_state(self, value: str) -> None:
        self.written.append(value)
        super().set_state(value)


def _fake_v1(tmp_path: Path, state: str = "THAWED") -> Path:
    d = tmp_path / "freezer"
    d.mkdir()
    (d / "freezer.state").write_text(state + "\n")
    (d / "cgroup.procs").write_text("")
    (d / "tasks").write_text("")
    return d


def test_v1_stuck_freezing_is_retried_then_thawed(tmp_path: Path) -> None:
    d = _fake_v1(tmp_path)
    freezer = _StuckV1(str(d))
    with pytest.raises(StopTimeoutError):
        run_sync(freezer.freeze(0.08, FreezeReport()))
    assert freezer.written.count("FROZEN") == _freezer_v1._V1_ATTEMPTS
    assert freezer.written[-1] == "THAWED"
    assert (d / "freezer.state").read_text().strip() == "THAWED"


def test_v1_frozen_before_stays_frozen(tmp_path: Path) -> None:
    d = _fake_v1(tmp_path, "FROZEN")
    cg = Cgroup(str(d))
    assert cg.version == 1
    cg.freeze(timeout=0.5)
    cg.thaw()
    assert (d / "freezer.state").read_text().strip() == "FROZEN"


def test_v2_freezer_rejects_a_directory_that_is_not_a_cgroup(tmp_path: Path) -> None:
    with pytest.raises(CgroupUnavailableError, match="cgroup.freeze"):
        run_sync(V2Freezer(str(tmp_path)).freeze(0.1, FreezeReport()))


# -- token payloads ------------------------------------------------------------------------


def test_signal_payload_validation() -> None:
    ok: dict[str, object] = {"stopped": [[10, 5]], "already_stopped": []}
    _backends.validate_described("signal", ok)
    bad: list[dict[str, object]] = [
        {"stopped": [[0, 5]], "already_stopped": []},
        {"stopped": [[4194305, 5]], "already_stopped": []},
        {"stopped": [[10, -1]], "already_stopped": []},
        {"stopped": [[True, 1]], "already_stopped": []},
        {"stopped": [[10]], "already_stopped": []},
        {"stopped": [], "already_stopped": [], "extra": 1},
        {"stopped": "x", "already_stopped": []},
    ]
    for payload in bad:
        with pytest.raises(TokenError):
            _backends.validate_described("signal", payload)


def test_cgroup_payload_validation() -> None:
    v2 = discover().v2
    mount = v2.mountpoint if v2 is not None else "/sys/fs/cgroup"
    path = os.path.join(mount, "treeguard-1-x")
    good = {"version": 2, "path": path, "inode": 7, "was_frozen": False}
    if v2 is not None:
        _backends.validate_described("cgroup", good)
        _backends.validate_described("auto", good)
    bad: list[dict[str, object]] = [
        {**good, "version": 3},
        {**good, "version": True},
        {**good, "was_frozen": 0},
        {**good, "inode": -1},
        {**good, "inode": "7"},
        {**good, "inode": True},
        {**good, "path": "relative/x"},
        {**good, "path": mount + "/a/../../../etc"},
        {**good, "path": "/etc"},
        {**good, "path": mount},
        {"version": 2, "path": path, "was_frozen": False},
    ]
    for payload in bad:
        with pytest.raises(TokenError):
            _backends.validate_described("cgroup", payload)
    with pytest.raises(TokenError):
        _backends.validate_described("bogus", {})


# -- the proof that a cgroup holds the tree and nothing else ------------------------------


def _census(
    tmp_path: Path,
    parents: dict[int, int],
    threads: dict[int, list[int]],
    inside: list[int],
    *,
    elsewhere: tuple[int, ...] = (),
    kind: str = "domain",
) -> census_module._Census:
    """A census of a fake v2 cgroup (``cgroup.type`` ``kind``) holding ``inside`` (with
    their ``threads``, but for the TIDs ``elsewhere``) over a synthetic /proc: ``parents``
    maps pid to ppid; children are listed by the main thread of the parent, except those
    of a parent whose other threads are named in ``threads`` (forked from its first other
    thread, listed by it only)."""
    proc = tmp_path / "proc"
    for pid, ppid in parents.items():
        others = threads.get(pid, [])
        kids = "".join(f"{c} " for c, p in parents.items() if p == pid)
        for tid in [pid, *others]:
            task = proc / str(pid) / "task" / str(tid)
            task.mkdir(parents=True)
            forker = others[0] if others else pid
            (task / "children").write_text(kids if tid == forker else "")
            line = f"{tid} (p{pid}) S {ppid} {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 "
            (task / "stat").write_text(line + f"{1 + len(others)} 0 {pid}\n")
            if tid != pid:  # /proc/TID names the thread too
                (proc / str(tid)).symlink_to(proc / str(pid))
        main = proc / str(pid) / "task" / str(pid) / "stat"
        (proc / str(pid) / "stat").write_text(main.read_text())
    cg = _fake_v2(tmp_path)
    (cg / "cgroup.type").write_text(kind + "\n")
    (cg / "cgroup.procs").write_text("".join(f"{p}\n" for p in inside))
    tids = [t for p in inside for t in [p, *threads.get(p, [])] if t not in elsewhere]
    (cg / "cgroup.threads").write_text("".join(f"{t}\n" for t in tids))
    fs = ProcFS(str(proc))
    plan = Plan((1,), frozenset({1}), {}, 1.0, 1, False, "tree", fs, ChildrenFiles(fs))
    census = census_module._Census(V2Freezer(str(cg), fs), frozenset({10}), plan)
    run_sync(census.survey())
    return census


# 10 is the top (the root's child); 13 has a second thread; 11 forks from a second thread.
TREE = {1: 0, 10: 1, 11: 10, 12: 10, 13: 11, 14: 11}
THREADS = {13: [130], 11: [110]}


def test_census_accepts_exactly_the_tree(tmp_path: Path) -> None:
    census = _census(tmp_path, TREE, THREADS, [10, 11, 12, 13, 14])
    assert census.problem() is None
    assert census.procs == {10, 11, 12, 13, 14}
    assert census.tasks == 7
    # 13 and 14 are children of a second thread of 11: found by their ppid.
    assert census.parent[13] == census.parent[14] == 11


def test_census_refuses_an_outsider(tmp_path: Path) -> None:
    census = _census(tmp_path, {**TREE, 20: 1}, THREADS, [10, 11, 12, 13, 14, 20])
    assert "outside the tree: 20 (p20)" in (census.problem() or "")


def test_census_refuses_a_child_of_the_tree_outside_the_cgroup(tmp_path: Path) -> None:
    census = _census(tmp_path, TREE, THREADS, [10, 11, 13, 14])  # 12 was moved out
    assert "in another cgroup: 12 (p12)" in (census.problem() or "")


def test_census_refuses_a_grandchild_outside_the_cgroup(tmp_path: Path) -> None:
    # Every process left in the cgroup has its parent there: 13 (below 11) is found only
    # by reading every children file, not just until each process has a parent.
    tree = {1: 0, 10: 1, 11: 10, 12: 10, 13: 11}
    census = _census(tmp_path, tree, {}, [10, 11, 12])
    assert "in another cgroup: 13 (p13)" in (census.problem() or "")


def test_census_refuses_a_thread_in_another_cgroup(tmp_path: Path) -> None:
    census = _census(tmp_path, TREE, THREADS, [10, 11, 12, 13, 14], elsewhere=(130,))
    assert census.problem() is None  # a domain cgroup: no thread can be elsewhere
    census = _census(
        tmp_path / "t", TREE, THREADS, [10, 11, 12, 13, 14], elsewhere=(130,), kind="threaded"
    )
    assert "thread 130 of PID 13 (p13)" in (census.problem() or "")
    census = _census(tmp_path / "all", TREE, THREADS, [10, 11, 12, 13, 14], kind="threaded")
    assert census.problem() is None


def test_census_refuses_a_process_that_must_keep_running(tmp_path: Path) -> None:
    census = _census(tmp_path, TREE, THREADS, [1, 10, 11, 12, 13, 14])  # the root itself
    assert "outside the tree: the root 1" in (census.problem() or "")


def test_subtree_includes_child_cgroups(tmp_path: Path) -> None:
    top = tmp_path / "cg"
    (top / "a" / "b").mkdir(parents=True)
    for d, pids in ((top, "1\n"), (top / "a", "2\n3\n"), (top / "a" / "b", "4\n")):
        (d / "cgroup.procs").write_text(pids)
    assert _cgroupfs.procs_below(str(top)) == [1, 2, 3, 4]


# -- a thaw cut short is finished by the next one ------------------------------------------


class _Interrupted(Exception):
    """Stands for the KeyboardInterrupt of a SIGINT handler (raised at any bytecode)."""


def _interrupt_once(monkeypatch: pytest.MonkeyPatch, value: str, *, after: bool) -> None:
    """Make the next write of ``value`` raise, before it is made or once it is made."""
    freezer = _freezer_base.CgroupFreezer
    real = freezer.put

    def put(self: _freezer_base.CgroupFreezer, name: str, written: str) -> None:
        if written != value:
            real(self, name, written)
            return
        monkeypatch.setattr(freezer, "put", real)
        if after:
            real(self, name, written)
        raise _Interrupted

    monkeypatch.setattr(freezer, "put", put)


@pytest.mark.parametrize("after", [False, True])
def test_v2_thaw_cut_short_is_finished_by_the_next(
    after: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _fake_v2(tmp_path)
    (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")  # frozen once written
    freezer = V2Freezer(str(d))
    run_sync(freezer.freeze(0.5, FreezeReport()))
    assert (d / "cgroup.freeze").read_text().strip() == "1"
    (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    _interrupt_once(monkeypatch, "0", after=after)
    with pytest.raises(_Interrupted):
        run_sync(freezer.thaw())
    assert freezer.froze  # not forgotten: the thaw may not have been written
    run_sync(freezer.thaw())
    assert (d / "cgroup.freeze").read_text().strip() == "0"
    assert not freezer.froze
    run_sync(freezer.thaw())  # idempotent


@pytest.mark.parametrize("after", [False, True])
def test_v1_thaw_cut_short_is_finished_by_the_next(
    after: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _fake_v1(tmp_path)
    freezer = V1Freezer(str(d))
    run_sync(freezer.freeze(0.5, FreezeReport()))
    assert (d / "freezer.state").read_text().strip() == "FROZEN"
    _interrupt_once(monkeypatch, "THAWED", after=after)
    with pytest.raises(_Interrupted):
        run_sync(freezer.thaw())
    assert freezer.froze
    run_sync(freezer.thaw())
    assert (d / "freezer.state").read_text().strip() == "THAWED"
    assert not freezer.froze


def test_a_thaw_that_cannot_be_written_is_kept_to_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of descriptors (EMFILE) is not "the cgroup is gone": the thaw is not forgotten.
    # (A thaw opens cgroup.freeze only if its files were closed meanwhile: by a guard
    # closed while frozen, say.)
    d = _fake_v2(tmp_path)
    (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    freezer = V2Freezer(str(d))
    run_sync(freezer.freeze(0.5, FreezeReport()))
    (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert freezer.files is not None
    freezer.files.close()
    real_open = os.open

    def no_descriptors(path: str, flags: int, *args: int, **kwargs: int) -> int:
        if path.endswith("cgroup.freeze"):
            raise OSError(24, "Too many open files")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_descriptors)
    with pytest.raises(CgroupError, match="Too many open files"):
        run_sync(freezer.thaw())
    monkeypatch.setattr(os, "open", real_open)
    assert freezer.froze
    run_sync(freezer.thaw())
    assert (d / "cgroup.freeze").read_text().strip() == "0"


@pytest.mark.parametrize("version", [2, 1])
def test_a_thaw_by_another_process_out_of_descriptors_is_not_told_gone(
    version: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # thaw_cgroup says 0 for a cgroup gone, which its callers take as nothing left to do;
    # a directory it could not even open for want of a descriptor is not gone: it says
    # so (CgroupError), and a later call thaws.
    d = _fake_v2(tmp_path) if version == 2 else _fake_v1(tmp_path, "FROZEN")
    if version == 2:
        (d / "cgroup.freeze").write_text("1\n")
    inode = os.stat(d).st_ino
    real_open = os.open

    def no_descriptors(path: str, flags: int, *args: int, **kwargs: int) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "open", no_descriptors)
    with pytest.raises(CgroupError, match="Too many open files"):
        thaw_cgroup(version, str(d), inode)
    monkeypatch.setattr(os, "open", real_open)
    assert thaw_cgroup(version, str(d), inode) == 1
    control = "cgroup.freeze" if version == 2 else "freezer.state"
    assert (d / control).read_text().strip() == ("0" if version == 2 else "THAWED")
    assert thaw_cgroup(version, str(tmp_path / "gone"), inode) == 0


def test_a_thaw_through_the_files_held_opens_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Everything a thaw writes and reads was opened by the freeze: no open may fail it.
    d = _fake_v2(tmp_path)
    (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    freezer = V2Freezer(str(d))
    run_sync(freezer.freeze(0.5, FreezeReport()))
    (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    opened: list[str] = []

    def no_descriptors(path: str, *args: int, **kwargs: int) -> int:
        opened.append(path)
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "open", no_descriptors)
    run_sync(freezer.thaw())
    monkeypatch.undo()
    assert opened == []
    assert (d / "cgroup.freeze").read_text().strip() == "0"
    assert not freezer.froze


def test_a_thaw_of_a_removed_cgroup_is_done(tmp_path: Path) -> None:
    # Here the files held were closed, so the thaw looks for them by path and finds
    # nothing; through files held, a removed cgroup reads and writes ENODEV (a kernel's
    # cgroup only: see test_cgroup.py).
    d = _fake_v2(tmp_path)
    (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    freezer = V2Freezer(str(d))
    run_sync(freezer.freeze(0.5, FreezeReport()))
    assert freezer.files is not None
    freezer.files.close()
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    run_sync(freezer.thaw())
    assert not freezer.froze


@pytest.mark.parametrize("version", [2, 1])
def test_a_freeze_cut_short_in_its_census_writes_the_thaw_back(
    version: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The census runs while a thread of its own writes the freeze; an interrupt there
    # must not let that write land after the thaw (cgroup.freeze must not stay 1).
    d = _fake_v2(tmp_path) if version == 2 else _fake_v1(tmp_path)
    freezer = V2Freezer(str(d)) if version == 2 else V1Freezer(str(d))
    control = d / ("cgroup.freeze" if version == 2 else "freezer.state")

    def census() -> Steps[None]:
        yield YIELD
        raise _Interrupted

    monkeypatch.setattr(_freezer_base, "_FEW_TASKS", 0)  # written by a thread of its own
    for _ in range(20):  # the write lands before, during or after the interrupt
        with pytest.raises(_Interrupted):
            run_sync(freezer.freeze(0.5, FreezeReport(), meanwhile=census()))
        assert control.read_text().strip() == ("0" if version == 2 else "THAWED")
        assert not freezer.froze


def test_the_writer_is_over_when_it_says_so_and_closes_twice() -> None:
    started = threading.Event()
    release = threading.Event()

    def job() -> None:
        started.set()
        assert release.wait(10)

    writer = _cgroupfs._Writer(job)
    writer.start()
    assert started.wait(10)
    assert not writer.over
    assert not select.select([writer.done_fd], [], [], 0)[0]
    release.set()
    # Woken by done_fd, the caller finds the write over at once (no GIL hand-over needed).
    assert select.select([writer.done_fd], [], [], 10)[0]
    assert writer.over
    writer.close()
    writer.close()  # idempotent: nothing left to wait for
    assert writer.done_fd == -1 and writer.error is None


def test_a_writer_closed_before_its_thread_ran_never_writes() -> None:
    calls: list[int] = []
    writer = _cgroupfs._Writer(lambda: calls.append(1))
    writer.done_fd = os.eventfd(0, os.EFD_CLOEXEC)
    writer.close()  # claims the writer first: the thread, were it started now, must not write
    writer._run()
    assert calls == []
