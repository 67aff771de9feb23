"""cgroup v2 and v1 freezer support: discovery, and a cgroup of one's own.

::

    from treeguard import ProcessesGuard
    from treeguard.cgroup import Cgroup

    with Cgroup.create() as cg:               # a fresh cgroup, removed on exit
        worker = cg.spawn(["my-server"])      # born inside: its children are too
        with ProcessesGuard(backend="cgroup"):
            ...                               # the kernel holds every task frozen
        cg.kill()                             # or let the block end: spawned ones die

Hierarchies are found in ``/proc/self/mountinfo`` (never assumed at ``/sys/fs/cgroup``),
the caller's own cgroups in ``/proc/self/cgroup``; pure v2, pure v1 and hybrid machines
work alike.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, final

from ._backends import Plan
from ._backends._cgroup import CgroupV1Backend, CgroupV2Backend
from ._backends._freezers import freezer_for
from ._cgroup_members import adopt_into, kill_members
from ._cgroupfiles import CgroupFiles
from ._cgroupfs import holds_process, parse_keyed, procs_below, read_file
from ._checks import check_options
from ._delegation import choose
from ._drive import run_sync
from ._mounts import (
    Discovery,
    Hierarchy,
    discover,
    parse_mountinfo,
    parse_proc_cgroup,
    version_of,
)
from ._report import FreezeReport
from .errors import (
    CgroupError,
    CgroupUnavailableError,
    InvalidArgumentError,
)
from .procfs import ProcFS

if TYPE_CHECKING:
    import subprocess

__all__ = [
    "Cgroup",
    "Discovery",
    "Hierarchy",
    "discover",
    "parse_mountinfo",
    "parse_proc_cgroup",
]

PREFIX = "treeguard-"


@final
class Cgroup:
    """A cgroup (v2, or v1 freezer) to run a tree in and freeze as a whole.

    Make one with :meth:`create`; ``Cgroup(path)`` wraps an existing directory.

    :param path: the cgroup's directory.
    :param version: 2 or 1; found from the directory's files when omitted.
    :raises CgroupUnavailableError: if ``path`` is not a freezable cgroup directory.
    """

    def __init__(self, path: str, *, version: int | None = None) -> None:
        if not isinstance(path, str) or not path:
            raise InvalidArgumentError("path", f"must be a directory path, not {path!r}")
        found = version_of(path)
        if isinstance(version, bool) or version not in (None, 1, 2):
            raise InvalidArgumentError("version", f"must be 1 or 2, not {version!r}")
        if found is None or (version is not None and version != found):
            want = "v2 or v1 freezer" if version is None else f"v{version}"
            raise CgroupUnavailableError(path, f"not a non-root {want} cgroup directory")
        self.path = os.path.abspath(path)
        self.version = found
        self.kill_on_exit = False
        self._made = False
        self._spawned: list[subprocess.Popen[Any]] = []
        self._freezer: Any = None
        # v2: its files, held open from the first freeze until remove() or garbage
        # collection (each freeze checks they are still those of the directory at path).
        self._files = CgroupFiles(self.path, kept=True) if found == 2 else None

    # -- making one -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        *,
        version: int | None = None,
        parent: str | None = None,
        name: str | None = None,
        kill_on_exit: bool = False,
        procfs: ProcFS | None = None,
    ) -> Cgroup:
        """Make a fresh child cgroup named ``treeguard-<pid>-<random>``.

        :param version: 2 or 1 (v1 freezer); default: v2 when it is usable here (this
            process may make a cgroup in it and the kernel has its freezer), else v1.
        :param parent: the cgroup directory to create it in; default: the caller's own
            cgroup (a delegated subtree; the hierarchy's root only for a caller in it).
        :param name: the new directory's name (must start with ``treeguard-`` for
            ``backend="auto"`` to pick it).
        :param kill_on_exit: on leaving the ``with`` block, kill every process in it, not
            only those :meth:`spawn` started.
        :param procfs: where /proc is (for tests).
        :raises InvalidArgumentError: if an argument is malformed.
        :raises CgroupUnavailableError: if no such hierarchy is mounted, it is read-only, the
            kernel has no v2 freezer (Linux 5.2+; without version=, v1 is used then),
            or this process may not create a cgroup in its own cgroup or ``parent`` (the
            message says what to do: run as root or in a delegated subtree).
        """
        if isinstance(version, bool) or version not in (None, 1, 2):
            raise InvalidArgumentError("version", f"must be 1, 2 or None, not {version!r}")
        if name is None:
            name = f"{PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
        if (
            not isinstance(name, str)
            or not name
            or "/" in name
            or "\0" in name
            or name in (".", "..")
        ):
            raise InvalidArgumentError("name", f"must be a plain directory name, not {name!r}")
        if not isinstance(kill_on_exit, bool):
            raise InvalidArgumentError("kill_on_exit", "must be True or False")
        if parent is not None and (not isinstance(parent, str) or not parent or "\0" in parent):
            raise InvalidArgumentError("parent", f"must be a path, not {parent!r}")
        hierarchy, chosen = choose(discover(procfs), version, parent)
        version = hierarchy.version
        path = os.path.join(chosen, name)
        try:
            os.mkdir(path, 0o755)
        except OSError as err:
            raise CgroupUnavailableError(path, f"cannot create the cgroup: {err.strerror}") from err
        if version_of(path) != version:
            os.rmdir(path)
            raise CgroupUnavailableError(
                path,
                "the new cgroup has no "
                + (
                    "cgroup.freeze (the v2 freezer needs Linux 5.2+)"
                    if version == 2
                    else "freezer.state (the freezer controller is not in this hierarchy)"
                ),
            )
        cg = cls(path, version=version)
        cg._made = True
        cg.kill_on_exit = kill_on_exit
        return cg

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    # -- putting processes in ---------------------------------------------------------

    def spawn(self, args: Sequence[str] | str, **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start a program inside this cgroup, as :class:`subprocess.Popen` would.

        The child moves itself into the cgroup between fork and exec (it writes ``0`` to
        ``cgroup.procs``, which means "the writer", cgroup-v2.rst), so it runs not a single
        instruction of the program outside, and every process it forks is born inside.
        A ``preexec_fn`` of the caller runs after that.

        :raises CgroupError: if the child could not enter the cgroup (nothing runs then).
        """
        import subprocess  # only spawn needs it: not loaded with the package

        procs = os.path.join(self.path, "cgroup.procs")
        theirs: Callable[[], object] | None = popen_kwargs.pop("preexec_fn", None)

        def enter() -> None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
            if theirs is not None:
                theirs()

        try:
            proc: subprocess.Popen[Any] = subprocess.Popen(args, preexec_fn=enter, **popen_kwargs)
        except subprocess.SubprocessError as err:
            raise CgroupError(self.path, f"the child could not enter the cgroup: {err}") from err
        self._spawned.append(proc)
        return proc

    def adopt(self, pids: Iterable[int], *, max_passes: int = 10) -> list[int]:
        """Move processes, each with its whole tree of descendants, into this cgroup; a
        process forked while the tree moves is caught by walking the tree again.

        :returns: the PIDs moved.
        :raises InvalidArgumentError: if a PID is malformed, or is the caller or one of
            its ancestors (whose tree holds the caller).
        :raises NoSuchProcessError: if a PID does not exist.
        :raises CgroupError: if the tree kept forking outside for ``max_passes`` walks, or
            a process could not be moved.
        """
        return adopt_into(self.path, self.pids, pids, max_passes)

    # -- looking --------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every process in this cgroup and the cgroups below it."""

        return procs_below(self.path)

    @property
    def populated(self) -> bool:
        """Whether any process is in this cgroup (or below it)."""
        if self.version == 2:
            text = read_file(os.path.join(self.path, "cgroup.events"))
            return text is not None and parse_keyed(text).get("populated") == "1"
        return bool(self.pids())

    @property
    def frozen(self) -> bool:
        """Whether the kernel reports this cgroup frozen."""

        try:
            return freezer_for(self.version, self.path).is_frozen()
        except CgroupError:
            return False

    # -- freezing it directly ---------------------------------------------------------

    def freeze(self, *, timeout: float = 1.0) -> FreezeReport:
        """Freeze this cgroup as it is (no tree enumeration): the fastest way.

        :raises CgroupError: if the caller is inside it (it would freeze itself).
        :raises StopTimeoutError: if the kernel does not report it frozen in time; it is
            thawed then.
        """
        check_options(timeout=timeout, max_passes=1, partial_ok=False)
        held = self._files
        files = None if held is None else held.current()
        if held is not None and files is not held:
            # The path names another cgroup now (made again there, or through a symlink
            # or mount that names another): a freeze of this Cgroup still due is undone
            # first, through the files it froze through (nothing if its cgroup is gone).
            self.thaw()
            held.close()
        self._files = files
        self._refuse_if_caller_inside("freeze", files)
        plan = Plan.bare(timeout=float(timeout), scope="cgroup")
        backend: CgroupV1Backend | CgroupV2Backend = (
            CgroupV1Backend(plan, self.path)
            if files is None
            else CgroupV2Backend(plan, self.path, files)
        )
        if self._freezer is None:
            # Kept before the freeze starts: a freeze interrupted after the kernel froze
            # the cgroup is still ours to thaw (frozen by us already: the first one's).
            self._freezer = backend
        run_sync(backend.freeze())
        if backend is not self._freezer:
            backend.detach()
        return backend.report

    def thaw(self) -> None:
        """Undo :meth:`freeze` (a cgroup frozen before it stays frozen). Idempotent, and
        resumable: a thaw cut short (KeyboardInterrupt) is finished by the next call."""
        backend = self._freezer
        if backend is not None:
            run_sync(backend.thaw())
            self._freezer = None  # forgotten only once thawed

    def _refuse_if_caller_inside(self, what: str, files: CgroupFiles | None = None) -> None:
        """:raises CgroupError: if the calling process is in this cgroup (or below it): v2
        searches its lists (1 to 2 us through ``files``; the caller's own cgroup, 20)."""
        if self.version == 2:
            inside = holds_process(self.path, os.getpid(), files)
        else:
            mine = discover().own_directory(self.version)
            inside = mine is not None and (mine == self.path or mine.startswith(self.path + "/"))
        if inside:
            raise CgroupError(self.path, f"the calling process is in it and would {what} itself")

    # -- cleaning up ------------------------------------------------------------------

    def kill(self, *, timeout: float = 5.0) -> None:
        """Thaw, SIGKILL every process in the cgroup, and wait until it is empty.

        The caller becomes a child subreaper meanwhile, so that the children of killed
        processes are reaped by it (PID 1 may not reap); zombies that become its children
        are reaped, those started by :meth:`spawn` through their Popen. The caller's own
        children from before (started otherwise, then adopted) are left for it to reap,
        with their exit status.

        :raises CgroupError: if the caller is inside it (it would kill itself; nothing is
            killed then), if processes remain after ``timeout`` seconds, or if this
            process has fewer than two file descriptors to spare.
        """
        self._kill(None, timeout)

    def _kill(self, only: set[int] | None, timeout: float) -> None:
        if only is None:  # (what spawn() started never holds the caller)
            self._refuse_if_caller_inside("kill")
        self._thaw_all()
        kill_members(self.path, self.pids, self._spawned, only, timeout)

    def _thaw_all(self) -> None:
        self.thaw()

        freezer = freezer_for(self.version, self.path)
        if freezer.is_frozen() or self.version == 1:
            # Killing needs runnable tasks: a v1-frozen task does not act on SIGKILL.
            freezer.froze = True
            run_sync(freezer.thaw())

    def remove(self, *, timeout: float = 5.0) -> None:
        """Thaw, wait until the cgroup (with any child cgroups) is empty, and remove it.

        Idempotent: a cgroup already gone is fine.

        :raises CgroupError: if processes are still in it after ``timeout`` seconds (kill
            them first: :meth:`kill`).
        """
        if not os.path.isdir(self.path):
            self._close_files()
            return
        self._thaw_all()
        self._close_files()
        deadline = time.monotonic() + timeout
        while self.pids():
            if time.monotonic() > deadline:
                raise CgroupError(
                    self.path,
                    f"still holds processes {self.pids()[:20]}: kill() them or let them exit",
                )
            time.sleep(0.001)
        for top, subdirs, _ in sorted(os.walk(self.path), key=lambda w: -len(w[0])):
            for d in subdirs:
                _rmdir(os.path.join(top, d), deadline)
        _rmdir(self.path, deadline)
        for proc in self._spawned:
            proc.poll()

    def _close_files(self) -> None:
        """Close the files held (a later freeze opens those of the cgroup there then)."""
        if self._files is not None:
            self._files.close()

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Thaw; kill what :meth:`spawn` started (everything if ``kill_on_exit``); remove."""
        if not os.path.isdir(self.path):
            return
        if self.kill_on_exit:
            self._kill(None, 5.0)
        elif self._spawned:
            self._kill(self._descendants_of_spawned(), 5.0)
        self.remove()

    def _descendants_of_spawned(self) -> set[int]:
        from ._tree import children_source, walk

        fs = ProcFS()
        source = children_source(fs)
        starts = [p.pid for p in self._spawned if p.poll() is None]
        return set(walk(starts, fs.stat, source))

    def __repr__(self) -> str:
        return f"<Cgroup v{self.version} {self.path}>"


def _rmdir(path: str, deadline: float) -> None:
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as err:
            # EBUSY: the last task has exited but is not released yet.
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(path, f"cannot remove the cgroup: {err.strerror}") from err
            time.sleep(0.001)
