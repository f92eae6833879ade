"""Which sealed updates a listening session has taken already: a seal proves that a trigger
wrote an update's values before, not that this is the first time they arrive.

Anyone who may LISTEN sees a sealed payload and may NOTIFY it again, unchanged. Postgres
delivers a notification once to each session listening when its transaction commits, in
commit order. So, within one listening session, a sealed update is sent again when

- its transaction was committed in a snapshot taken on the listener's connection before it
  began to LISTEN: no session that was not yet listening is owed it (Postgres may still
  hand a new listener a few notifications committed just before its LISTEN; nobody could
  count on those, and in a reconnect the gap announced covers them); or
- its ref was taken since.

The refs are remembered only until the snapshot test covers them: a snapshot taken later
on the same connection, then a barrier sent through the channel from it, replaces the first
snapshot once the barrier arrives. Every genuine notification of a transaction that snapshot
saw committed before the barrier did, so it has arrived by then, and its ref may be
forgotten. The first renewal is asked for as soon as the session LISTENs: a transaction that
committed between the first snapshot and the LISTEN may or may not have been delivered, and
until a snapshot that saw it is in force, a copy of it would be taken once. The memory stays
below a cap whatever comes in between: past it, an update is taken without being remembered
(a copy of it is routed again until the next barrier arrives), never rejected for want of
room.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from rowsync.position import NOWHERE, Position


@dataclass(frozen=True, slots=True)
class Renewal:
    """A snapshot taken on the listener's connection, and the barrier sent after it."""

    snapshot: Position
    token: str


class Replays:
    """The sealed updates one listening session took (by ref), and the snapshot that tells
    the older ones apart."""

    def __init__(self, renew_after: int = 10_000) -> None:
        self.renew_after = renew_after
        """Refs remembered before a renewal is asked for; twice as many are kept at most."""
        self._before = NOWHERE
        self._taken: dict[int, int | None] = {}
        """Ref to xid of every sealed update taken since the snapshot ``_before``."""
        self._renewal: Renewal | None = None
        self._fresh = False
        """No renewal was asked for since the session began."""

    def __len__(self) -> int:
        """How many refs are remembered."""
        return len(self._taken)

    def begin(self, snapshot: Position) -> None:
        """A new session, about to LISTEN; ``snapshot`` was taken on its connection before."""
        self._before, self._taken, self._renewal, self._fresh = snapshot, {}, None, True

    def replayed(self, ref: int, xid: int | None) -> bool:
        """Whether a sealed update is one this session was delivered already, or was never
        owed; if not, it is taken (remembered while there is room)."""
        if self._before.saw(xid) or ref in self._taken:
            return True
        if len(self._taken) < 2 * self.renew_after:
            self._taken[ref] = xid
        return False

    def due(self) -> str | None:
        """The token of a flush barrier to send after a new snapshot, when it is time to
        renew (one renewal at a time), else None. It cannot be guessed: only a copy of the
        barrier itself could end the renewal, and that arrives after it."""
        if self._renewal is not None or (not self._fresh and len(self._taken) < self.renew_after):
            return None
        return f"rowsync-replays-{secrets.token_hex(16)}"

    def renewing(self, snapshot: Position, token: str) -> None:
        """The barrier ``token``, from :meth:`due`, was sent after ``snapshot`` was taken."""
        self._renewal, self._fresh = Renewal(snapshot, token), False

    def arrived(self, token: str) -> bool:
        """Whether the flush barrier ``token`` is the renewal's: then its snapshot is the one
        the older updates are told apart by, and the refs it saw are forgotten (so are those
        of no known transaction: sealing triggers always send theirs)."""
        renewal = self._renewal
        if renewal is None or token != renewal.token:
            return False
        self._before, self._renewal = renewal.snapshot, None
        self._taken = {
            ref: xid
            for ref, xid in self._taken.items()
            if xid is not None and not renewal.snapshot.saw(xid)
        }
        return True
