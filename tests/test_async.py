"""An asyncio application uses rowsync with its own AsyncEngine (psycopg or asyncpg), and
awaits whatever may wait on the database or the listener: ``install_async``, ``flush_async``,
``sync_async``, ``resync_async``, ``async with rs``."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import selectinload

import rowsync
from models import Person, Post
from rowsync import RowSync, Sync

WATCHERS = rowsync.watchers(Person, ["posts"]) + rowsync.watchers(Post)
PEOPLE = sa.select(Person).options(selectinload(Person.posts)).order_by(Person.id)


def run(rs: RowSync, engine: AsyncEngine, main: Callable[[], Awaitable[Any]]) -> Any:
    """``main()`` in an event loop; the engines' connections are closed after it."""

    async def whole() -> Any:
        try:
            return await main()
        finally:
            await engine.dispose()  # in the loop its connections belong to
            rs.engine.dispose()

    return asyncio.run(whole())


async def commit(engine: AsyncEngine, *objects: Any) -> None:
    async with AsyncSession(engine) as session:
        session.add_all(objects)
        await session.commit()


@pytest.mark.parametrize("driver", ["postgresql+psycopg", "postgresql+asyncpg"])
def test_an_async_engine_is_all_an_asyncio_app_gives_rowsync(schema, driver) -> None:
    engine = create_async_engine(schema.url.set(drivername=driver))
    rs = RowSync(engine, WATCHERS)

    async def main() -> tuple[list[str], list[int], list[int]]:
        await rs.install_async()
        await commit(engine, Person(id=1, name="ann"))
        async with rs, AsyncSession(engine, expire_on_commit=False) as session:
            people, sub = await session.run_sync(lambda s: rs.load(s, PEOPLE))
            await commit(engine, Post(id=10, person_id=1))
            await rs.flush_async()
            messages = sub.drain()
            for message in messages:
                people = await rs.sync_async(people, message)
            synced = [p.id for p in people[0].posts]
            people = await rs.resync_async(people)
            return [m[1].event for m in messages], synced, [p.id for p in people[0].posts]

    events, synced, resynced = run(rs, engine, main)

    assert events == ["inserted"]
    assert synced == resynced == [10]


@pytest.mark.parametrize("driver", ["postgresql+psycopg", "postgresql+asyncpg"])
@pytest.mark.parametrize("capture", ["notify", "wal"])  # set at begin, or sent at commit
def test_writes_through_the_async_engine_are_tagged_with_the_origin(
    schema, capture, driver
) -> None:
    engine = create_async_engine(schema.url.set(drivername=driver))
    rs = RowSync(engine, WATCHERS, capture=capture)
    rs.install()

    async def main() -> list[int]:
        async with rs:
            sub = rs.subscribe(Person, ignore_origin="web")
            with rs.origin("web"):
                await commit(engine, Person(id=1, name="echo"))
            await commit(engine, Person(id=2, name="other"))
            await rs.flush_async()
            return [change.ids["id"] for _, change in sub.drain()]

    assert run(rs, engine, main) == [2]


def test_rowsyncs_connections_run_the_async_engines_do_connect_hook(schema) -> None:
    """As a password or token fetched per connection is supplied."""
    engine = create_async_engine("postgresql+psycopg://nobody@127.0.0.1:1/nowhere")
    url = schema.url
    where = {"host": url.host, "port": url.port, "user": url.username, "dbname": url.database}

    @sa.event.listens_for(engine.sync_engine, "do_connect")
    def credentials(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        cparams.update(where, password="token")

    rs = RowSync(engine, WATCHERS)

    async def main() -> list[Any]:
        await rs.install_async()
        async with rs:
            sub = rs.subscribe(Person)
            await commit(engine, Person(id=1, name="ann"))
            await rs.flush_async()
            return [(kind, change.event) for kind, change in sub.drain()]

    assert run(rs, engine, main) == [(Sync, "inserted")]


def test_awaiting_a_flush_leaves_the_event_loop_free(schema, write) -> None:
    """The flush waits for an authorizer that only a task of the same loop lets go: were the
    loop blocked by the flush, that task would never run and the flush would time out."""
    rs = RowSync(schema, WATCHERS)
    rs.install()
    entered, released = threading.Event(), threading.Event()

    def authorize(context: Any, change: Any, row: Any) -> bool:
        entered.set()
        return released.wait(60)

    async def release() -> None:
        await asyncio.to_thread(entered.wait, 60)
        released.set()

    async def main() -> list[Any]:
        async with rs:
            sub = rs.subscribe(Person, authorize=authorize)
            await asyncio.to_thread(write, Person(id=1, name="ann"))
            await asyncio.gather(rs.flush_async(30), release())
            return [change.event for _, change in sub.drain()]

    assert asyncio.run(main()) == ["inserted"]


# -- examples/fastapi_app.py ---------------------------------------------------------------


def test_the_fastapi_example_pushes_its_own_writes_and_others_over_its_websocket(dsn) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    try:
        import fastapi_app
    finally:
        sys.path.pop(0)
    from fastapi.testclient import TestClient

    app = fastapi_app.create_app(dsn)
    with TestClient(app) as client:
        assert client.post("/people", json={"id": 1, "name": "Ada"}).status_code == 201
        app.state.live.flush()  # the insert is in the tree the page starts from
        with client.websocket_connect("/ws") as ws:
            (initial,) = ws.receive_json()
            assert (initial["kind"], initial["values"]) == ("inserted", {"id": 1, "name": "Ada"})

            assert client.put("/people/1", json={"name": "Bea"}).status_code == 200
            assert ws.receive_json() == [
                {
                    "kind": "updated",
                    "path": [[1]],
                    "model": "Person",
                    "key": [1],
                    "values": {"name": "Bea"},
                    "index": None,
                }
            ]

            writer = sa.create_engine(sa.make_url(dsn).set(drivername="postgresql+psycopg"))
            with writer.begin() as conn:  # another process's write, psql's say
                conn.execute(sa.insert(fastapi_app.Post).values(id=10, title="Notes", person_id=1))
            writer.dispose()
            (post,) = ws.receive_json()
            assert (post["kind"], post["path"], post["values"]["title"]) == (
                "inserted",
                [[1], "posts", [10]],
                "Notes",
            )
        assert client.get("/people").json() == [{"id": 1, "name": "Bea", "posts": ["Notes"]}]
