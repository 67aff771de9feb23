"""The environments of the matrix (tests/integration/test_environments.py): what each one
offers, and the builder that makes it with namespaces and runs the inside suite
(tests/integration/test_inside_environment.py) in it.

Run as root, as PID 1 of fresh mount and PID namespaces (the matrix starts it so)::

    unshare --mount --propagation private --pid --fork --mount-proc \\
        python tests/envbuild.py ENV SCRATCH -- PYTEST-ARGS...

It mounts the environment's cgroup layout (never touching the machine's: the mount
namespace is private), makes the environment's cgroup (and, for the delegated one, hands
it to uid 65534 as systemd's ``Delegate=yes`` does), forks the runner, which enters that
cgroup (one in each hierarchy it can reach: v2 and the v1 freezer), drops to its user and
runs pytest; then it thaws and kills what is left in its cgroups, removes them and exits
with pytest's status (a cgroup that still had child cgroups, left by the inside suite,
makes the status 70). When it exits, the kernel kills anything left
in the PID namespace.

Uid 65534 cannot reach an interpreter or a checkout under a directory only root may
search (``/root``, a CI job's ``mktemp -d``): in the private mount namespace each such
directory is covered by a tmpfs holding only the entries needed, each bind-mounted from the
original, so nothing of the machine changes and nothing is copied.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

NOBODY = 65534
#: The builder could not make the environment here (no such controller, no unshare).
CANNOT_BUILD = 77
#: The inside suite passed but left a cgroup behind.
LEFT_CGROUPS = 70


@dataclass(frozen=True)
class Expect:
    """What ``treeguard doctor`` must say inside an environment, and what works there."""

    layout: str  # "v2", "v1", "hybrid", "none"
    uid: int  # as seen inside
    user_namespace: bool = False
    children_files: bool = True
    cgroup: int | None = 2  # the version Cgroup.create() makes; None: refused
    refusal: str = ""  # regex of the refusal, when cgroup is None
    delegated: bool = False  # the runner sits in a non-root cgroup, its parent for create()
    ptrace: bool = True


ENVIRONMENTS: dict[str, Expect] = {
    # A systemd host: cgroup2 alone at /sys/fs/cgroup, root in a cgroup of its own.
    "v2": Expect("v2", 0, delegated=True),
    # An unprivileged user in a delegated cgroup (systemd-run --user --scope -p Delegate=yes).
    "v2-delegated": Expect("v2", NOBODY, delegated=True),
    # An unprivileged user on a pure v2 host, nothing delegated: its cgroup is the root's.
    "user": Expect("v2", NOBODY, cgroup=None, refusal="may not create a cgroup"),
    # An older host: the v1 freezer controller at its usual place, no v2.
    "v1": Expect("v1", 0, cgroup=1, delegated=True),
    # No cgroup filesystem at all.
    "none": Expect("none", 0, cgroup=None, refusal="not mounted"),
    # A rootless container: a user namespace mapping uid 65534 to root, its own PID
    # namespace and /proc, a read-only cgroup mount.
    "rootless": Expect("v2", 0, user_namespace=True, cgroup=None, refusal="read-only"),
    # A hybrid host whose kernel has no children files (simulated in the inside suite).
    "nochildren": Expect("hybrid", 0, children_files=False, delegated=True),
    # A hybrid host whose v2 mount is read-only here, the v1 freezer writable: the cgroup
    # backend works through v1, and the doctor says so.
    "hybrid-rov2": Expect("hybrid", 0, cgroup=1, delegated=True),
}

#: The mounts an environment makes read-only once the runner is in its cgroups.
READ_ONLY = {"rootless": "/sys/fs/cgroup", "hybrid-rov2": "/sys/fs/cgroup/unified"}


def _run(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _bind(source: str, target: str) -> None:
    """mount(2) with MS_BIND, called directly: mount(8) would resolve the source path again
    by its name, not through the descriptor it names. (ctypes is imported up front: a
    directory of the interpreter's own may be covered while this runs.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    ms_bind = 4096
    if libc.mount(source.encode(), target.encode(), None, ms_bind, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bind {source} on {target}: {os.strerror(err)}")


def _mount_layout(name: str) -> None:
    """Replace /sys/fs/cgroup (in this mount namespace) by the environment's layout."""
    if os.path.ismount("/sys/fs/cgroup"):
        _run("umount", "--recursive", "--lazy", "/sys/fs/cgroup")
    layout = ENVIRONMENTS[name].layout
    if layout == "v2":
        # rootless: made read-only (per mount, never the shared superblock) once the
        # runner is in its cgroup, see _runner.
        _run("mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup")
    elif layout in ("v1", "hybrid"):
        _run("mount", "-t", "tmpfs", "-o", "mode=0755,size=64k", "cgroup", "/sys/fs/cgroup")
        os.mkdir("/sys/fs/cgroup/freezer")
        _run("mount", "-t", "cgroup", "-o", "freezer", "cgroup", "/sys/fs/cgroup/freezer")
        if layout == "hybrid":
            os.mkdir("/sys/fs/cgroup/unified")
            _run("mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup/unified")


def _mounted_hierarchies() -> list[tuple[int, str]]:
    """The v2 and v1 freezer mountpoints of this mount namespace (the environment's)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            after = tail.split()
            if after and after[0] == "cgroup2":
                found.append((2, head.split()[4]))
            elif after and after[0] == "cgroup" and "freezer" in after[-1].split(","):
                found.append((1, head.split()[4]))
    return sorted(found, reverse=True)


def _make_own_cgroup(name: str) -> tuple[list[str], dict[str, str]]:
    """The environment's cgroups (made here, removed by :func:`_remove`) and what the inside
    suite is told about them. The runner enters each ``tgenv-*`` one: one per hierarchy it
    can reach (v2 and the v1 freezer), so that whatever the inside suite makes is below
    them, checked and removed (the v1 freezer hierarchy is the machine's own, and v2's
    too: the runner's cgroup would otherwise be the one it had on the machine)."""
    tag = secrets.token_hex(4)
    made = []
    for version, mountpoint in _mounted_hierarchies():
        own = os.path.join(mountpoint, f"tgenv-{tag}")
        os.mkdir(own)
        made.append(own)
        _made(version, f"/tgenv-{tag}")
    if name != "v2-delegated":
        return made, {}
    own = made[0]
    # systemd's Delegate=yes: the directory and these three files belong to the user.
    for entry in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(os.path.join(own, entry), NOBODY, NOBODY)
    # Half delegated: the directory is the user's, but moving a process there from its
    # own cgroup needs the root cgroup's cgroup.procs, which is not.
    half = f"/sys/fs/cgroup/tgenv-{tag}-half"
    os.mkdir(half)
    os.chown(half, NOBODY, NOBODY)
    _made(2, f"/tgenv-{tag}-half")
    return [*made, half], {"TREEGUARD_TEST_HALF": half}


def _made(version: int, cgroup: str) -> None:
    """Tell the matrix a cgroup made (by its path in the hierarchy), to check it is gone."""
    print(f"envbuild: made cgroup v{version} {cgroup}", file=sys.stderr, flush=True)


def _reachable(paths: list[str]) -> None:
    """Make every path of ``paths`` reachable by any user, in this mount namespace only."""
    tree: dict[str, dict] = {}
    for path in paths:
        node = tree
        for part in os.path.realpath(path).strip("/").split("/"):
            node = node.setdefault(part, {})
    _open_up("/", tree)


def _open_up(directory: str, needed: dict[str, dict]) -> None:
    if not needed:
        return
    if not os.stat(directory).st_mode & 0o001:
        # Others may not search it: cover it with a tmpfs holding only what is needed,
        # each entry bind-mounted from the original, opened before it is covered (a path
        # through the covered directory would lead into the tmpfs).
        fds = {name: os.open(os.path.join(directory, name), os.O_PATH) for name in needed}
        try:
            _run("mount", "-t", "tmpfs", "-o", "mode=0755,size=64k", "shadow", directory)
            for name, fd in fds.items():
                source = f"/proc/{os.getpid()}/fd/{fd}"  # read by mount(8)
                target = os.path.join(directory, name)
                if os.path.isdir(source):
                    os.mkdir(target)
                else:
                    open(target, "x").close()
                _bind(source, target)
        finally:
            for fd in fds.values():
                os.close(fd)
    for name, below in needed.items():
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            _open_up(path, below)


def _runner(name: str, cgroups: list[str], env: dict[str, str], argv: list[str]) -> None:
    """In the forked child: enter the environment's cgroup, become its user, run pytest."""
    for path in cgroups:
        if not path.endswith("-half"):
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write("0")  # "the writer", in v1 and v2 alike
    if name in READ_ONLY:  # a container's cgroup mount without delegation
        _run("mount", "-o", "remount,bind,ro", READ_ONLY[name])
    os.chdir(os.getcwd())  # through the bind mounts of _reachable
    expect = ENVIRONMENTS[name]
    if expect.uid == NOBODY or name == "rootless":
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    command = [sys.executable, "-m", "pytest", *argv]
    if name == "rootless":
        command = [
            "unshare",
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--mount-proc",
            # PID 1 of the container is a shell, as in most containers; pytest below it.
            *("sh", "-c", '"$@"; exit $?', "sh"),
            *command,
        ]
    os.execvpe(command[0], command, env)


def _remove(cgroups: list[str]) -> bool:
    """Thaw, kill what is left in the environment's cgroups and remove them; False if one
    still had a child cgroup (the inside suite left it).

    Every cgroup of every hierarchy is thawed before any is killed: a process left frozen
    in a v1 cgroup is in a v2 one too, and dies (leaving that one removable) only once
    thawed.
    """
    for mountpoint in set(READ_ONLY.values()):
        if cgroups and "ro" in _options(mountpoint):
            _run("mount", "-o", "remount,bind,rw", mountpoint)
    trees = {path: _below(path) for path in cgroups if os.path.isdir(path)}
    left = [d for below in trees.values() for d in below]
    if left:
        print(f"envbuild: cgroups left behind: {left}", file=sys.stderr)
    deadline = time.monotonic() + 10
    for path, below in trees.items():
        _thaw([path, *below])
    for path, below in trees.items():
        _kill([path, *below], deadline)
    for path, below in trees.items():
        rmdir_cgroups([*reversed(below), path], deadline)
    return not left


def _below(path: str) -> list[str]:
    """The cgroups below ``path``, parents first."""
    return sorted((os.path.join(t, d) for t, ds, _ in os.walk(path) for d in ds), key=len)


def _remove_one(path: str, deadline: float) -> None:
    """Thaw, empty and remove one cgroup and those below it."""
    below = _below(path)
    _thaw([path, *below])
    _kill([path, *below], deadline)
    rmdir_cgroups([*reversed(below), path], deadline)


def _write(path: str, data: str) -> bool:
    """Write a cgroup file; False if this cgroup has no such file (cgroupfs refuses to
    create one with EACCES, so its absence is asked first)."""
    if not os.path.isfile(path):
        return False
    with open(path, "w") as f:
        f.write(data)
    return True


def _thaw(cgroups: list[str]) -> None:
    """Thaw each cgroup, parents first (a v1 child stays frozen while its parent is): a
    v1-frozen task does not die of SIGKILL until thawed."""
    for d in cgroups:
        if not _write(os.path.join(d, "cgroup.freeze"), "0"):
            _write(os.path.join(d, "freezer.state"), "THAWED")


def _kill(cgroups: list[str], deadline: float) -> None:
    """Kill every task in the cgroups: through cgroup.kill (v2, Linux 5.14+) where the top
    one has it, else by the PIDs each lists."""
    if _write(os.path.join(cgroups[0], "cgroup.kill"), "1"):
        return
    for d in cgroups:
        kill_listed(d, deadline)


def rmdir_cgroups(cgroups: list[str], deadline: float) -> None:
    """Remove each (empty) cgroup directory, in order, retrying while the kernel has not
    yet released its last exited tasks (EBUSY) until ``deadline``."""
    for d in cgroups:
        while True:
            try:
                os.rmdir(d)
                break
            except OSError:  # EBUSY: its last tasks are not released yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)


def kill_listed(cgroup: str, deadline: float) -> None:
    """SIGKILL each process listed in ``cgroup``'s cgroup.procs until none is left (a
    process may fork while it is killed), for kernels without cgroup.kill and for v1.

    :raises TimeoutError: if processes are still listed at ``deadline``.
    """
    while True:
        with open(os.path.join(cgroup, "cgroup.procs")) as f:
            # 0: a process of another PID namespace (cgroup-v2.rst), not ours to signal
            pids = [pid for pid in map(int, f.read().split()) if pid > 0]
        if not pids:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{cgroup} still holds {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if os.getpid() == 1:  # as init, reap them: orphans of the inside suite
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass
        time.sleep(0.005)


def _options(mountpoint: str) -> list[str]:
    """The per-mount options of the (topmost) mount at ``mountpoint`` (proc(5))."""
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                found = fields[5].split(",")
    return found


def _expire(signum: int, frame: object) -> None:
    raise TimeoutError("the environment's run took too long")


def main() -> int:
    name, scratch, sep, *argv = sys.argv[1:]
    assert sep == "--" and name in ENVIRONMENTS, "usage: envbuild.py ENV SCRATCH -- ARGS"
    assert os.getpid() == 1, "run as PID 1 of a fresh PID namespace"
    # Init of a PID namespace ignores signals it has no handler for: a bound of our own.
    signal.signal(signal.SIGALRM, _expire)
    signal.alarm(100)
    try:
        _mount_layout(name)
        cgroups, told = _make_own_cgroup(name)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        print(f"envbuild: cannot build {name}: {err} {detail.decode()}", file=sys.stderr)
        return CANNOT_BUILD
    try:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": scratch,
            "PYTHONDONTWRITEBYTECODE": "1",
            "TREEGUARD_TEST_ENV": name,
            **{k: v for k, v in os.environ.items() if k in ("CI", "LANG", "LC_ALL")},
            **told,
        }
        if ENVIRONMENTS[name].uid == NOBODY or name == "rootless":
            needed = [sys.prefix, sys.base_prefix, os.getcwd(), scratch, *sys.path[1:]]
            _reachable([p for p in needed if os.path.isabs(p) and os.path.exists(p)])
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the runner
            try:
                _runner(name, cgroups, env, argv)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(127)
        while True:  # as init, reap every orphan until the runner is done
            done, status = os.wait()
            if done == pid:
                break
        code = os.waitstatus_to_exitcode(status)
    finally:
        clean = _remove(cgroups)
    return code if code or clean else LEFT_CGROUPS


if __name__ == "__main__":
    raise SystemExit(main())
