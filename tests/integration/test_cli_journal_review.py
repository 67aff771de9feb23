"""``treeguard pause`` and ``resume`` against what happens around them while the pause runs:
a cgroup made again at its path, a resume of the state file the pause is still writing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests import proc
from tests.conftest import MakeCgroup, slot
from tests.integration import test_cli, test_reliability
from tests.integration.test_cli import _script as _cli_script
from tests.integration.test_cli import run
from tests.integration.test_reliability import _relay_settled
from treeguard._statefile import parse_state
from treeguard._workers import WorkerTree

MakeTree = Callable[..., WorkerTree]
# Fixtures of those modules, used here too (pytest finds a fixture by its name here).
orphans = test_cli.orphans
relay = test_reliability.relay
SPEC = {"threads": 1, "children": [{"children": [{}]}, {"threads": 1}]}


def _script(body: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the command line in a fresh interpreter after ``body`` (which patches it)."""
    code = f"import sys\nfrom treeguard import _cli\n{body}\nsys.exit(_cli.main(sys.argv[1:]))\n"
    return proc.run_python(code, argv)


_MADE_AGAIN = """
import os
from treeguard import _watchdog

start = _watchdog.Watchdog.start
PATH, PARK = sys.argv[-2:]
del sys.argv[-2:]

def move(src, dst):
    with open(os.path.join(src, "cgroup.procs")) as procs:
        pids = procs.read().split()
    for pid in pids:
        with open(os.path.join(dst, "cgroup.procs"), "w") as to:
            to.write(pid)

def made_again():
    # While the pause gets ready, the cgroup is removed and made again at its path with
    # the same processes (a service restarted by its manager does this).
    move(PATH, PARK)
    os.rmdir(PATH)
    os.mkdir(PATH)
    move(PARK, PATH)
    return start()

_watchdog.Watchdog.start = staticmethod(made_again)
"""


def test_pause_of_a_cgroup_made_again_at_its_path_is_resumed(
    make_tree: MakeTree, cgroup: MakeCgroup, tmp_path: Path
) -> None:
    """``pause --cgroup`` records the cgroup it freezes, not the one that was at the path
    when the command started: a cgroup made again there meanwhile is the one frozen, and
    `resume` (and the helper) must recognise it by its inode, or it stays frozen."""
    cg = cgroup(2)
    park = cgroup(2)
    tree = make_tree(SPEC, spawn=cg.spawn)
    state = tmp_path / "paused.json"
    before = os.stat(cg.path).st_ino
    result = _script(
        _MADE_AGAIN, ["pause", "--cgroup", cg.path, "--state", str(state), cg.path, park.path]
    )
    try:
        assert result.returncode == 0, result.stderr
        now = os.stat(cg.path).st_ino
        assert now != before  # made again: another cgroup
        assert cg.frozen
        journal = parse_state(state.read_bytes())
        result = run("resume", "--state", str(state))
        assert result.returncode == 0, result.stderr
        assert not cg.frozen, "resume left the cgroup frozen"
        proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])
        assert journal.cgroups == [(2, cg.path, now)]  # the cgroup frozen, before its freeze
        assert journal.token is not None and journal.token.payload["inode"] == now
    finally:
        cg.thaw()
        with open(os.path.join(cg.path, "cgroup.freeze"), "w") as freeze:
            freeze.write("0")  # whatever the test saw: never leave it frozen


_RESUMED_WHILE_PAUSING = """
from treeguard import _statefile

stopping = _statefile.StateJournal.stopping
PATH = sys.argv[sys.argv.index("--state") + 1]
resumed = []

def stopping_then_resumed(self, pid, starttime, inode=0):
    stopping(self, pid, starttime, inode)
    if len(resumed) == 1 and not resumed[0]:
        # The second process journaled: a resume of the state file now, the pause not done.
        resumed[0] = True
        status = _cli.main(["resume", "--state", PATH])
        print(f"resume during the pause: {status}", file=sys.stderr)
    if not resumed:
        resumed.append(False)

_statefile.StateJournal.stopping = stopping_then_resumed
"""


def test_resume_while_the_pause_still_freezes_leaves_nothing_stopped(
    make_tree: MakeTree, tmp_path: Path
) -> None:
    """A resume of a state file whose pause is still freezing must not thaw what was
    journaled so far and remove the file while the pause goes on stopping the rest: those
    would stay stopped with nothing left to resume them. It refuses (the file stays, the
    pause completes), and a resume after the pause thaws the whole tree."""
    tree = make_tree(SPEC)
    state = tmp_path / "paused.json"
    argv = ["pause", str(tree.root), "--state", str(state)]
    result = _script(_RESUMED_WHILE_PAUSING, argv)
    try:
        assert "resume during the pause: " in result.stderr, result
        assert result.returncode == 0, result.stderr
        assert "resume during the pause: 0" not in result.stderr  # it refused
        assert "a pause is still writing it" in result.stderr
        assert state.exists()  # what resumes the tree
        proc.assert_all_stopped(tree.pids)
    finally:
        if state.exists():
            resumed = run("resume", "--state", str(state))
            assert resumed.returncode == 0, resumed.stderr
    proc.assert_none_stopped(tree.pids)
    proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])


def test_helper_never_thaws_a_cgroup_made_again_at_the_path_it_journaled(
    make_tree: MakeTree, cgroup: MakeCgroup
) -> None:
    """The helper thaws the cgroup journaled (version, directory, inode), never another one
    made at its path since and frozen by someone else; the cgroup journaled is thawed."""
    from treeguard._watchdog import Watchdog
    from treeguard.cgroup import Cgroup

    cg = cgroup(2)
    old = os.stat(cg.path).st_ino
    dog = Watchdog.start()
    try:
        dog.arm(None)
        dog.journal.freezing_cgroup(2, cg.path, old)
        os.rmdir(cg.path)  # the cgroup journaled is gone; another is made at its path
        os.mkdir(cg.path)
        assert os.stat(cg.path).st_ino != old
        tree = make_tree(SPEC, spawn=cg.spawn)
        other = Cgroup(cg.path)  # someone else's freeze of the new cgroup
        other.freeze()
        try:
            dog.close()  # the journal still says frozen: the helper thaws what it recorded
            assert other.frozen, "the helper thawed a cgroup it never journaled"
            assert proc.counters_still(tree.counters, tree.period)
        finally:
            other.thaw()
        assert not other.frozen
        proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])
    finally:
        dog.close()


_FROZEN_MEANWHILE = """
import os
from treeguard import _statefile

freezing = _statefile.StateJournal.freezing_cgroup

def freezing_then_frozen_by_another(self, version, path, inode):
    freezing(self, version, path, inode)
    # Someone else freezes the cgroup after pause found it running, before its own freeze.
    with open(os.path.join(path, "cgroup.freeze"), "w") as freeze:
        freeze.write("1")

_statefile.StateJournal.freezing_cgroup = freezing_then_frozen_by_another
"""


def test_pause_of_a_cgroup_frozen_meanwhile_by_another_leaves_it_to_them(
    make_tree: MakeTree, cgroup: MakeCgroup, tmp_path: Path
) -> None:
    """A cgroup frozen by someone else after ``pause --cgroup`` found it running, and before
    its own freeze, is not this pause's: it refuses (nothing to pause) and leaves it frozen,
    never a token that makes `resume` thaw another's freeze."""
    cg = cgroup(2)
    tree = make_tree(SPEC, spawn=cg.spawn)
    state = tmp_path / "paused.json"
    argv = ["pause", "--cgroup", cg.path, "--state", str(state)]
    try:
        result = _script(_FROZEN_MEANWHILE, argv)
        if state.exists():  # the pause took the freeze for its own: resume undoes it
            assert run("resume", "--state", str(state)).returncode == 0
        assert cg.frozen, "the other's freeze was undone"
        assert result.returncode == 7, result  # nothing to pause
        assert "frozen already" in result.stderr
        assert not state.exists()
        assert proc.counters_still(tree.counters, tree.period)
    finally:
        with open(os.path.join(cg.path, "cgroup.freeze"), "w") as freeze:
            freeze.write("0")  # the other's thaw
    proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])


def test_resume_resumes_a_relay_above_the_paused_tree(
    relay: Callable[[str], tuple[int, int]], tmp_path: Path
) -> None:
    """``su`` above a paused process stops itself when its child stops (a job-control
    relay); `resume`, like a guard's own thaw, resumes it once the child runs again."""
    su, child = relay("su")
    state = tmp_path / "paused.json"
    result = run("pause", str(child), "--state", str(state))
    try:
        assert result.returncode == 0, result.stderr
        proc.wait_until(lambda: proc.stopped([su]), 5, "su to relay the stop")
    finally:
        resumed = run("resume", "--state", str(state))
    assert resumed.returncode == 0, resumed.stderr
    proc.wait_until(lambda: _relay_settled(su, child), 5, "su to run on")


def test_the_helper_resumes_a_relay_above_the_tree(
    relay: Callable[[str], tuple[int, int]], orphans: list[int]
) -> None:
    """The watchdog helper, thawing for a supervisor killed while frozen, resumes a relay
    above the tree that stopped itself, as the supervisor's own thaw would."""
    su, child = relay("su")
    cmd = [sys.executable, "-c", "import time; time.sleep(120)"]
    cli = subprocess.Popen([*_cli_script(), "freeze", str(child), "--", *cmd])
    try:
        proc.wait_until(lambda: len(proc.children(cli.pid)) == 2, 30, "CMD to start")
        orphans += proc.children(cli.pid)
        proc.assert_all_stopped([child])
        proc.wait_until(lambda: proc.stopped([su]), 5, "su to relay the stop")
    finally:
        cli.kill()  # only the helper can thaw now
        cli.wait()
    proc.wait_until(lambda: _relay_settled(su, child), 5, "su to run on")
