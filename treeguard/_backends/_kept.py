"""A census kept from one freeze to the next freeze of the same guard.

A supervisor that freezes the same tree every few seconds need not read every task's
``children`` file each time: what the last census proved still holds if nothing that could
change it happened since. Three things could: a task of the tree forked or exited (the
kernel's process events say so, :mod:`treeguard._proc_events`), a task moved in or out (the
cgroup's task list reads differently), or the cgroup is another one (its directory's inode
differs: cgroupfs never reuses one). The census is taken over only when the task list reads
byte for byte as it did, and no fork or exit named one of its tasks since; otherwise it is
read in full, as at a first freeze. Once the cgroup is frozen the events are read again: the
forks of a frozen cgroup's tasks are over and each was queued before ``fork()`` returned, so
a census taken over that turns out stale is read anew there, from the frozen cgroup.

The cgroup itself is taken over with the census: while the census may be, the tree is still
in the cgroup it was in if its top processes are the same and the task list reads as it did
(which also says that no process that must keep running moved in), so the cgroup need not be
found again (:meth:`Kept.target`).

Without process events (another namespace, an old kernel) nothing is kept.
"""

from __future__ import annotations

from .._cgroupfs import _listing, _subtree
from .._drive import Steps
from .._proc_events import ProcEvents
from ._base import Plan
from ._census import _Census
from ._freezers import CgroupFreezer
from ._target import Target, _top, held_files

__all__ = ["Kept"]

_KEY = "cgroup census"
#: Freezes in a row that may take a census over before one reads it in full: the kernel
#: drops an event silently if it cannot allocate its message (cn_netlink_send_mult), so
#: what such a loss could hide is found again within this many freezes.
_MAX_TAKEN = 32


class Kept:
    """The process events subscription of a guard, and the census its last freeze proved
    (if it may be taken over)."""

    def __init__(self, events: ProcEvents) -> None:
        self.events = events
        self.census: _Census | None = None
        self._target: Target | None = None  # the cgroup the census was proven in
        self._taken = 0  # freezes in a row that took the census over
        self._where: tuple[int, str, int, frozenset[int]] | None = None

    @classmethod
    def of(cls, plan: Plan) -> Kept | None:
        """The guard's, subscribed at its second cgroup freeze: a guard frozen once never
        subscribes. ``None`` without a guard, at a first freeze, or where the kernel gives
        no process events (then nothing is kept, ever)."""
        memo = plan.memo
        if memo is None:
            return None
        kept = memo.get(_KEY)
        if isinstance(kept, Kept):
            return kept
        if kept is None:
            memo.put(_KEY, "frozen once")
            return None
        if kept != "frozen once":
            return None  # no events to be had
        events = ProcEvents.open()
        found = None if events is None else cls(events)
        memo.put(_KEY, found or "no events")
        return found

    @staticmethod
    def held(plan: Plan) -> Kept | None:
        """The guard's subscription if it has one already (see :meth:`of`), without
        asking for one: only a subscription can hold a census."""
        kept = None if plan.memo is None else plan.memo.get(_KEY)
        return kept if isinstance(kept, Kept) else None

    def target(self, plan: Plan) -> Target | None:
        """The cgroup of the kept census, if the tree is still there: the same top
        processes, the cgroups and their task list reading byte for byte as when the
        census was proven, and none of the processes that must keep running in it. ``None``
        otherwise: then find_target looks for it anew. Whether the census itself may be
        taken over is for :meth:`census_for` to say (the process events)."""
        census, last = self.census, self._target
        if census is None or last is None or census.seen is None:
            return None
        if frozenset(_top(plan)) != last.top:
            return None
        files = held_files(plan, last.path) if last.version == 2 else None
        dirs = _subtree(last.path, files)
        listing = dirs, _listing(dirs, census.freezer.tasks_file, files)
        if listing != census.seen:
            return None
        # (Read as when no process that must keep running was in it; those may differ from
        # one freeze to the next: a helper started since.)
        if not census.tids.isdisjoint({*plan.passthrough, *plan.blocked} - {0}):
            return None
        return Target(last.version, last.path, last.top, listing, files)

    def census_for(self, target: Target, freezer: CgroupFreezer, plan: Plan) -> _Census:
        """The census for this freeze: the last one if it still holds (see the module),
        else a new one. Called before anything is frozen; the events read here are those
        since the last freeze."""
        census, self.census = self.census, None
        where = (freezer.version, freezer.path, freezer.inode, target.top)
        fresh = _Census(freezer, target.top, plan)
        if census is None or where != self._where or target.listing is None:
            self.events.quiet((), _budget(fresh))  # what counts starts here
            self._where = where
            return fresh
        quiet = self.events.quiet(census.watched, _budget(census))
        self._taken += 1
        if not quiet or census.seen != target.listing or self._taken > _MAX_TAKEN:
            self._taken = 0
            return fresh
        census.rebind(freezer, plan)
        census.reused = True
        return census

    def confirm(self, census: _Census) -> Steps[bool]:
        """Once the cgroup is frozen: read the events of the freeze. A census taken over
        that they contradict is read in full now (nothing forks in a frozen cgroup); a
        census read while the kernel froze may be kept for the next freeze only if none
        came. Returns whether it may: :meth:`keep` it once its problem() found nothing
        (kept before, an interrupt in between would leave a census never proven)."""
        quiet = self.events.quiet(census.watched, _budget(census))
        if census.reused and not quiet:
            census.forget()
            yield from census.survey()
            quiet = True  # read whole from the frozen cgroup: it holds for the next freeze
        return quiet

    def keep(self, census: _Census, target: Target | None) -> None:
        """Keep ``census`` for the next freeze, and the cgroup ``target`` it was proven in:
        confirmed, and proven to hold the tree (unless a later freeze may not take it over:
        see :attr:`_Census.keepable`)."""
        self.census = census if census.keepable else None
        self._target = target if self.census is not None else None

    def close(self) -> None:
        self.census = self._target = None
        self.events.close()


def _budget(census: _Census) -> int:
    """Events worth reading before a full census costs less (a read of either costs a few
    microseconds): two per task, and a few hundred for a machine's background forks."""
    return max(256, 2 * len(census.tids))
