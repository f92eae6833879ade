"""The brokers of the fan-out tests, and a relay between a node and its broker to cut.

``make test`` starts Redis (127.0.0.1:6379) and NATS with JetStream (127.0.0.1:4222) when
they are silent (scripts/ensure-brokers.sh); a test that finds one unreachable fails,
saying so, rather than skip.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

REDIS = "redis://127.0.0.1:6379/0"
NATS = "nats://127.0.0.1:4222"
PORTS = {"redis": 6379, "nats": 4222}

KEY = "the test groups' fan-out key"
"""The ``fanout_key`` of the tests' groups."""

BROKERS = [pytest.param(REDIS, id="redis"), pytest.param(NATS, id="nats")]
"""The real brokers, for tests that parametrize over them."""
ALL = [pytest.param("memory://", id="memory"), *BROKERS]
"""The real brokers and the in-process one."""


def require(url: str) -> None:
    """Fail (not skip) when the broker of ``url`` does not answer."""
    for scheme, port in PORTS.items():
        if url.startswith(scheme):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except OSError as exc:
                pytest.fail(
                    f"{scheme} is not running on 127.0.0.1:{port} ({exc}): "
                    "scripts/ensure-brokers.sh starts it"
                )


def wait_until(condition: Callable[[], bool], limit: float = 30.0) -> None:
    """Wait for ``condition`` (a state another thread or process reaches), failing after a
    generous ``limit``: a guard against hanging, not a timing assertion."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {limit} s")
        time.sleep(0.01)


class Relay:
    """A TCP relay to a server's port (a broker's, Postgres') that a test can cut (every
    connection closed, new ones refused) and restore: a node's connection dying under it;
    or freeze: the node's host gone, with nothing more forwarded and nothing closed, so
    the server hears nothing, not even a goodbye, until a timeout of its own."""

    def __init__(self, port: int) -> None:
        self.target = port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._open = True
        self._frozen = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url: str) -> str:
        """``url`` with the broker's port replaced by the relay's."""
        return url.replace(f":{self.target}", f":{self.port}")

    def cut(self) -> None:
        with self._lock:
            self._open = False
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def freeze(self) -> None:
        self._frozen = True

    def restore(self) -> None:
        with self._lock:
            self._open = True

    def close(self) -> None:
        self.cut()
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            with self._lock:
                if not self._open:
                    client.close()
                    continue
                upstream = socket.create_connection(("127.0.0.1", self.target))
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self._frozen:
                    sink.sendall(data)
        if not self._frozen:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def relay(url: str) -> Iterator[Relay]:
    scheme = url.split(":", 1)[0]
    r = Relay(PORTS[scheme])
    try:
        yield r
    finally:
        r.close()


def drop_stream(url: str, stream: str) -> None:
    """Delete a NATS group's JetStream stream (the tests make one per database)."""
    import asyncio

    import nats
    from nats.js.errors import NotFoundError

    async def drop() -> None:
        nc = await nats.connect(url)
        with contextlib.suppress(NotFoundError):
            await nc.jetstream().delete_stream(stream)
        await nc.close()

    asyncio.run(drop())


def inject(backend: object, messages: list[bytes]) -> None:
    """Publish ``messages`` straight to a group's stream, as any client of the broker may
    (``backend``: a node's Redis or NATS backend, whose stream names it)."""
    import asyncio

    import nats
    import redis

    from rowsync.fanout.nats import NatsBackend
    from rowsync.fanout.redis import RedisBackend

    if isinstance(backend, RedisBackend):
        with redis.Redis.from_url(backend.url) as client:
            for message in messages:
                client.publish(backend.channel, message)
        return
    assert isinstance(backend, NatsBackend)

    async def publish() -> None:
        nc = await nats.connect(backend.url)
        for message in messages:
            await nc.jetstream().publish(backend.subject, message, stream=backend.stream)
        await nc.close()

    asyncio.run(publish())
