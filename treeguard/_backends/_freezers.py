"""Which cgroup freezer serves a cgroup (:mod:`._freezer_v2`, :mod:`._freezer_v1`), and a thaw
of a cgroup that any process can run (a token's holder, the watchdog helper)."""

from __future__ import annotations

from .._cgroupfiles import CgroupFiles
from .._drive import run_sync
from ..errors import (
    CgroupError,
    InvalidArgumentError,
)
from ..procfs import ProcFS
from ._base import Journal
from ._freezer_base import CgroupFreezer, is_gone
from ._freezer_v1 import V1Freezer
from ._freezer_v2 import V2Freezer

__all__ = ["CgroupFreezer", "V1Freezer", "V2Freezer", "freezer_for", "thaw_cgroup"]


def freezer_for(
    version: int,
    path: str,
    fs: ProcFS | None = None,
    journal: Journal | None = None,
    files: CgroupFiles | None = None,
) -> CgroupFreezer:
    """The freezer of a v1 or v2 cgroup directory (through ``files``, current for this
    freeze or thaw, if given)."""
    if version == 2:
        return V2Freezer(path, fs, journal, files)
    if version == 1:
        return V1Freezer(path, fs, journal, files)
    raise InvalidArgumentError("version", f"must be 1 or 2, not {version!r}")


def thaw_cgroup(version: int, path: str, inode: int | None = None) -> int:
    """Thaw a cgroup frozen by another process (a token, the watchdog): 1 if it was
    thawed, 0 if it is gone (or, given ``inode``, if the directory is another cgroup now).

    The directory is opened once; its inode is read from that descriptor, and the thaw is
    written and confirmed through files opened relative to it. A cgroup removed after the
    check and made again under the same name (another cgroup, perhaps frozen on purpose)
    is never written: the write reaches the removed one, and counts as gone.

    :raises CgroupError: if the thaw could not be written for another reason (out of
        descriptors, not permitted): call again to retry.
    """
    files = CgroupFiles(path)
    freezer = freezer_for(version, path, files=files)
    try:
        try:
            if inode is not None and freezer.inode != inode:
                return 0
        except CgroupError as err:
            if not is_gone(err):
                raise
            return 0
        freezer.froze = True
        run_sync(freezer.thaw())
        return 0 if freezer.gone else 1
    finally:
        files.close()
