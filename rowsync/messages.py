"""The values rowsync hands to subscribers: ``(Sync, Change)`` and ``(Resync, info)``."""

from __future__ import annotations

from typing import Any, Final, Literal, NamedTuple, TypeAlias

Event: TypeAlias = Literal["inserted", "updated", "deleted"]
EVENTS: Final[tuple[Event, ...]] = ("inserted", "updated", "deleted")


class _Marker:
    """A named singleton; the first item of every message says what the second one is."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return f"rowsync.{self._name}"

    def __reduce__(self) -> str:
        return self._name


Sync: Final = _Marker("Sync")
"""Marks a ``(Sync, Change)`` message: one committed row change."""

Resync: Final = _Marker("Resync")
"""Marks a ``(Resync, ResyncInfo)`` message: changes may have been missed; call
``rs.resync(tree)``."""


class Change(NamedTuple):
    """One committed change of one row.

    ``ids`` holds the primary key and the identifying columns (foreign keys and
    ``extra_columns``) as the row had them when read after the change (a change made since
    may already show: what an event claims is not believed, anyone may NOTIFY); for a
    delete, as they were.
    ``ref`` is unique per database change and grows with every change of a row,
    so an older change can never overwrite a newer one.
    """

    model: type[Any]
    event: Event
    ids: dict[str, Any]
    ref: int


class ResyncInfo(NamedTuple):
    """Why a subscription may have missed changes, and since when (a monotonic time)."""

    reason: str
    since: float


Message: TypeAlias = tuple[_Marker, Change] | tuple[_Marker, ResyncInfo]
