"""README's Python examples run as printed, each in a process of its own, and print what
README says they do. What an example leaves behind (a child, a helper) is killed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
PLUGIN_EXAMPLE = Path(__file__).with_name("plugin_example.py")

#: Each example, known by a line of it, and what it must print (a regular expression
#: matched against the whole output).
EXPECTED = {
    "with treeguard.ProcessesGuard() as guard:": r"\(\d+, \d+, \d+\) \d\S*\n",
    "async with treeguard.guard() as g:": r"frozen: \(\d+,\)\n",
    "token = treeguard.freeze()": r"1\n",
    "treeguard.freezethaw(lambda": r"copied while frozen\n",
    "with Cgroup.create() as cg:": r"cgroup 1 cgroup v[12]: /\S+ says frozen 1\n",
    "frozen = guard.snapshot()": r'(?s).*consistent \(two passes agree\)\n.*"consistent": true,.*',
    "ProcessesGuard(max_frozen=5.0)": r"\(\d+,\)\nFalse\n",
}

# Runs the example as a child of a subreaper: what the example leaves behind when it
# exits is re-parented here, given a moment to exit, then killed (by PID: all started by
# the example) and reaped.
_RUNNER = """
import ctypes, os, signal, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
code = subprocess.run([sys.executable, "-c", sys.argv[1]]).returncode
deadline = time.monotonic() + 5.0
while time.monotonic() < deadline:
    try:
        if os.waitpid(-1, os.WNOHANG)[0] == 0:
            time.sleep(0.005)
    except ChildProcessError:
        sys.exit(code)  # nothing left
with open(f"/proc/self/task/{os.getpid()}/children") as f:
    left = f.read().split()
print("the example left these running, killed now:", left, file=sys.stderr)
for pid in left:
    os.kill(int(pid), signal.SIGKILL)
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
sys.exit(code or 99)
"""


def _examples() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.MULTILINE | re.DOTALL)


def _key(example: str) -> str:
    keys = [key for key in EXPECTED if key in example]
    assert len(keys) == 1, f"README example without exactly one expectation here:\n{example}"
    return keys[0]


SCRIPTS = [e for e in _examples() if "def test_" not in e]


def test_every_example_is_checked() -> None:
    assert sorted(map(_key, SCRIPTS)) == sorted(EXPECTED)
    fixtures = [e for e in _examples() if "def test_" in e]
    # The pytest example runs in test_plugin.py, from a file that must match README.
    assert fixtures == [PLUGIN_EXAMPLE.read_text().split("\n", 1)[1]]


@pytest.mark.parametrize("example", SCRIPTS, ids=[_key(e) for e in SCRIPTS])
def test_example_runs_as_printed(example: str) -> None:
    if "Cgroup" in example:
        require_root("the cgroup example")
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER, example],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(EXPECTED[_key(example)], result.stdout), result.stdout
