"""Where changed rows live between the listener's fetch and every subscriber's ``sync``.

Rows are keyed by the change that produced them, ``(table, primary key, ref)``, so N
subscribers applying one change share one fetch. The cache is bounded (LRU with a TTL);
a miss is fetched again, once, however many threads ask at the same moment (single-flight).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

from cachetools import TTLCache

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CachedRow:
    """A row as fetched after its change: column values, and which criteria it satisfies."""

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
    """A bounded, thread-safe store of fetched values with single-flight loading."""

    def __init__(self, maxsize: int = 10_000, ttl: float = 300.0) -> None:
        self._data: TTLCache[Hashable, Any] = TTLCache(maxsize=maxsize, ttl=ttl)
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, Future[Any]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    @property
    def maxsize(self) -> int:
        return int(self._data.maxsize)

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._data[key] = value

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            return self._data.get(key, default)

    def load(self, key: Hashable, loader: Callable[[], T]) -> T:
        """The cached value, or ``loader()``'s; concurrent callers of one key share one call."""
        with self._lock:
            if key in self._data:
                return cast(T, self._data[key])
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
                self._data[key] = value
            return value
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
