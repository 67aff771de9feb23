"""The environment matrix: each environment of :data:`tests.envbuild.ENVIRONMENTS` is built
with namespaces (a pure cgroup v2 host, a delegated subtree owned by uid 65534, an
unprivileged user, a v1-only host, no cgroups at all, a rootless container, a kernel
without children files, a hybrid host with a read-only v2 mount) and
test_inside_environment.py runs inside it: every test must pass there, none may skip, and
the environment's cgroups are gone afterwards (a cgroup the inside run leaves is
reported, thawed and removed).

As root (CI) every environment is built; elsewhere a missing ``unshare`` or a kernel
without the v1 freezer skips, in CI it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import envbuild
from tests.conftest import IN_CI, MakeCgroup, require_root
from tests.envbuild import CANNOT_BUILD, ENVIRONMENTS, NOBODY
from treeguard._mounts import discover
from treeguard._workers import poll_until

ROOT = Path(__file__).resolve().parents[2]
INSIDE = "tests/integration/test_inside_environment.py"


def _unavailable(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what}, and CI builds every environment")
    pytest.skip(what)


def _build(name: str, tmp_path: Path, *pytest_args: str) -> tuple[int, str, str, str]:
    """Build environment ``name`` and run pytest inside: the builder's status, the output
    of both, and what to say when an assertion fails."""
    require_root("building environments with namespaces")
    unshare = shutil.which("unshare")
    if unshare is None:
        _unavailable("util-linux unshare is not installed")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    os.chown(scratch, NOBODY, NOBODY)  # the unprivileged runs' HOME and pytest's basetemp
    command = [
        *(unshare, "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc"),
        *(sys.executable, str(ROOT / "tests" / "envbuild.py"), name, str(scratch), "--"),
        *pytest_args,
        *("-p", "no:randomly", "-q", "-rs", f"--basetemp={scratch}/basetemp"),
        *("-o", "timeout=60"),
    ]
    start = time.monotonic()
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=115, check=False
    )
    took = time.monotonic() - start
    if done.returncode == CANNOT_BUILD:
        _unavailable(done.stderr.strip())
    said = f"{name} ({took:.1f} s):\n{done.stdout[-4000:]}\n{done.stderr[-3000:]}"
    return done.returncode, done.stdout, done.stderr, said


def _all_gone(name: str, stderr: str, said: str) -> None:
    """The builder made a cgroup of the runner's own in every hierarchy the environment
    reaches (none where none is), and each is gone from this machine."""
    made = re.findall(r"envbuild: made cgroup v(\d) (\S+)", stderr)
    assert {int(v) for v, _ in made} == _hierarchies_of(ENVIRONMENTS[name].layout), said
    here = discover()
    for version, cgroup in made:
        # the same cgroup, seen through this machine's own mount of its hierarchy
        hierarchy = here.v2 if version == "2" else here.freezer
        assert hierarchy is not None
        assert not os.path.exists(hierarchy.mountpoint + cgroup), cgroup


@pytest.mark.parametrize("name", list(ENVIRONMENTS))
def test_the_suite_passes_inside(name: str, tmp_path: Path) -> None:
    code, stdout, stderr, said = _build(name, tmp_path, INSIDE, "-x")
    assert code == 0, said
    summary = stdout.strip().splitlines()[-1]
    # every test passed; nothing skipped, deselected or expected to fail
    assert re.fullmatch(r"(\d+) passed in [\d.]+s(?: \([\d:]+\))?", summary), said
    _all_gone(name, stderr, said)


# A test that leaves its cgroup behind with a process frozen in it.
_LEAK = """
import os, sys
from treeguard.cgroup import Cgroup

def test_leak():
    cg = Cgroup.create()
    cg.spawn([sys.executable, "-c", "import time; time.sleep(100)"])
    freeze = ("cgroup.freeze", "1") if cg.version == 2 else ("freezer.state", "FROZEN")
    with open(os.path.join(cg.path, freeze[0]), "w") as f:
        f.write(freeze[1])
    print("made", cg.version, cg.path)
    cg._spawned.clear()  # no cleanup at exit: left behind
    cg._made = False
"""


@pytest.mark.parametrize("name", ["v1", "nochildren", "hybrid-rov2"])
def test_a_cgroup_left_inside_is_reported_thawed_and_removed(name: str, tmp_path: Path) -> None:
    leak = tmp_path / "test_leak.py"
    leak.write_text(_LEAK)
    code, stdout, stderr, said = _build(name, tmp_path, str(leak), "-s")
    assert code == envbuild.LEFT_CGROUPS, said
    left = re.search(r"made (\d) (\S+)", stdout)
    assert left is not None, said
    assert int(left.group(1)) == ENVIRONMENTS[name].cgroup  # where create() went
    assert f"cgroups left behind: ['{left.group(2)}']" in stderr, said
    _all_gone(name, stderr, said)


def _hierarchies_of(layout: str) -> set[int]:
    return {"v2": {2}, "v1": {1}, "hybrid": {1, 2}, "none": set()}[layout]


def _enter(cgroup: str) -> Callable[[], None]:
    def enter() -> None:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write("0")

    return enter


def _frozen(cgroup: str, version: int) -> bool:
    if version == 1:
        with open(os.path.join(cgroup, "freezer.state")) as f:
            return f.read().strip() == "FROZEN"
    with open(os.path.join(cgroup, "cgroup.events")) as f:
        return "frozen 1" in f.read().splitlines()


@pytest.mark.parametrize("version", [2, 1])
def test_cleanup_thaws_and_kills_without_cgroup_kill(
    version: int, cgroup: MakeCgroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What an inside run may leave: processes in the runner's cgroup and in a frozen
    # cgroup below it. Without cgroup.kill (v1; v2 before Linux 5.14) each is killed by
    # its PID, and a v1-frozen one dies only once thawed.
    runners = os.path.join(cgroup(version).path, "tgenv-test")  # the fixture removes its parent
    below = os.path.join(runners, "treeguard-left")
    os.makedirs(below)
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    workers = [subprocess.Popen(sleep, preexec_fn=_enter(d)) for d in (runners, runners, below)]
    try:
        with open(
            os.path.join(below, "cgroup.freeze" if version == 2 else "freezer.state"), "w"
        ) as f:
            f.write("1" if version == 2 else "FROZEN")
        assert poll_until(lambda: _frozen(below, version), 10)
        real = envbuild._write
        monkeypatch.setattr(
            envbuild,
            "_write",
            lambda path, data: not path.endswith("cgroup.kill") and real(path, data),
        )
        assert envbuild._remove([runners]) is False  # a child cgroup was left: reported
        assert not os.path.exists(runners)
        for worker in workers:
            assert worker.wait(timeout=10) == -signal.SIGKILL
    finally:  # whatever the failure, nothing left running, held, or made
        if os.path.isdir(runners):
            envbuild._remove_one(runners, time.monotonic() + 10)
        for worker in workers:
            worker.kill()
            worker.wait(timeout=10)
