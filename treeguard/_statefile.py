"""The state file of ``treeguard pause`` / ``treeguard resume``: written and read safely.

A state file names processes to resume, so whoever can write it could make ``resume``
signal processes of their choosing. It is therefore created exclusively (``O_CREAT |
O_EXCL``: never an existing file, never through a symlink, open(2)) with mode 0600, and
read only when it is a regular file, not a symlink (``O_NOFOLLOW``), owned by the caller and
writable by nobody else. The checks are made on the opened descriptor (``fstat``), and the
descriptor is compared with the path's ``lstat``, so a file swapped in between is noticed.
The token it holds is checked again by :func:`treeguard.thaw`, which never signals a
process whose starttime differs from the record.
"""

from __future__ import annotations

import os
import stat

from .errors import StateFileError

__all__ = ["MAX_SIZE", "create_exclusive", "read_checked", "remove_checked", "write_all"]

#: A state file larger than this is not one of ours.
MAX_SIZE = 1 << 20

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted at the path must not hang (it is refused after fstat).
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def create_exclusive(path: str) -> int:
    """Create ``path`` (mode 0600) and return a descriptor open for writing.

    :raises StateFileError: if ``path`` exists (a file, a symlink, anything) or cannot be
        created.
    """
    try:
        fd = os.open(path, _CREATE, 0o600)
    except FileExistsError:
        raise StateFileError(path, "it exists already (pause never overwrites a file)") from None
    except OSError as err:
        raise StateFileError(path, f"cannot create it: {err.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask did, never more than owner read/write
    except OSError:
        os.close(fd)
        raise
    return fd


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` and flush it to disk."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _check(path: str, info: os.stat_result) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise StateFileError(path, "it is a symbolic link")
    if not stat.S_ISREG(info.st_mode):
        raise StateFileError(path, "it is not a regular file")
    if info.st_uid != os.geteuid():
        raise StateFileError(path, f"it is owned by UID {info.st_uid}, not by you")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateFileError(
            path, f"it is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
        )


def read_checked(path: str) -> tuple[bytes, os.stat_result]:
    """Read a state file after checking it is safe to trust.

    :returns: its content and its ``fstat`` (for :func:`remove_checked`).
    :raises StateFileError: if it is missing, a symlink, not a regular file, not owned by
        the caller, writable by group or others, swapped while opening, or too large.
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        raise StateFileError(path, "it does not exist") from None
    except OSError as err:
        raise StateFileError(path, f"cannot look at it: {err.strerror}") from None
    _check(path, before)
    try:
        fd = os.open(path, _READ)
    except OSError as err:
        # ELOOP: a symlink was put there after the lstat.
        raise StateFileError(path, f"cannot open it safely: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        _check(path, info)
        if (info.st_dev, info.st_ino) != (before.st_dev, before.st_ino):
            raise StateFileError(path, "it was replaced while being opened")
        if info.st_size > MAX_SIZE:
            raise StateFileError(path, f"it is larger than {MAX_SIZE} bytes")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_SIZE:
                raise StateFileError(path, f"it is larger than {MAX_SIZE} bytes")
        return b"".join(chunks), info
    finally:
        os.close(fd)


def remove_checked(path: str, info: os.stat_result) -> None:
    """Remove ``path`` if it is still the file described by ``info``; else leave it."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino):
        os.unlink(path)
