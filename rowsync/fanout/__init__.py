"""Fan-out: one capture process, many app nodes, one message broker between them.

Every node of a group is configured the same (``RowSync(dsn, watchers, fanout=URL,
fanout_key=KEY)``). The nodes elect one of themselves through a Postgres advisory lock
(:mod:`.election`); that node runs the listener and publishes each batch with its rows
already fetched (``Dispatcher.resolve``, encoded by :mod:`.codec`, sealed with the group's
key by :mod:`.seal`); every node, the capture node included, reads the broker's stream and
delivers the batches to its own subscriptions (``Dispatcher.deliver``), see :mod:`.node`.

A backend is the broker seen as one ordered stream of byte messages, chosen by the URL's
scheme: ``memory://`` (in-process: several RowSyncs of one process), ``redis://`` (Redis
pub/sub) and ``nats://`` (NATS JetStream, which lets a reconnecting node resume).
``fanout=None``, the default, uses no backend at all: the listener hands its batches
straight to this process's dispatcher.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlsplit

from rowsync.errors import ConfigurationError


class Backend(Protocol):
    """One broker connection of one node: it publishes to and reads from one stream.

    ``connect`` may be called again after a failure; ``publish`` and ``next_published``
    raise :class:`ConnectionError` when the broker cannot be reached (the node then
    reconnects, and tells its subscribers to resync unless ``connect`` says it resumed).
    """

    max_message: int
    """The largest message, in bytes, the broker accepts."""

    async def connect(self) -> bool:
        """Open the connection and subscribe to the stream.

        True when no message published since the previous connection can have been missed
        (the first connection, or a stream the backend resumed from its last position).
        """

    async def disconnect(self) -> None: ...

    async def publish(self, message: bytes) -> None: ...

    async def next_published(self) -> bytes:
        """The next message of the stream, in publication order."""


SCHEMES = {
    "memory": ("rowsync.fanout.memory", "MemoryBackend"),
    "redis": ("rowsync.fanout.redis", "RedisBackend"),
    "rediss": ("rowsync.fanout.redis", "RedisBackend"),
    "nats": ("rowsync.fanout.nats", "NatsBackend"),
    "tls": ("rowsync.fanout.nats", "NatsBackend"),
}
"""URL scheme -> module and class of its backend (imported on use: redis and nats are
optional dependencies, the ``redis`` and ``nats`` extras)."""


def check_url(url: str) -> None:
    """Raise :class:`ConfigurationError` unless ``url`` names a known backend."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"fanout URL {url!r}: unknown scheme {scheme!r}; use redis://, nats:// or memory://"
        )


def backend_for(url: str, namespace: str) -> Backend:
    """The backend for ``url``, carrying the stream named by ``namespace``.

    ``namespace`` identifies the database and channel, so groups of different databases
    can share a broker.
    """
    import importlib

    check_url(url)
    module, name = SCHEMES[urlsplit(url).scheme]
    backend: Backend = getattr(importlib.import_module(module), name)(url, namespace)
    return backend
