"""NATS JetStream (``fanout="nats://host:4222"``): a stream per group, kept for a while.

The capture node publishes to a JetStream stream and waits for the server's
acknowledgement; each node reads it through an ordered consumer (in stream order, no
redelivery). A node keeps the stream sequence of the last message it read; after a lost
connection it reads on from the next one, so a reconnect is not a gap, unless the messages
it missed are no longer in the stream (kept ``max_age`` seconds: ``?max_age=600`` in the
URL, the default) or the stream was recreated meanwhile.

The position lives in the node, not in a durable consumer on the server: it is worth
exactly as long as the trees it keeps current, which live in the same process, and a
consumer created at ``position + 1`` on each connection never redelivers out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import parse_qs, urlsplit, urlunsplit

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig, StreamInfo
from nats.js.errors import NotFoundError

from rowsync.errors import ConfigurationError

logger = logging.getLogger(__name__)

MAX_AGE = 600.0
"""Default seconds a message stays in the stream: how long a node may be away and resume."""


class NatsBackend:
    max_message = 1 << 20
    """NATS's default ``max_payload``; replaced by the server's own once connected."""

    def __init__(self, url: str, namespace: str) -> None:
        parts = urlsplit(url)
        options = parse_qs(parts.query)
        self.max_age = float(options.pop("max_age", [MAX_AGE])[0])
        if options:
            raise ConfigurationError(f"unknown NATS fan-out option(s) {sorted(options)} in {url!r}")
        self.url = urlunsplit(parts._replace(query=""))
        self.stream = f"ROWSYNC_{namespace}"
        self.subject = f"rowsync.{namespace}"
        self.position: int | None = None
        """Stream sequence of the last message read; None before the first connection."""
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._sub: Subscription | None = None
        self._inbox: asyncio.Queue[Msg | ConnectionError] = asyncio.Queue()

    async def connect(self) -> bool:
        await self.disconnect()
        inbox: asyncio.Queue[Msg | ConnectionError] = asyncio.Queue()

        async def lost() -> None:
            inbox.put_nowait(ConnectionError(f"lost the connection to {self.url}"))

        async def error(exc: Exception) -> None:
            logger.debug("NATS client error: %r", exc)

        async def received(msg: Msg) -> None:
            inbox.put_nowait(msg)

        try:
            nc = await nats.connect(
                self.url,
                allow_reconnect=False,  # a reconnect is ours to handle: it resumes the stream
                connect_timeout=5,
                ping_interval=5,
                max_outstanding_pings=2,
                disconnected_cb=lost,
                closed_cb=lost,
                error_cb=error,
            )
        except (NatsError, OSError) as exc:
            raise ConnectionError(f"cannot connect to {self.url}: {exc}") from exc
        try:
            js = nc.jetstream()
            state = (await self._stream(js)).state
            resumed = self.position is None or (
                state.first_seq <= self.position + 1 and state.last_seq >= self.position
            )
            if self.position is None or not resumed:
                self.position = state.last_seq
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.position + 1
            )
            self._sub = await js.subscribe(
                self.subject, stream=self.stream, cb=received, ordered_consumer=True, config=config
            )
        except (NatsError, OSError) as exc:
            with contextlib.suppress(NatsError, OSError):
                await nc.close()
            raise ConnectionError(f"cannot read stream {self.stream}: {exc}") from exc
        self._nc, self._js, self._inbox = nc, js, inbox
        self.max_message = nc.max_payload - 1024  # room for the headers
        return resumed

    async def _stream(self, js: JetStreamContext) -> StreamInfo:
        try:
            return await js.stream_info(self.stream)
        except NotFoundError:
            config = StreamConfig(
                name=self.stream,
                subjects=[self.subject],
                max_age=self.max_age,
                storage=StorageType.FILE,
            )
            return await js.add_stream(config)  # the same config from every node: idempotent

    async def disconnect(self) -> None:
        nc, self._nc, self._js, self._sub = self._nc, None, None, None
        if nc is not None:
            with contextlib.suppress(NatsError, OSError):
                await nc.close()

    async def publish(self, message: bytes) -> None:
        if self._js is None:
            raise ConnectionError(f"not connected to {self.url}")
        try:
            await self._js.publish(self.subject, message, stream=self.stream, timeout=5)
        except (NatsError, OSError) as exc:
            raise ConnectionError(f"cannot publish to {self.stream}: {exc}") from exc

    async def next_published(self) -> bytes:
        while True:
            if self._nc is None:
                raise ConnectionError(f"not connected to {self.url}")
            msg = await self._inbox.get()
            if isinstance(msg, ConnectionError):
                raise msg
            sequence = msg.metadata.sequence.stream
            assert self.position is not None
            if sequence <= self.position:
                continue  # read before a reconnect
            self.position = sequence
            return msg.data
