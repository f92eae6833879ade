"""Redis pub/sub (``fanout="redis://host:6379/0"``): a channel per group, nothing kept.

Pub/sub delivers in publication order to whoever is subscribed at that moment, and keeps
nothing: a node that reconnects cannot know what it missed, so every reconnect is a gap.
redis-py would reconnect and resubscribe by itself, hiding exactly that; its retries are
turned off and the node reconnects instead, knowingly.
"""

from __future__ import annotations

import contextlib
import logging

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

PROBE_INTERVAL = 5
"""Seconds of silence after which the subscribed connection is probed with a PING."""


class RedisBackend:
    max_message = 8 << 20
    """Well under Redis's own limit (512 MB): a big batch goes as several messages."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.channel = f"rowsync:{namespace}"
        self._client: Redis | None = None
        self._pubsub: PubSub | None = None
        self._connections = 0

    async def connect(self) -> bool:
        await self.disconnect()
        client = Redis.from_url(
            self.url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=5,
            socket_keepalive=True,
            health_check_interval=PROBE_INTERVAL,
            client_name="rowsync-fanout",
        )
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
        except (RedisError, OSError) as exc:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()
            raise ConnectionError(f"cannot subscribe at {self.url}: {exc}") from exc
        self._client, self._pubsub = client, pubsub
        self._connections += 1
        return self._connections == 1

    async def disconnect(self) -> None:
        client, pubsub = self._client, self._pubsub
        self._client = self._pubsub = None
        with contextlib.suppress(RedisError, OSError):
            if pubsub is not None:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            if client is not None:
                await client.aclose()

    async def publish(self, message: bytes) -> None:
        if self._client is None:
            raise ConnectionError("not connected to Redis")
        try:
            await self._client.publish(self.channel, message)
        except (RedisError, OSError) as exc:
            raise ConnectionError(f"cannot publish at {self.url}: {exc}") from exc

    async def next_published(self) -> bytes:
        while True:
            if self._pubsub is None:
                raise ConnectionError("not connected to Redis")
            try:
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=PROBE_INTERVAL
                )
            except (RedisError, OSError) as exc:
                raise ConnectionError(f"lost the subscription at {self.url}: {exc}") from exc
            if message is not None and message["type"] == "message":
                data: bytes = message["data"]
                return data
