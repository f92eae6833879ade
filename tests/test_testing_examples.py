"""examples/flask_app.py: a Flask page whose tree a background thread keeps current,
driven with Flask's test client against the real Postgres."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from flask import Flask  # noqa: E402
from flask_app import Person, Post, close, create_app  # noqa: E402

from fixtures import writer  # noqa: E402


@pytest.fixture
def app(dsn: str) -> Iterator[Flask]:
    app = create_app(dsn)
    try:
        yield app
    finally:
        close(app)


@pytest.fixture
def write(app: Flask) -> Callable[..., None]:
    return writer(sa.orm.sessionmaker(app.extensions["rowsync"].engine))


def page_until(app: Flask, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Long-poll ``/people.json`` until the tree satisfies ``ready`` (a guard of 10 s, no sleep:
    each request returns as soon as the tree changes)."""
    client = app.test_client()
    page = client.get("/people.json").get_json()
    for _ in range(20):
        if ready(page):
            return page
        page = client.get(f"/people.json?since={page['version']}&timeout=0.5").get_json()
    pytest.fail(f"the page never showed the change: {page}")


def names(page: dict[str, Any]) -> list[tuple[str, list[str]]]:
    return [(p["name"], [title for _, title in p["posts"]]) for p in page["people"]]


def test_the_page_follows_inserts_updates_moves_and_deletes(app, write):
    write(Person(id=1, name="Ada"), Person(id=2, name="Bob"))
    assert names(page_until(app, lambda p: len(p["people"]) == 2)) == [("Ada", []), ("Bob", [])]

    write(Post(id=1, title="Notes", person_id=1))
    page = page_until(app, lambda p: p["people"][0]["posts"])
    assert names(page) == [("Ada", ["Notes"]), ("Bob", [])]

    write(sa.update(Post).values(title="Notes, revised", person_id=2))
    page = page_until(app, lambda p: p["people"][1]["posts"])
    assert names(page) == [("Ada", []), ("Bob", ["Notes, revised"])]

    write(sa.delete(Post), sa.delete(Person).where(Person.id == 1))
    page = page_until(app, lambda p: len(p["people"]) == 1 and not p["people"][0]["posts"])
    assert names(page) == [("Bob", [])]


def test_a_resync_reloads_the_tree(app, write):
    write(Person(id=1, name="Ada"))
    page_until(app, lambda p: p["people"])
    rs = app.extensions["rowsync"]

    rs.dispatcher.gap("reconnect")  # what the listener does after a reconnect

    page = page_until(app, lambda p: p["version"] >= 2)
    assert names(page) == [("Ada", [])]


def test_the_page_streams_the_tree_as_server_sent_events(app, write):
    write(Person(id=1, name="Ada"))
    page_until(app, lambda p: p["people"])

    response = app.test_client().get("/events", buffered=False)
    first = next(response.response)
    response.close()

    assert response.mimetype == "text/event-stream"
    assert first.startswith(b"data: ") and b'"name": "Ada"' in first


def test_the_index_page_listens_to_the_events(app):
    assert b'new EventSource("/events")' in app.test_client().get("/").data
