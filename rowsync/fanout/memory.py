"""The in-process broker (``fanout="memory://"``): a fan-out group inside one process.

Several RowSyncs of one process elect a capture node and share its batches exactly as
processes do through a broker, without one: for an application's tests of its own
multi-node behaviour, and for rowsync's. Each node reads on its own event loop; a
message is handed to every node's queue, in publication order.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

_lock = threading.Lock()
_streams: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[bytes]]]] = {}


class MemoryBackend:
    max_message = 1 << 20

    def __init__(self, url: str, namespace: str) -> None:
        self.namespace = namespace
        self._reader: tuple[asyncio.AbstractEventLoop, asyncio.Queue[bytes]] | None = None
        self._connections = 0

    async def connect(self) -> bool:
        self._reader = (asyncio.get_running_loop(), asyncio.Queue())
        with _lock:
            _streams.setdefault(self.namespace, []).append(self._reader)
        self._connections += 1
        return self._connections == 1

    async def disconnect(self) -> None:
        reader, self._reader = self._reader, None
        with _lock:
            readers = _streams.get(self.namespace, [])
            if reader in readers:
                readers.remove(reader)
            if not readers:
                _streams.pop(self.namespace, None)

    async def publish(self, message: bytes) -> None:
        with _lock:
            readers = list(_streams.get(self.namespace, ()))
        for loop, queue in readers:
            with contextlib.suppress(RuntimeError):  # that node's loop has closed
                loop.call_soon_threadsafe(queue.put_nowait, message)

    async def next_published(self) -> bytes:
        if self._reader is None:
            raise ConnectionError("not connected")
        return await self._reader[1].get()
