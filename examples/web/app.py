"""The Starlette app: the page, its static files, and one websocket per page that streams the
page's live queries (:mod:`feed`) and the writer's state, and takes the writer's switch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from rowsync import RowSync

from .feed import Send, stream
from .view import VIEWS, WATCHERS
from .writer import Writer

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"

Message = dict[str, Any]


def create_app(
    url: sa.URL,
    *,
    writer: bool = False,
    interval: float = 1.0,
    seed: int | None = None,
    on_ready: Callable[[], None] | None = None,
) -> Starlette:
    """The demo for the database at ``url`` (its schema and rows made by :mod:`database`).

    The lifespan installs rowsync's triggers (idempotent), runs the listener with
    ``async with rs``, starts the writer (switched on if ``writer``), then calls ``on_ready``.
    """
    demo = LiveDemo(url, writer=writer, interval=interval, seed=seed, on_ready=on_ready)
    app = Starlette(
        routes=[
            Route("/", demo.index),
            WebSocketRoute("/ws", demo.websocket),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=demo.lifespan,
    )
    app.state.demo = demo
    return app


class LiveDemo:
    """The app's state: one RowSync, the writer, and a queue per connected page."""

    def __init__(
        self,
        url: sa.URL,
        *,
        writer: bool,
        interval: float,
        seed: int | None,
        on_ready: Callable[[], None] | None,
    ) -> None:
        self.url = url
        self.on_ready = on_ready
        self.engine = sa.create_engine(url)
        self.rs = RowSync(self.engine, WATCHERS)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.writer_on, self.interval, self.seed = writer, interval, seed
        self.writer: Writer | None = None
        self.last_change: str | None = None
        self.pages: set[asyncio.Queue[Message]] = set()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()

        def changed(description: str) -> None:  # on the writer's thread
            self.last_change = description
            loop.call_soon_threadsafe(self.announce)

        self.writer = Writer(self.url, random.Random(self.seed), self.interval, changed)
        if self.writer_on:
            self.writer.enabled.set()
        await asyncio.to_thread(self.rs.install)
        async with self.rs:
            self.writer.start()
            if self.on_ready is not None:
                self.on_ready()
            try:
                yield
            finally:
                await asyncio.to_thread(self.writer.stop)
                self.engine.dispose()

    async def index(self, request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    async def websocket(self, ws: WebSocket) -> None:
        """One page: its live queries' trees and diffs, the writer's state, its switch."""
        await ws.accept()
        lock = asyncio.Lock()

        async def send(message: Message) -> None:
            async with lock:  # the page's tasks send whole messages, one at a time
                await ws.send_json(message)

        with self.joined() as queue:
            await send(self.writer_state())
            pushing = [stream(self.rs, self.sessions, view, send) for view in VIEWS]
            pushing.append(_relay(queue, send))
            tasks = [asyncio.create_task(_pushing(work, ws)) for work in pushing]
            try:
                async for message in ws.iter_json():
                    if message.get("type") == "writer":
                        await self.switch_writer(bool(message.get("enabled")))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def switch_writer(self, enabled: bool) -> None:
        """Switch the writer; pages are told once it is on, or off with nothing under way."""
        assert self.writer is not None
        if enabled:
            self.writer.enabled.set()
        else:
            await asyncio.to_thread(self.writer.pause)
        self.announce()

    def writer_state(self) -> Message:
        enabled = self.writer is not None and self.writer.enabled.is_set()
        return {"type": "writer", "enabled": enabled, "last": self.last_change}

    def announce(self) -> None:
        """Tell every page the writer's state."""
        state = self.writer_state()
        for queue in self.pages:
            with contextlib.suppress(asyncio.QueueFull):  # a stalled page misses a status
                queue.put_nowait(state)

    @contextlib.contextmanager
    def joined(self) -> Iterator[asyncio.Queue[Message]]:
        queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=100)
        self.pages.add(queue)
        try:
            yield queue
        finally:
            self.pages.discard(queue)


async def _relay(queue: asyncio.Queue[Message], send: Send) -> None:
    while True:
        await send(await queue.get())


async def _pushing(work: Coroutine[Any, Any, None], ws: WebSocket) -> None:
    """Push until the page goes away; on a failure, close the socket (the page reconnects)."""
    try:
        await work
    except (WebSocketDisconnect, OSError):
        pass  # the page is gone
    except Exception:
        logger.exception("pushing to a page failed: closing its websocket")
        with contextlib.suppress(Exception):
            await ws.close(1011)
