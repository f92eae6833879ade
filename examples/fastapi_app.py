"""rowsync in an asyncio framework: a FastAPI app on an ``AsyncEngine`` whose websocket pushes
the changes of a live query (people and their posts), whoever makes them.

The app writes through ``AsyncSession``s; rowsync is given the same ``AsyncEngine`` and runs
for the app's lifetime in its lifespan (``async with rs``). One live query holds the people
and their posts; each websocket streams its diffs (``live.changes(initial=True)``: the whole
tree first, as inserted rows, then each change), so a page patches itself.

    DATABASE_URL=postgresql://postgres@127.0.0.1/postgres .venv/bin/python examples/fastapi_app.py

then rename someone (``curl -X PUT localhost:8000/people/1 -H 'content-type: application/json'
-d '{"name": "Bea"}'``) or change rows from ``psql`` while ``ws://localhost:8000/ws`` is open.
It uses the tables ``people`` and ``posts`` (created if missing; those of ``make demo`` fit)
and a channel of its own, so it runs beside the demo without touching its triggers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

import rowsync
from rowsync import RowSync
from rowsync.live import LiveQuery


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "people"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    posts: Mapped[list[Post]] = relationship(order_by="Post.id")


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    person_id: Mapped[int] = mapped_column(sa.ForeignKey("people.id", ondelete="CASCADE"))


DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
WATCHERS = rowsync.watchers(Person, ["posts"]) + rowsync.watchers(Post)
PEOPLE = sa.select(Person).options(selectinload(Person.posts)).order_by(Person.name, Person.id)


async def session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as s:
        yield s


DB = Annotated[AsyncSession, Depends(session)]


class NewPerson(BaseModel):
    id: int
    name: str


class Rename(BaseModel):
    name: str


def create_app(database_url: str | None = None) -> FastAPI:
    """The app; its lifespan installs the triggers, starts rowsync and the live query."""
    url = sa.make_url(database_url or os.environ.get("DATABASE_URL") or DEFAULT_URL)
    engine = create_async_engine(url.set(drivername="postgresql+psycopg"))
    rs = RowSync(engine, WATCHERS, channel="rowsync_fastapi")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as conn:  # an application leaves this to its migrations
            await conn.run_sync(Base.metadata.create_all)
        await rs.install_async()  # idempotent; in production, a migration does it
        async with rs:  # the listener runs until the app stops
            # The live query runs its statement in rowsync's background thread, through
            # rowsync's own (synchronous) engine; made in a thread, as it runs it once now.
            live = await asyncio.to_thread(
                rs.live, sessionmaker(rs.engine), PEOPLE, idle_timeout=None
            )
            app.state.live = live
            async with live:
                yield
        await engine.dispose()
        rs.engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)

    @app.get("/people")
    async def people(db: DB) -> list[dict[str, Any]]:
        found = await db.scalars(PEOPLE)
        return [
            {"id": p.id, "name": p.name, "posts": [post.title for post in p.posts]} for p in found
        ]

    @app.post("/people", status_code=201)
    async def add(person: NewPerson, db: DB) -> None:
        db.add(Person(id=person.id, name=person.name))
        await db.commit()

    @app.put("/people/{person_id}")
    async def rename(person_id: int, body: Rename, db: DB) -> None:
        person = await db.get(Person, person_id)
        if person is None:
            raise HTTPException(404, f"no person {person_id}")
        person.name = body.name
        await db.commit()

    @app.websocket("/ws")
    async def changes(ws: WebSocket) -> None:
        await ws.accept()
        live: LiveQuery = app.state.live
        stream = live.changes(initial=True)

        async def push() -> None:
            async for diffs in stream:
                await ws.send_json([diff.to_json() for diff in diffs])

        pushing = asyncio.create_task(push())
        try:
            while True:  # ends when the client goes away: a push alone would never notice
                await ws.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            pushing.cancel()
            await stream.aclose()

    return app


def main() -> None:
    import uvicorn

    uvicorn.run(create_app(), port=int(os.environ.get("PORT", 8000)))


if __name__ == "__main__":
    main()
