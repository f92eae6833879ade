"""The Starlette app: the page, its static files, one websocket per page that streams the
page's live queries (:mod:`feed`) and the writer's state and takes the writer's switch, and
the page's edits (:mod:`edits`) and reset as HTTP endpoints that only write."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from rowsync import RowSync

from . import edits
from .database import restore
from .edits import Edited
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
            Route("/people/{person_id:int}", demo.editing(edits.rename_person), methods=["PATCH"]),
            Route("/people/{person_id:int}/posts", demo.editing(edits.add_post), methods=["POST"]),
            Route("/posts/{post_id:int}", demo.editing(edits.retitle_post), methods=["PATCH"]),
            Route("/posts/{post_id:int}", demo.editing(edits.delete_post), methods=["DELETE"]),
            Route("/posts/{post_id:int}/tags", demo.editing(edits.tag_post), methods=["POST"]),
            Route(
                "/posts/{post_id:int}/tags/{tag_id:int}",
                demo.editing(edits.untag_post),
                methods=["DELETE"],
            ),
            Route("/reset", demo.reset, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=demo.lifespan,
    )
    app.state.demo = demo
    return app


class LiveDemo:
    """The app's state: one RowSync, the writer, the rows edited lately, and a queue per
    connected page."""

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
        self.edited = Edited()
        self.last_change: str | None = None
        self.pages: set[asyncio.Queue[Message]] = set()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()

        def changed(description: str) -> None:  # on the writer's thread
            self.last_change = description
            loop.call_soon_threadsafe(self.announce)

        rng = random.Random(self.seed)
        self.writer = Writer(self.url, rng, self.interval, changed, self.edited)
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
        timed: dict[str, float | None] = dict.fromkeys(
            [view.name for view in VIEWS], self.writer_committed()
        )

        async def send(message: Message) -> None:
            if message["type"] == "diff":
                self.time_writer_change(message, timed)
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

    def editing(self, edit: Callable[..., str]) -> Callable[[Request], Awaitable[Response]]:
        """An endpoint that runs ``edit(session, **path parameters, **JSON body)`` in one
        transaction and answers the key it returns (or 404, 400), without waiting for the
        diffs: they reach the pages through the live queries."""

        async def endpoint(request: Request) -> Response:
            fields = await request.json() if await request.body() else {}

            def write() -> str:
                with self.sessions.begin() as session:
                    key = edit(session, **request.path_params, **fields)
                    self.edited.mark(key)  # before the commit: the writer keeps off at once
                    return key

            try:
                return JSONResponse({"key": await asyncio.to_thread(write)})
            except LookupError as exc:
                return JSONResponse({"error": str(exc)}, status_code=404)
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)

        return endpoint

    async def reset(self, request: Request) -> Response:
        """Put the initial rows back (the pages see it as diffs)."""

        def write() -> None:
            with self.engine.begin() as conn:
                restore(conn)

        await asyncio.to_thread(write)
        return Response(status_code=204)

    def writer_committed(self) -> float | None:
        return None if self.writer is None else self.writer.committed

    def time_writer_change(self, message: Message, timed: dict[str, float | None]) -> None:
        """Give the first diff batch of a view after the writer's latest commit the time from
        that commit to now (``writer_ms``). The writer runs in this process, so its commit
        time is known; another process's is not (that would take the commit timestamps of
        ``track_commit_timestamp``, off by default). A psql change landing between the
        writer's commit and its diff would be timed as the writer's."""
        committed = self.writer_committed()
        if committed is not None and timed[message["view"]] != committed:
            timed[message["view"]] = committed
            message["writer_ms"] = round((time.monotonic() - committed) * 1000, 1)

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
