"""Positions in the stream of changes, and the replay of what came after one.

``rs.position()`` is a Postgres snapshot: the same thing a query sees. A change is *after* a
position when its writer's transaction was invisible to that snapshot (its xid is at or past
``xmax``, or was in progress): exactly what a load that ran at (or after) that position may
not have seen. Deciding by visibility, not by time or by ``ref``, is what makes the hand-over
from a load to a subscription exact: ``rs.subscribe(tree, since=position)`` replays the
changes after the position that were already dispatched, and every later one arrives as usual.
A change the position saw is never queued for that subscription, even when it is dispatched
only later (a listener behind, or a consumer's replication slot sending again what a killed
process had not confirmed): the tree holds it already, and patching it in again would take
the tree back to an older row until the changes after it came.

The dispatcher keeps a bounded :class:`Journal` of what it delivered. A change after a
position committed after the snapshot was taken, so it was dispatched after the position was
taken: the journal holds every one of them unless it has since dropped some (it is bounded),
or the stream itself had a gap (a lost connection in ``notify`` mode, a stopped listener). Then
the subscription starts with ``(Resync, info)`` instead: never a silent miss.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

_EPOCH = 1 << 32


def widen(xid: int, near: int) -> int:
    """The 64-bit transaction id (xid8) whose low 32 bits are ``xid`` that is nearest to the
    64-bit id ``near``.

    Logical decoding gives a transaction's 32-bit id; snapshots, and so positions, hold 64-bit
    ones, whose high half (the epoch) counts the wraparounds of the 32-bit counter. Every
    transaction that can still commit is within 2**31 of any other (Postgres stops assigning
    ids before that), so the id nearest to a recent one of the same stream is the right one,
    on either side of an epoch boundary."""
    full = near + (xid - near + _EPOCH // 2) % _EPOCH - _EPOCH // 2
    return full if full >= 0 else full + _EPOCH  # no epoch before the first


@dataclass(frozen=True, slots=True)
class Position:
    """A point in the stream of changes: a snapshot, and where the journal stood before it."""

    xmin: int
    xmax: int
    xip: frozenset[int]
    """Transactions in progress when the snapshot was taken."""
    seq: int | None
    """The journal's next entry number, read before the snapshot was taken; None for a
    snapshot taken earlier (a transaction's own), placed in the journal by visibility."""
    epoch: int | None
    """The journal's count of gaps when ``seq`` was read."""

    @classmethod
    def of(cls, snapshot: str, seq: int | None = None, epoch: int | None = None) -> Position:
        """From ``pg_current_snapshot()``'s text, ``xmin:xmax:xip,xip,…``."""
        xmin, xmax, xip = snapshot.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x), seq, epoch)

    def saw(self, xid: int | None) -> bool:
        """Whether the snapshot saw the work of transaction ``xid`` (committed by then). A
        change of unknown xid (sent by a trigger older than this version) counts as unseen:
        replaying it is harmless, ``sync`` ignores what a tree already holds."""
        if xid is None:
            return False
        return xid < self.xmin or (xid < self.xmax and xid not in self.xip)

    def meet(self, other: Position) -> Position:
        """The position that saw exactly what both saw: what is in every tree loaded after
        either. A snapshot sees every transaction below its ``xmax`` but those in progress,
        so the meet is the lower bounds and every in-progress one below them."""
        xmin, xmax = min(self.xmin, other.xmin), min(self.xmax, other.xmax)
        xip = frozenset(x for x in self.xip | other.xip if xmin <= x < xmax)
        return Position(xmin, xmax, xip, None, None)


NOWHERE = Position(0, 0, frozenset(), None, None)
"""A position that saw nothing: where a tree subscribed without ``since`` is placed."""


class Journal(Generic[T]):
    """The last ``size`` changes delivered, numbered, each with its writer's xid."""

    def __init__(self, size: int, xid: Callable[[T], int | None]) -> None:
        self._entries: collections.deque[T] = collections.deque(maxlen=size)
        """The changes numbered ``_next - len(_entries)`` to ``_next - 1``: numbered by their
        place, so an entry is the change itself (one object fewer for every change kept)."""
        self._xid = xid
        self._next = 0
        self._epoch = 0
        self._resumed: Position | None = None
        """A snapshot taken when the stream last came back: it saw every change lost
        before; None when unknown (or the stream is broken)."""
        self._lock = threading.Lock()

    def add(self, change: T) -> None:
        with self._lock:
            self._entries.append(change)
            self._next += 1

    def interrupt(self) -> None:
        """The stream broke: changes may be lost until :meth:`resume`."""
        with self._lock:
            self._epoch += 1
            self._resumed = None

    def resume(self, snapshot: Position | None) -> None:
        """The stream is back; ``snapshot``, taken now, saw every change it lost (None when
        it could not be taken: no earlier snapshot can be replayed from)."""
        with self._lock:
            self._epoch += 1
            self._resumed = snapshot

    def mark(self) -> tuple[int, int]:
        """``(next entry number, epoch)``, to read before taking a snapshot."""
        with self._lock:
            return self._next, self._epoch

    def since(self, position: Position) -> list[T] | None:
        """The changes after ``position`` delivered so far, in order; None when some of
        them can no longer be known (dropped, or lost in a gap)."""
        with self._lock:
            first = self._next - len(self._entries)  # the oldest kept (``_next``: none)
            if position.seq is not None:
                # Exact: a change after the position was delivered after the mark.
                if position.epoch != self._epoch or first > position.seq:
                    return None
                start = position.seq - first
            else:
                # An earlier snapshot: changes arrive in commit order, so once the oldest one
                # kept was seen by it, so was every one dropped before it.
                if not _covers(position, self._resumed) or (
                    first > 0
                    and (not self._entries or not position.saw(self._xid(self._entries[0])))
                ):
                    return None
                start = 0
            return [
                change
                for change in itertools.islice(self._entries, start, None)
                if not position.saw(self._xid(change))
            ]


def _covers(position: Position, resumed: Position | None) -> bool:
    """Whether ``position`` saw every transaction ``resumed`` saw: then what the stream lost
    before it came back is in what was loaded at ``position``."""
    if resumed is None or position.xmax < resumed.xmax:
        return False
    return all(x in resumed.xip or x >= resumed.xmax for x in position.xip)
