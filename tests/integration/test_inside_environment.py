"""What works where: the faces and backends in the environment this suite runs in.

On the machine itself (``TREEGUARD_TEST_ENV`` unset) it checks that ``treeguard doctor``
and what actually works agree. The environment matrix (test_environments.py) runs it again
inside each environment it builds (tests/envbuild.py), where ``treeguard doctor`` must
also say exactly what :data:`tests.envbuild.ENVIRONMENTS` expects. Every backend the
environment offers freezes and thaws a tree through the sync guard, the async guard
(asyncio and trio), a token, the CLI and a snapshot; every backend it cannot offer fails
with its clear error and leaves the tree running.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import treeguard
from tests import proc
from tests.envbuild import ENVIRONMENTS, rmdir_cgroups
from treeguard import ProcessesGuard
from treeguard._doctor import diagnose
from treeguard._tree import PpidScan
from treeguard._workers import WorkerTree
from treeguard.cgroup import Cgroup
from treeguard.errors import CgroupError, CgroupUnavailableError
from treeguard.procfs import ProcFS

ENV = os.environ.get("TREEGUARD_TEST_ENV", "host")
EXPECT = ENVIRONMENTS.get(ENV)
NO_CHILDREN = ENV == "nochildren"
#: Four processes, two with a thread of their own.
SPEC: dict[str, Any] = {"threads": 1, "children": [{"children": [{"threads": 1}]}, {}]}
#: The kernel without children files, as the suite simulates it (also in a CLI process).
_PRELUDE = (
    "from treeguard.procfs import ProcFS; ProcFS.has_children_files = lambda self: False; "
    * NO_CHILDREN
)


@pytest.fixture(autouse=True)
def ppid_scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Without children files, every walk must scan the process table: count the scans."""
    scans: list[int] = []
    if NO_CHILDREN:
        monkeypatch.setattr(ProcFS, "has_children_files", lambda self: False)
        refresh = PpidScan.refresh

        def counted(self: PpidScan) -> None:
            scans.append(1)
            refresh(self)

        monkeypatch.setattr(PpidScan, "refresh", counted)
    return scans


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = f"import sys; {_PRELUDE}from treeguard._cli import main; raise SystemExit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def doctor() -> dict[str, Any]:
    done = cli("doctor", "--json")
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def available(doctor: dict[str, Any], backend: str) -> bool:
    return bool(doctor["backends"][backend]["available"])


def _running(tree: WorkerTree) -> None:
    """Nothing of the tree stopped, and every process's counter moves."""
    proc.assert_none_stopped(tree.pids)
    proc.counters_moving(tree.counters, [i * 8 for i in range(tree.size)])


def _frozen(tree: WorkerTree, backend: str) -> None:
    """Every task of the tree held, checked through /proc (the cgroup freezer shows tasks
    sleeping: its counters tell)."""
    if backend == "cgroup":
        assert proc.counters_still(tree.counters, tree.period)
        return
    states = proc.states_of(tree.pids)
    want = "t" if backend == "ptrace" else "T"
    assert states and set(states.values()) == {want}, states


@pytest.fixture
def tree(make_tree: Callable[..., WorkerTree]) -> WorkerTree:
    return make_tree(SPEC)


# -- what the environment is ---------------------------------------------------------------


def test_doctor_says_what_this_environment_offers(doctor: dict[str, Any]) -> None:
    here = diagnose().to_dict()
    assert {k: v for k, v in here.items() if k != "children_files" or not NO_CHILDREN} == {
        k: v for k, v in doctor.items() if k != "children_files" or not NO_CHILDREN
    }
    human = cli("doctor")
    assert human.returncode == 0, human.stderr
    for name, backend in doctor["backends"].items():
        mark = "yes" if backend["available"] else "no "
        assert f"  {name:<7} {mark}  {backend['note']}" in human.stdout
    assert doctor["identity"] == ("pidfs" if doctor["pidfd"] else "starttime")
    _agrees_with_the_kernel(doctor)
    if EXPECT is None:
        return
    assert doctor["layout"] == EXPECT.layout
    assert doctor["uid"] == EXPECT.uid == os.geteuid()
    assert doctor["user_namespace"] == EXPECT.user_namespace
    assert doctor["children_files"] == EXPECT.children_files
    assert available(doctor, "ptrace") == EXPECT.ptrace
    assert available(doctor, "cgroup") == (EXPECT.cgroup is not None)
    assert available(doctor, "signal") and available(doctor, "auto")
    places = [doctor[k] for k in ("v2", "v1_freezer") if doctor[k] is not None]
    if EXPECT.cgroup is None:
        assert places or EXPECT.layout == "none"
        for facts in places:
            assert facts["create_in"] is None
            assert re.search(EXPECT.refusal, facts["why_not"]), facts["why_not"]
        assert re.search(EXPECT.refusal, doctor["backends"]["cgroup"]["note"])
    else:
        facts = doctor["v2" if EXPECT.cgroup == 2 else "v1_freezer"]
        assert facts["create_in"] == facts["own"]  # below its own cgroup, nowhere else
        assert (facts["own"] != facts["mountpoint"]) == EXPECT.delegated
    assert doctor["create_version"] == EXPECT.cgroup


def _agrees_with_the_kernel(doctor: dict[str, Any]) -> None:
    """The doctor's cgroup facts against what the mount table, /proc/self/cgroup and a
    probe cgroup (made and removed here, with plain os calls) say."""
    with open("/proc/self/mountinfo") as f:
        mounts = [(line.split(" - ")[0].split(), line.split(" - ")[1].split()) for line in f]
    cgroup_mounts = [(head, tail) for head, tail in mounts if tail[0] in ("cgroup", "cgroup2")]
    types = {tail[0] for _, tail in cgroup_mounts}
    want_layout = (
        {"cgroup", "cgroup2"} == types
        and "hybrid"
        or ("v2" if "cgroup2" in types else "v1" if types else "none")
    )
    assert doctor["layout"] == want_layout
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    own_cgroup = {2: next((p for n, c, p in lines if n == "0"), None)}
    own_cgroup[1] = next((p for _, c, p in lines if "freezer" in c.split(",")), None)
    probed: dict[int, bool] = {}
    for version, key, fstype in ((2, "v2", "cgroup2"), (1, "v1_freezer", "cgroup")):
        found = [
            (head, tail)
            for head, tail in cgroup_mounts
            if tail[0] == fstype and (version == 2 or "freezer" in tail[-1].split(","))
        ]
        if not found:
            assert doctor[key] is None
            continue
        facts = doctor[key]
        mountpoint = facts["mountpoint"]
        head = next(h for h, _ in found if h[4] == mountpoint)
        assert facts["read_only"] == ("ro" in head[5].split(","))
        root, cgroup = head[3].rstrip("/"), own_cgroup[version]
        assert cgroup is not None
        shown = cgroup == root or cgroup.startswith(root + "/")  # by this mount
        rel = cgroup.removeprefix(root).strip("/")
        own = (os.path.join(mountpoint, rel) if rel else mountpoint) if shown else None
        assert facts["own"] == own
        probed[version] = own is not None and _probe(own, version)
        assert (facts["create_in"] is not None) == probed[version], facts
        if probed[version]:
            assert facts["create_in"] == own
    want = 2 if probed.get(2) else 1 if probed.get(1) else None
    assert doctor["create_version"] == want
    assert doctor["backends"]["cgroup"]["available"] == (want is not None)


def _probe(directory: str, version: int) -> bool:
    """Whether a freezable cgroup can be made in ``directory`` and a process of this one
    moved into it (what Cgroup.create() and spawn() need). A forked child moves, never
    the test runner: it exits there, and the empty cgroup is removed."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    probe = os.path.join(directory, f"tgprobe-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    try:
        if not os.path.isfile(
            os.path.join(probe, "cgroup.freeze" if version == 2 else "freezer.state")
        ):
            return False
        child = os.fork()
        if child == 0:  # pragma: no cover - reports through its exit status
            try:
                with open(os.path.join(probe, "cgroup.procs"), "w") as f:
                    f.write("0")
            except OSError:
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(child, 0)
        return os.waitstatus_to_exitcode(status) == 0
    finally:
        # the child has exited; its cgroup may stay busy a moment while the kernel
        # finishes that exit
        rmdir_cgroups([probe], time.monotonic() + 10)


# -- the faces, through each backend the environment offers --------------------------------


@pytest.mark.parametrize("backend", ["signal", "ptrace"])
def test_sync_guard(
    backend: str, tree: WorkerTree, doctor: dict[str, Any], ppid_scans: list[int]
) -> None:
    if not available(doctor, backend):
        with pytest.raises(treeguard.FreezeError):
            ProcessesGuard(tree.root, include_root=True, backend=backend).freeze()
        _running(tree)
        return
    with ProcessesGuard(tree.root, include_root=True, backend=backend) as guard:
        _frozen(tree, backend)
        assert sorted(guard.pids) == sorted(tree.pids)
    _running(tree)
    assert bool(ppid_scans) == NO_CHILDREN  # the walk scanned the process table, or not


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_async_guard(loop: str, tree: WorkerTree, doctor: dict[str, Any]) -> None:
    backend = "ptrace" if available(doctor, "ptrace") else "signal"

    async def hold() -> None:
        async with treeguard.guard(tree.root, include_root=True, backend=backend):
            _frozen(tree, backend)

    anyio.run(hold, backend=loop)
    _running(tree)


def test_token_and_snapshot(tree: WorkerTree) -> None:
    taken = treeguard.snapshot(tree.root)
    assert [p.pid for p in taken] == tree.pids
    token = treeguard.freeze(tree.root, include_root=True)
    try:
        _frozen(tree, "signal")
    finally:
        assert treeguard.thaw(treeguard.Token.from_json(token.to_json())) == tree.size
    _running(tree)


def test_auto_on_a_plain_tree(tree: WorkerTree, doctor: dict[str, Any]) -> None:
    with ProcessesGuard(tree.root, include_root=True, backend="auto") as guard:
        chosen = guard.report.backend
        _frozen(tree, chosen)
    assert chosen == ("ptrace" if available(doctor, "ptrace") else "signal")
    assert "cgroup" in guard.report.declined  # a plain tree shares its cgroup
    _running(tree)


def test_the_cgroup_backend_on_a_plain_tree_refuses(tree: WorkerTree) -> None:
    # Here the tree shares the caller's cgroup (or the root one, or there is none): one
    # clear error, and not a task of the tree was left held.
    with pytest.raises(CgroupError) as caught:
        ProcessesGuard(tree.root, include_root=True, backend="cgroup").freeze()
    assert str(caught.value).startswith("cgroup ")  # says which cgroup, and why
    _running(tree)


def test_cgroup_of_its_own(doctor: dict[str, Any], make_tree: Callable[..., WorkerTree]) -> None:
    if not available(doctor, "cgroup"):
        with pytest.raises(CgroupUnavailableError) as caught:
            Cgroup.create()
        assert str(caught.value) == doctor["backends"]["cgroup"]["note"]  # the same refusal
        return
    if ENV == "v2-delegated":
        _only_the_delegated_subtree(doctor)
    cg = Cgroup.create()
    try:
        assert cg.version == doctor["create_version"]  # the hierarchy the doctor named
        facts = doctor["v2" if cg.version == 2 else "v1_freezer"]
        assert os.path.dirname(cg.path) == facts["create_in"] == facts["own"]
        if EXPECT is not None:
            assert cg.version == EXPECT.cgroup
        tree = make_tree(SPEC, spawn=cg.spawn)
        for backend in ("cgroup", "auto"):
            with ProcessesGuard(tree.root, include_root=True, backend=backend) as guard:
                assert guard.report.backend == "cgroup"
                assert cg.frozen
                _frozen(tree, "cgroup")
            assert not cg.frozen
            _running(tree)

        async def hold() -> None:
            async with treeguard.guard(tree.root, include_root=True, backend="cgroup"):
                assert cg.frozen

        anyio.run(hold, backend="trio")
        assert not cg.frozen
        token = treeguard.freeze(tree.root, include_root=True, backend="cgroup")
        assert cg.frozen
        treeguard.thaw(treeguard.Token.from_json(token.to_json()))
        assert not cg.frozen
        _running(tree)
    finally:
        cg.kill()
        cg.remove()
    assert not os.path.exists(cg.path)


def _only_the_delegated_subtree(doctor: dict[str, Any]) -> None:
    with pytest.raises(CgroupUnavailableError, match="may not create") as caught:
        Cgroup.create(parent=doctor["v2"]["mountpoint"])  # the root belongs to PID 1
    assert "Delegate=yes" in str(caught.value)
    # Its own directory, but the root's cgroup.procs is needed to move a process there.
    with pytest.raises(CgroupUnavailableError, match="cgroup.procs"):
        Cgroup.create(parent=os.environ["TREEGUARD_TEST_HALF"])


# -- the command line ----------------------------------------------------------------------


def test_cli(tree: WorkerTree, tmp_path: Path) -> None:
    shown = cli("tree", str(tree.root), "--json")
    assert shown.returncode == 0, shown.stderr
    assert [p["pid"] for p in json.loads(shown.stdout)["processes"]] == tree.pids
    held = cli("freeze", str(tree.root), "--", sys.executable, "-c", _STATES, str(tree.root))
    assert held.returncode == 0, held.stderr
    assert set(held.stdout.split()) == {"T"}  # CMD saw every task of the tree stopped
    _running(tree)
    # A backend the tree cannot have here: one line saying why, and the tree runs on.
    refused = cli("freeze", str(tree.root), "--backend", "cgroup", "--", "true")
    assert refused.returncode == 125
    assert refused.stderr.startswith("treeguard: error: cgroup ")
    assert refused.stderr.count("\n") == 1, refused.stderr  # never a traceback
    _running(tree)
    state = str(tmp_path / "paused.json")
    assert cli("pause", str(tree.root), "--state", state).returncode == 0
    try:
        _frozen(tree, "signal")
        assert cli("status", "--state", state).returncode == 0
    finally:
        resumed = cli("resume", "--state", state)
    assert resumed.returncode == 0, resumed.stderr
    _running(tree)


# The states of every task below a PID, printed by CMD while the tree is frozen.
_STATES = r"""
import os, sys
def walk(pid):
    for tid in os.listdir(f"/proc/{pid}/task"):
        data = open(f"/proc/{pid}/task/{tid}/stat", "rb").read()
        print(data[data.rindex(b")") + 2 :].split()[0].decode())
    for tid in os.listdir(f"/proc/{pid}/task"):
        for kid in open(f"/proc/{pid}/task/{tid}/children").read().split():
            walk(int(kid))
walk(int(sys.argv[1]))
"""
