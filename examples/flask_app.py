"""rowsync in a thread-based framework: a Flask page of people and their posts that stays
current while rows change, whoever changes them.

The app starts one RowSync when it is created. A background thread reads a subscription
and applies each message to the loaded tree with ``rs.sync``, under a lock; request
handlers read the tree under the same lock. The page follows ``/events`` (server-sent
events); ``/people.json?since=N`` answers once the tree has changed past version N.

    DATABASE_URL=postgresql://postgres@127.0.0.1/postgres .venv/bin/python examples/flask_app.py

then change rows from ``psql`` and watch the page (http://127.0.0.1:5000/). It uses the
tables ``people`` and ``posts`` (created if missing; those of ``make demo`` fit) and a
channel of its own, so it runs beside the demo without touching its triggers.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from flask import Flask, Response, request, stream_with_context
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

import rowsync
from rowsync import Resync, RowSync


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
ASSOCS = ["posts"]
PRELOADS = {Person: ASSOCS}
WATCHERS = rowsync.watchers(Person, assocs=ASSOCS)
QUERY = sa.select(Person).options(selectinload(Person.posts)).order_by(Person.id)


class LiveTree:
    """People with their posts: loaded once, then kept current by a thread of its own."""

    def __init__(self, rs: RowSync, sessions: sessionmaker[Session]) -> None:
        self.rs = rs
        self.sessions = sessions
        self.changed = threading.Condition()
        """Held while the tree is read or patched; notified after each change."""
        self.version = 0
        self.closed = False
        self.people, self.sub = self._load()
        self.thread = threading.Thread(target=self._follow, name="live-tree", daemon=True)
        self.thread.start()

    def _load(self) -> tuple[list[Person], rowsync.Subscription]:
        """Query the tree and subscribe to it at once (a change in between would be missed);
        people inserted later join the list and are followed too."""
        with self.sessions() as session:
            people = list(session.scalars(QUERY))
        sub = self.rs.subscribe(people, assocs=ASSOCS)
        sub.add(Person, "inserted", follow=True, assocs=ASSOCS)
        return people, sub

    def _follow(self) -> None:
        while True:
            try:
                message = self.sub.get()
            except TimeoutError:  # closed
                if self.closed:
                    return
                continue  # replaced by a resync: read the new one
            with self.changed:
                if message[0] is Resync:
                    # Changes may have been missed: query again (new people included).
                    self.sub.close()
                    self.people, self.sub = self._load()
                else:
                    # preloads: what a new person comes with when the list was empty
                    self.people = self.rs.sync(self.people, message, PRELOADS)
                self.version += 1
                self.changed.notify_all()

    def snapshot(self) -> dict[str, Any]:
        with self.changed:
            return {
                "version": self.version,
                "people": [
                    {"id": p.id, "name": p.name, "posts": [[q.id, q.title] for q in p.posts]}
                    for p in self.people
                ],
            }

    def wait(self, since: int, timeout: float) -> dict[str, Any]:
        """The tree once its version is past ``since`` (or after ``timeout`` seconds)."""
        with self.changed:
            self.changed.wait_for(lambda: self.version > since or self.closed, timeout)
            return self.snapshot()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        self.sub.close()
        self.thread.join()


PAGE = """<!doctype html>
<meta charset="utf-8"><title>rowsync + Flask</title>
<h1>People</h1><ul id="people"></ul>
<script>
new EventSource("/events").onmessage = (event) => {
  const list = document.getElementById("people");
  list.replaceChildren(...JSON.parse(event.data).people.map((person) => {
    const item = document.createElement("li");
    item.textContent = person.name + ": " + person.posts.map((p) => p[1]).join(", ");
    return item;
  }));
};
</script>
"""


def create_app(database_url: str | None = None) -> Flask:
    """The app, with its RowSync started and its tree loaded; :func:`close` stops them."""
    url = sa.make_url(database_url or os.environ.get("DATABASE_URL") or DEFAULT_URL)
    engine = sa.create_engine(url.set(drivername="postgresql+psycopg"))
    Base.metadata.create_all(engine)  # an application would leave this to its migrations
    rs = RowSync(engine, WATCHERS, channel="rowsync_flask")
    rs.install()  # idempotent; in production, a migration does it (see the Alembic how-to)
    rs.start()
    live = LiveTree(rs, sessionmaker(engine, expire_on_commit=False))

    app = Flask(__name__)
    app.extensions["rowsync"] = rs
    app.extensions["live_tree"] = live

    @app.get("/")
    def index() -> str:
        return PAGE

    @app.get("/people.json")
    def people() -> dict[str, Any]:
        since = request.args.get("since", type=int)
        if since is None:
            return live.snapshot()
        return live.wait(since, request.args.get("timeout", 25.0, type=float))

    @app.get("/events")
    def events() -> Response:
        def stream() -> Iterator[str]:
            version = -1
            while not live.closed:
                snapshot = live.wait(version, timeout=15.0)
                if snapshot["version"] == version:
                    yield ": still here\n\n"  # keeps proxies from closing a quiet stream
                    continue
                version = snapshot["version"]
                yield f"data: {json.dumps(snapshot)}\n\n"

        return Response(stream_with_context(stream()), mimetype="text/event-stream")

    return app


def close(app: Flask) -> None:
    """Stop the tree's thread and the listener, and close the pool."""
    app.extensions["live_tree"].close()
    rs: RowSync = app.extensions["rowsync"]
    rs.stop()
    rs.engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 5000)))
    args = parser.parse_args()
    app = create_app()
    print(f"serving http://127.0.0.1:{args.port}/ (Ctrl-C stops)")
    try:
        app.run(port=args.port, threaded=True, use_reloader=False)
    finally:
        close(app)


if __name__ == "__main__":
    main()
