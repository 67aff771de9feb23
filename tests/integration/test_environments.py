"""The environment matrix: each environment of :data:`tests.envbuild.ENVIRONMENTS` is built
with namespaces (a pure cgroup v2 host, a delegated subtree owned by uid 65534, an
unprivileged user, a v1-only host, no cgroups at all, a rootless container, a kernel
without children files) and test_inside_environment.py runs inside it: every test must
pass there, none may skip, and the environment's cgroups are gone afterwards.

As root (CI) every environment is built; elsewhere a missing ``unshare`` or a kernel
without the v1 freezer skips, in CI it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import IN_CI, require_root
from tests.envbuild import CANNOT_BUILD, ENVIRONMENTS, NOBODY
from treeguard._mounts import discover

ROOT = Path(__file__).resolve().parents[2]
INSIDE = "tests/integration/test_inside_environment.py"


def _unavailable(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what}, and CI builds every environment")
    pytest.skip(what)


@pytest.mark.parametrize("name", list(ENVIRONMENTS))
def test_the_suite_passes_inside(name: str, tmp_path: Path) -> None:
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
        *(INSIDE, "-p", "no:randomly", "-x", "-q", "-rs", f"--basetemp={scratch}/basetemp"),
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
    assert done.returncode == 0, said
    summary = done.stdout.strip().splitlines()[-1]
    # every test passed; nothing skipped, deselected or expected to fail
    assert re.fullmatch(r"(\d+) passed in [\d.]+s(?: \([\d:]+\))?", summary), said
    made = re.search(r"envbuild: made cgroups(.*)", done.stderr)
    assert made is not None, said
    v2 = discover().v2
    for path in made.group(1).split():
        # the same cgroup, seen through this machine's own v2 mount
        assert v2 is not None
        assert not os.path.exists(v2.mountpoint + path.removeprefix("/sys/fs/cgroup")), path
