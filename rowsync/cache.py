"""Where changed rows live between the listener's fetch and every subscriber's ``sync``.

Rows are keyed by the change that produced them, ``(table, identity, ref)``, so N
subscribers applying one change share one fetch. The cache is bounded (LRU with a TTL);
a miss is fetched again, once, however many threads ask at the same moment (single-flight).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from typing import Any, Final, NamedTuple, TypeVar, cast

T = TypeVar("T")


class CachedRow(NamedTuple):
    """A row as fetched after its change: column values, and which criteria it satisfies.

    A NamedTuple: built for every fetched row, at a third of a frozen dataclass's cost."""

    values: Mapping[str, Any]
    matches: frozenset[str] = frozenset()
    old: Mapping[str, Any] | None = None
    """Identifying columns before an update that changed them."""


class _Gone:
    def __repr__(self) -> str:
        return "GONE"


GONE: Final = _Gone()
"""Cached for a row that no longer existed when it was fetched (deleted right after its change)."""


class RowCache:
    """A bounded, thread-safe store of fetched values with single-flight loading.

    Least recently used entries go first once ``maxsize`` is reached; an entry is never
    returned ``ttl`` seconds after it was put. Built on ``OrderedDict`` rather than a
    general-purpose cache: every ``sync`` reads here, and a hit costs a few C calls.
    """

    def __init__(self, maxsize: int = 10_000, ttl: float = 300.0) -> None:
        self._maxsize = maxsize
        self._ttl = ttl
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        """Values, least recently used first."""
        self._expires: dict[Hashable, float] = {}
        """When each entry expires, oldest first (a dict keeps the order of puts)."""
        self._horizon = 0.0
        """No entry expires before this time (the oldest put's expiry, or earlier)."""
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, Future[Any]] = {}

    def __len__(self) -> int:
        with self._lock:
            self._expire(time.monotonic())
            return len(self._data)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._put(key, value)

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            value = self._get(key)
        return default if value is _MISSING else value

    def put_newer(self, key: Hashable, ref: int, value: Any) -> None:
        """Keep ``(ref, value)`` under ``key`` unless it holds a later ref's: what an older
        change left must never replace what a newer one did (see :meth:`newest`)."""
        with self._lock:
            held = self._get(key)
            if held is _MISSING or held[0] < ref:
                self._put(key, (ref, value))

    def newest(self, key: Hashable) -> tuple[int, Any] | None:
        """``(ref, value)`` of the latest change :meth:`put_newer` kept under ``key``."""
        found: tuple[int, Any] | None = self.get(key)
        return found

    def load(self, key: Hashable, loader: Callable[[], T]) -> T:
        """The cached value, or ``loader()``'s; concurrent callers of one key share one call."""
        with self._lock:
            value = self._get(key)
            if value is not _MISSING:
                return cast(T, value)
            future = self._inflight.get(key)
            owner = future is None
            if future is None:
                future = self._inflight[key] = Future()
        if not owner:
            return cast(T, future.result())
        try:
            value = loader()
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(value)
            with self._lock:
                self._put(key, value)
            return value
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._expires.clear()

    # -- under the lock ----------------------------------------------------------------

    def _get(self, key: Hashable) -> Any:
        expires = self._expires.get(key)
        if expires is None:
            return _MISSING
        if expires <= time.monotonic():
            del self._expires[key], self._data[key]
            return _MISSING
        self._data.move_to_end(key)
        return self._data[key]

    def _put(self, key: Hashable, value: Any) -> None:
        now = time.monotonic()
        self._expire(now)
        self._expires.pop(key, None)  # re-put: its clock restarts, at the end of the order
        self._expires[key] = now + self._ttl
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._maxsize:
            oldest, _ = self._data.popitem(last=False)
            del self._expires[oldest]

    def _expire(self, now: float) -> None:
        """Drop expired entries: they are the oldest puts, at the front of ``_expires``."""
        if now < self._horizon:
            return
        expired = []
        for key, expires in self._expires.items():
            if expires > now:
                self._horizon = expires
                break
            expired.append(key)
        else:
            self._horizon = now + self._ttl  # empty: nothing can expire before a new put does
        for key in expired:
            del self._expires[key], self._data[key]


class _Missing:
    pass


_MISSING: Final = _Missing()
