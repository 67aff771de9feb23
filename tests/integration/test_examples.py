"""Every code example of README.md and of the documentation (docs/**/*.md) runs as printed,
each in a process of its own under a subreaper, and prints what the page says it does.

Each ```python or ```sh block is followed, on the next line, by an HTML comment (invisible
on the rendered page) that says what to expect:

- ``<!-- prints: REGEX -->``: run it; its output must match REGEX (``re.fullmatch``);
- ``<!-- as root, prints: REGEX -->``: the same, for an example that needs root (cgroups,
  PID namespaces): skipped elsewhere, never in CI;
- ``<!-- not run: REASON -->``: an install command or a long benchmark that CI runs itself.

A Python block that defines ``test_`` functions is a test file: it runs under pytest (with
treeguard's plugin) and must pass. A shell block runs under ``bash -eu`` with the running
interpreter's ``bin`` directory first on PATH (as in an activated virtual environment).
Every example runs in a fresh temporary directory; whatever it leaves running when it exits
fails the test (and is killed).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_root

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PLUGIN_EXAMPLE = Path(__file__).with_name("plugin_example.py")

_BLOCK = re.compile(
    r"^```(?P<lang>python|sh)\n(?P<code>.*?)^```\n(?P<marker>[^\n]*)", re.MULTILINE | re.DOTALL
)
_MARKER = re.compile(r"<!-- (?:(?P<root>as root, )?prints: (?P<regex>.*)|not run: (?P<why>.+)) -->")

# Runs the command in argv[1:] as a child of a subreaper: what the example leaves behind
# when it exits is re-parented here, given a moment to exit, then killed (by PID: all
# started by the example) and reaped; leaving anything is a failure (status 99).
_RUNNER = """
import ctypes, os, signal, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
code = subprocess.run(sys.argv[1:]).returncode
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


@dataclass(frozen=True)
class Example:
    page: str
    line: int
    lang: str
    code: str
    marker: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def is_test_file(self) -> bool:
        return self.lang == "python" and re.search(r"^def test_", self.code, re.M) is not None


def _examples() -> list[Example]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            name = str(page.relative_to(ROOT))
            found.append(Example(name, line, m["lang"], m["code"], m["marker"]))
    return found


EXAMPLES = _examples()
RUN = [e for e in EXAMPLES if (m := _MARKER.fullmatch(e.marker)) and m["regex"] is not None]


def test_every_example_says_what_to_expect() -> None:
    unmarked = [e.id for e in EXAMPLES if not _MARKER.fullmatch(e.marker)]
    assert not unmarked, f"code blocks without a <!-- prints: ... --> line after them: {unmarked}"
    assert len(RUN) >= 20  # README's and the guides': the pattern above found them


def test_the_plugin_example_is_the_documented_one() -> None:
    # tests/integration/test_plugin.py runs the pool example through pytester as well.
    body = PLUGIN_EXAMPLE.read_text().split("\n", 1)[1]
    assert body in [e.code for e in EXAMPLES if e.is_test_file]


def _command(example: Example, where: Path) -> list[str]:
    if example.lang == "sh":
        return ["bash", "-euc", example.code]
    if example.is_test_file:
        (where / "test_example.py").write_text(example.code)
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "test_example.py"]
    return [sys.executable, "-c", example.code]


@pytest.mark.parametrize("example", RUN, ids=[e.id for e in RUN])
def test_example_runs_as_printed(example: Example, tmp_path: Path) -> None:
    marker = _MARKER.fullmatch(example.marker)
    assert marker is not None
    if marker["root"]:
        require_root(f"the example at {example.id}")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER, *_command(example, tmp_path)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.fullmatch(marker["regex"], result.stdout), (result.stdout, result.stderr)
