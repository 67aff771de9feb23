"""A cgroup v2 directory's files held open: from a freeze to its thaw, and from one freeze to
the next where something lives that long (a guard, a :class:`~treeguard.cgroup.Cgroup`);
and a v2 or v1 directory's, for the length of a thaw by another process (a token's holder,
the watchdog helper), whose check of the inode and write must reach the same cgroup.

Here an open, a read to the end and a close of a cgroup file cost 7 to 8 us (kernfs
allocates its open-file state at each open), a pread or pwrite on a descriptor held open
about 1 us. A kernfs seq file starts over when read at offset 0, so ``pread(fd, size, 0)``
reads it anew; a write to a cgroup control file ignores the offset (cgroup_file_write).
One read returns at most what the file's seq buffer holds (a page at first: a task list of
1,000 tasks takes two reads), and a read that stops at a full buffer stops at the end of a
whole line: one that returns less than :data:`_SHORT` bytes read to the end of the file.

Which cgroup they are: the directory is held too (``O_PATH``) and every file is opened
relative to it, so all of them belong to one cgroup, whose inode is :attr:`CgroupFiles.inode`
(cgroupfs never reuses one). Once that cgroup is removed every read and write through them
fails with ENODEV, and so does a file opened again after :meth:`CgroupFiles.close` if the
directory at the path is another one: nothing done through them ever reaches a cgroup made
again under the same path. Before each freeze, whoever keeps them asks for
:meth:`CgroupFiles.current`: the same files while the directory at the path is theirs (its
inode), else new ones for the path (a v2 cgroup cannot be renamed, but a symlink or a mount
on the way to it may name another cgroup while theirs lives on).

A thaw through them needs no new descriptor: a full descriptor table never stops it.

Only the process that opened them uses or closes them: a forked child gets copies of the
descriptors, whose numbers it may close and reuse; it opens its own.
"""

from __future__ import annotations

import errno
import os

from ._cgroupfs import _Events, write_error
from ._finalizers import Finalizer
from ._thaw import close_fd, open_file

__all__ = ["CgroupFiles"]

#: What one read asks for; a file longer than one read returns is read on from where the
#: last read ended, until a read returns nothing.
_CHUNK = 65536
#: A read that returns fewer bytes than this read the whole file: a kernfs seq buffer holds
#: at least a page (4 KiB) and ends early only before a line that does not fit, and no
#: line of these files comes near 2 KiB.
_SHORT = 2048
#: The errors of a file whose cgroup is gone (removed: ENODEV through a descriptor held).
_GONE = (errno.ENOENT, errno.ENODEV, errno.ENOTDIR)
#: The files written, held open for reading and writing alike.
_WRITTEN = frozenset({"cgroup.freeze", "freezer.state"})
#: The key of the directory's own descriptor.
_DIR = ""

#: How many times this process's memory was copied by a fork: a forked child's is one more
#: than its parent's (a look at a number, where getpid() is a system call).
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class _Held:
    """The descriptors of a :class:`CgroupFiles`, by file name, and the process that opened
    them: what its finalizer closes, without a reference to it.

    Each descriptor is used (and closed) only while it still names the file it was opened
    on (device and inode, one fstat): code that closes every descriptor it did not open
    (a daemon library, close_range) may have handed its number to a file of its own, which
    a freeze or thaw must never write. Such a number is forgotten, not closed, and the
    file opened again.
    """

    __slots__ = ("fds", "ids", "owner")

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.ids: dict[str, tuple[int, int]] = {}
        self.owner = _forks

    def put(self, name: str, fd: int, st: os.stat_result) -> None:
        """Hold ``fd``, opened on the file ``name``, whose fstat is ``st``."""
        self.ids[name] = (st.st_dev, st.st_ino)
        self.fds[name] = fd

    def get(self, name: str) -> int | None:
        """The descriptor of ``name``, if held and still its own (else forgotten)."""
        fd = self.fds.get(name)
        if fd is not None and not self._same(name, fd):
            del self.fds[name]
            return None
        return fd

    def _same(self, name: str, fd: int) -> bool:
        try:
            st = os.fstat(fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.ids.get(name)

    def drop(self, name: str) -> None:
        """Close the descriptor of ``name`` alone, if held (a forked child only forgets it)."""
        fd = self.fds.pop(name, None)
        if fd is not None and _forks == self.owner and self._same(name, fd):
            close_fd(fd)

    def close(self) -> None:
        fds, self.fds = self.fds, {}
        if _forks != self.owner:
            return  # a forked child's copies: their numbers may name its own files now
        for name, fd in fds.items():
            if self._same(name, fd):
                close_fd(fd)


class CgroupFiles:
    """The files of the cgroup directory ``path`` (v2; v1 for a thaw), each opened on first
    use and held.

    :param kept: someone that outlives a freeze keeps these (a guard's memo, a ``Cgroup``)
        and closes them; otherwise the freezer closes them once its thaw is confirmed.
    """

    def __init__(self, path: str, *, kept: bool = False) -> None:
        self.path = path
        self.kept = kept
        #: The inode of the directory held (0: none yet, whatever is at the path will do).
        self.inode = 0
        self._held = _Held()
        Finalizer(self, self._held.close)

    def _mine(self) -> _Held:
        held = self._held
        if held.owner != _forks:  # a forked child: the parent's are not ours to use
            held = self._held = _Held()
            Finalizer(self, held.close)
        return held

    def current(self) -> CgroupFiles:
        """Before a freeze: these files if the directory at :attr:`path` is still the one
        they are of (or none was opened yet), else new ones for whatever is there now. The
        path is looked at (its inode), not only whether their cgroup still exists: a path
        through a symlink, or under a mount point, may name another cgroup while that one
        lives on, and a freeze must be of the cgroup at the path, as everything done by
        path around it (the caller's check below it, the census's walk). These are left
        open: whoever keeps them closes them once nothing is due through them (a thaw of
        the cgroup they are of, which may live on elsewhere)."""
        if not self.inode:
            return self
        try:
            if os.stat(self.path).st_ino == self.inode:
                return self
        except OSError:
            pass
        return CgroupFiles(self.path, kept=self.kept)

    def opened(self) -> int:
        """The directory's inode, opening it if need be.

        :raises OSError: if it cannot be opened (ENODEV: it is another cgroup than the one
            these files were of).
        """
        self._dir()
        return self.inode

    def _dir(self) -> int:
        held = self._mine()
        fd = held.get(_DIR)
        if fd is None:
            fd = open_file(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
            except BaseException:
                close_fd(fd)
                raise
            if self.inode and st.st_ino != self.inode:
                # Opened again after close() (a thaw after its owner was closed, say):
                # these files are of the cgroup that was there, and it is gone.
                close_fd(fd)
                raise OSError(errno.ENODEV, "the cgroup was removed", self.path)
            self.inode = st.st_ino
            held.put(_DIR, fd, st)
        return fd

    def _fd(self, name: str) -> int:
        held = self._mine()
        fd = held.get(name)
        if fd is None:
            mode = os.O_RDWR if name in _WRITTEN else os.O_RDONLY
            fd = open_file(name, mode | os.O_CLOEXEC, dir_fd=self._dir())
            try:
                st = os.fstat(fd)
            except BaseException:
                close_fd(fd)
                raise
            held.put(name, fd, st)
        return fd

    def read(self, name: str) -> bytes | None:
        """The whole file ``name``; ``None`` if the cgroup is gone.

        :raises OSError: if the read fails otherwise (EOPNOTSUPP: the ``cgroup.procs`` of a
            threaded cgroup).
        """
        return self._read(name, _CHUNK, whole=True)

    def head(self, name: str, size: int) -> bytes | None:
        """The first ``size`` bytes of the file ``name`` at most (fewer: all of it, for a
        ``size`` within a page, which one read returns whole)."""
        return self._read(name, size, whole=False)

    def _read(self, name: str, size: int, *, whole: bool) -> bytes | None:
        own = -1
        try:
            try:
                fd = self._fd(name)
            except PermissionError:
                if name not in _WRITTEN:
                    raise
                # May be read, not written (this user): read through a descriptor of its
                # own; a write says what is wrong.
                fd = own = open_file(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir())
            data = os.pread(fd, size, 0)
            if whole and len(data) >= _SHORT:
                chunks = [data]
                offset = len(data)
                while chunk := os.pread(fd, _CHUNK, offset):
                    chunks.append(chunk)
                    offset += len(chunk)
                data = b"".join(chunks)
            return data
        except OSError as err:
            if err.errno in _GONE:
                return None
            raise
        finally:
            if own >= 0:
                close_fd(own)

    def write(self, name: str, value: str) -> None:
        """Write ``value`` to the file ``name`` (``cgroup.freeze``, ``freezer.state``), as
        one write(2).

        :raises CgroupError: if the write fails (gone: caused by ENODEV or ENOENT).
        """
        try:
            os.pwrite(self._fd(name), value.encode(), 0)
        except OSError as err:
            raise write_error(os.path.join(self.path, name), value, err) from err

    def watch(self) -> _Events:
        """``cgroup.events``, to read and wait on through the descriptor held (-1 if the
        cgroup is gone), for one wait: its caller closes it (which closes only the epoll
        instance a long wait makes). Not held from one wait to the next: a select.epoll
        closes its descriptor when collected, and a forked child that collected one of
        its parent's would close a number that may name a file of its own by then."""
        try:
            fd = self._fd("cgroup.events")
        except OSError as err:
            if err.errno in _GONE:
                return _Events.on(-1)
            raise
        return _Events.on(fd)

    def close_file(self, name: str) -> None:
        """Close the descriptor of the file ``name`` only, if held: a later use opens it
        again, relative to the directory held."""
        self._mine().drop(name)

    def close(self) -> None:
        """Close the descriptors (idempotent; a forked child only forgets them). A later use
        opens them again, if the directory at :attr:`path` is still the one they were of
        (else ENODEV, as through the descriptors of a removed cgroup)."""
        self._held.close()

    def __repr__(self) -> str:
        return f"<CgroupFiles {self.path} inode {self.inode}: {len(self._held.fds)} open>"
