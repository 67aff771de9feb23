"""What a freeze keeps between freezes instead of reading /proc again: this process's
ancestors (kept while all of them live, which their pidfds tell) and the mount table (kept
until the kernel says it changed). Each must notice the change it is kept against."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import require_root
from treeguard import cgroup
from treeguard._subreaper import is_subreaper, set_subreaper
from treeguard._tree import ancestors
from treeguard.procfs import ProcFS, Stat


def _run(script: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_ancestors_are_read_once_while_they_live(monkeypatch: pytest.MonkeyPatch) -> None:
    fs = ProcFS()
    first = ancestors(fs)
    assert first == ancestors(fs, os.getpid())  # the walk of every call agrees
    read: list[int] = []
    real_stat = ProcFS.stat

    def counted_stat(self: ProcFS, pid: int, tid: int | None = None) -> Stat | None:
        read.append(pid)
        return real_stat(self, pid, tid)

    monkeypatch.setattr(ProcFS, "stat", counted_stat)
    assert ancestors(fs) == first
    assert read == []


_CHILD = """
import sys
from treeguard._tree import ancestors
from treeguard.procfs import ProcFS
print(ancestors(ProcFS()), flush=True)
sys.stdin.readline()  # its parent is killed meanwhile
print(ancestors(ProcFS()), flush=True)
sys.stdin.readline()
"""


def test_the_ancestors_are_read_again_once_one_exits() -> None:
    # parent -> child; the parent is killed, and the child, re-parented to this process
    # (a subreaper meanwhile), must see its new chain.
    was = is_subreaper()
    set_subreaper(True)
    start_child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {_CHILD!r}])"
    parent = subprocess.Popen(
        [sys.executable, "-c", start_child],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdin is not None and parent.stdout is not None
    child = 0
    try:
        before = ast.literal_eval(parent.stdout.readline())
        assert before[:2] == [parent.pid, os.getpid()]
        child = next(
            int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == parent.pid
        )
        parent.kill()
        parent.wait()
        parent.stdin.write("\n")
        parent.stdin.flush()
        after = ast.literal_eval(parent.stdout.readline())
        assert after == before[1:]
        parent.stdin.write("\n")
        parent.stdin.flush()
        assert os.waitpid(child, 0)[1] == 0
        child = 0
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        parent.kill()
        parent.wait()
        parent.stdin.close()
        parent.stdout.close()
        set_subreaper(was)


def _ppid(pid: int) -> int:
    stat = ProcFS().stat(pid)
    return -1 if stat is None else stat.ppid


def test_a_forked_child_reads_its_own_ancestors() -> None:
    out = _run(
        """
        import os
        from treeguard._tree import ancestors
        from treeguard.procfs import ProcFS
        before = ancestors(ProcFS())
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, repr(ancestors(ProcFS())).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.getpid(), before, os.read(r, 4096).decode())
        """
    )
    me, rest = out.split(" ", 1)
    before, child = rest.split("] ")
    assert ast.literal_eval(child) == [int(me), *ast.literal_eval(before + "]")]


def test_the_mount_table_is_read_again_when_it_changes() -> None:
    require_root("remounting the cgroup hierarchy")
    v2 = cgroup.discover().v2
    if v2 is None:
        pytest.skip("no cgroup v2 hierarchy here")  # CI has one
    # In a mount namespace of its own (so the remounts stay there), the v2 hierarchy is
    # made read-only and writable again: each change must be seen, and nothing else
    # read again.
    out = _run(
        """
        import ctypes, os
        from treeguard import _mounts as cgroup
        from treeguard.procfs import ProcFS
        libc = ctypes.CDLL(None, use_errno=True)
        MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18

        def check(status):
            assert status == 0, os.strerror(ctypes.get_errno())

        def remount(read_only):
            flags = MS_REMOUNT | MS_BIND | (MS_RDONLY if read_only else 0)
            check(libc.mount(None, v2.mountpoint.encode(), None, flags, None))

        fs = ProcFS()
        v2 = cgroup.hierarchies(fs)[0]  # read and kept, in the first namespace
        check(libc.unshare(0x00020000))  # CLONE_NEWNS
        check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None))
        remount(True)
        seen = [cgroup.hierarchies(fs)[0].read_only]  # another namespace
        remount(False)
        seen.append(cgroup.hierarchies(fs)[0].read_only)  # changed
        kept = cgroup._MOUNTS._data
        seen.append(cgroup.hierarchies(fs)[0].read_only)
        print(seen, cgroup._MOUNTS._data is kept)
        """
    )
    assert out.split() == ["[True,", "False,", "False]", "True"]
