"""The live web demo's websocket protocol (examples/web), without a browser: a page gets each
live query's tree once, then only operations naming what changed; no list is read again. Its
edits are HTTP requests that only write: every page sees them as diffs."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from starlette.testclient import TestClient, WebSocketTestSession

from fixtures import counting_queries, returning

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from demo_models import Post, Tag  # noqa: E402
from web.app import create_app  # noqa: E402
from web.database import prepare  # noqa: E402
from web.view import PEOPLE, PUBLISHED  # noqa: E402
from web.writer import Writer  # noqa: E402

from rowsync import Diff  # noqa: E402


@pytest.fixture
def client(dsn: str) -> Iterator[TestClient]:
    """The demo on this test's database (seeded), writer off and slow when switched on."""
    url = prepare(dsn, psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    with TestClient(create_app(url, interval=60)) as test_client:
        yield test_client


@pytest.fixture
def sql(dsn: str) -> Iterator[Callable[..., Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:

        def run(statement: str, *params: Any) -> Any:
            cursor = conn.execute(statement, params)
            return cursor.fetchone() if cursor.description else None

        yield run


class Page:
    """A page's websocket: messages taken by type (and view) in the order each view sent
    them; the views' messages interleave in any order."""

    def __init__(self, ws: WebSocketTestSession) -> None:
        self.ws = ws
        self.unread: list[dict[str, Any]] = []

    def next(self, kind: str, view: str | None = None) -> dict[str, Any]:
        """The next message of ``kind`` (and ``view``), failing, not hanging, if none comes."""
        while True:
            for message in self.unread:
                if message["type"] == kind and view in (None, message.get("view")):
                    self.unread.remove(message)
                    return message
            self.unread.append(returning(self.ws.receive_json, limit=30))


def test_page_gets_each_tree_once_then_only_what_changed(client, sql) -> None:
    engine = client.app.state.demo.engine
    (ada,) = sql("SELECT id FROM people WHERE name = 'Ada Lovelace'")
    with client.websocket_connect("/ws") as ws:
        page = Page(ws)
        people = page.next("snapshot", "people")["ops"]
        published = page.next("snapshot", "published")["ops"]
        assert people[0] == {
            "op": "inserted",
            "key": f"person-{ada}",
            "parent": None,
            "list": "people",
            "index": 0,
            "values": {"id": ada, "name": "Ada Lovelace"},
        }
        assert f"person-{ada}/posts/post-1/tags/tag-2" in [op["key"] for op in people]
        assert f"published/post-1/author/person-{ada}" in [op["key"] for op in published]

        with counting_queries(engine) as statements:
            sql("UPDATE people SET name = 'Ada L.' WHERE id = %s", ada)
            ops = page.next("diff", "people")["ops"]

    assert ops == [
        {
            "op": "updated",
            "key": f"person-{ada}",
            "parent": None,
            "list": "people",
            "index": None,
            "values": {"name": "Ada L."},
        }
    ]
    reads = [s for s in statements if "FROM people" in s]
    assert reads and all("WHERE" in s for s in reads)  # rows by key, never the whole list


def test_post_published_enters_the_filtered_list_in_its_place_and_leaves_it(client, sql) -> None:
    (post, person) = sql("SELECT id, person_id FROM posts WHERE NOT published ORDER BY id")
    with client.websocket_connect("/ws") as ws:
        page = Page(ws)
        page.next("snapshot", "published")
        sql("UPDATE posts SET published = true WHERE id = %s", post)
        entered = page.next("diff", "published")["ops"]
        (order,) = sql("SELECT array_agg(id ORDER BY title, id) FROM posts WHERE published")
        sql("UPDATE posts SET published = false WHERE id = %s", post)
        left = page.next("diff", "published")["ops"]

    assert (entered[0]["op"], entered[0]["key"], entered[0]["index"]) == (
        "inserted",
        f"published/post-{post}",
        order.index(post),  # where Postgres' ORDER BY title puts it
    )
    assert f"published/post-{post}/author/person-{person}" in [op["key"] for op in entered]
    assert [(op["op"], op["key"]) for op in left] == [("removed", f"published/post-{post}")]


def test_writer_switch_is_announced_to_every_page(client) -> None:
    with client.websocket_connect("/ws") as ws_one, client.websocket_connect("/ws") as ws_two:
        one, two = Page(ws_one), Page(ws_two)
        assert one.next("writer")["enabled"] is False
        assert two.next("writer")["enabled"] is False

        ws_one.send_json({"type": "writer", "enabled": True})

        assert one.next("writer")["enabled"] is True
        assert two.next("writer")["enabled"] is True
        ws_two.send_json({"type": "writer", "enabled": False})
        assert one.next("writer")["enabled"] is False


def test_a_diff_path_becomes_the_key_of_an_element_below_its_parent() -> None:
    tag = Diff("inserted", ((2,), "posts", (4,), "tags", (1,)), Tag, (1,), {"id": 1}, 0)
    post = Diff("removed", ((4,),), Post, (4,))

    assert PEOPLE.op(tag) == {
        "op": "inserted",
        "key": "person-2/posts/post-4/tags/tag-1",
        "parent": "person-2/posts/post-4",
        "list": "tags",
        "index": 0,
        "values": {"id": 1},
    }
    assert PUBLISHED.op(post) == {
        "op": "removed",
        "key": "published/post-4",
        "parent": None,
        "list": "published",
        "index": None,
        "values": None,
    }


def test_an_edit_through_the_server_reaches_every_page_as_a_diff(client, sql) -> None:
    with client.websocket_connect("/ws") as ws_one, client.websocket_connect("/ws") as ws_two:
        pages = [Page(ws_one), Page(ws_two)]
        for page in pages:
            page.next("snapshot", "people")

        def edit(method: str, path: str, **body: Any) -> list[list[tuple[str, str]]]:
            """The key the server answers, and each page's next diff of the people list."""
            answer = client.request(method, path, json=body or None)
            assert answer.status_code == 200, answer.text
            key = answer.json()["key"]
            ops = [page.next("diff", "people")["ops"] for page in pages]
            assert ops[0] == ops[1]
            assert any(op["key"].endswith(key) for op in ops[0])  # what the page times
            return [(op["op"], op["key"]) for op in ops[0]]

        assert edit("PATCH", "/people/2", name="Grace B. M. Hopper") == [("updated", "person-2")]
        assert sql("SELECT name FROM people WHERE id = 2") == ("Grace B. M. Hopper",)
        added = edit("POST", "/people/2/posts", title="Nanoseconds")
        (post,) = sql("SELECT id FROM posts WHERE title = 'Nanoseconds'")
        assert added == [("inserted", f"person-2/posts/post-{post}")]
        assert edit("PATCH", f"/posts/{post}", title="Microseconds") == [
            ("updated", f"person-2/posts/post-{post}")
        ]
        tagged = edit("POST", f"/posts/{post}/tags", name="cobol")
        (cobol,) = sql("SELECT id FROM tags WHERE name = 'cobol'")
        assert tagged == [("inserted", f"person-2/posts/post-{post}/tags/tag-{cobol}")]
        assert edit("DELETE", f"/posts/{post}/tags/{cobol}") == [
            ("removed", f"person-2/posts/post-{post}/tags/tag-{cobol}")
        ]
        assert edit("DELETE", f"/posts/{post}") == [("removed", f"person-2/posts/post-{post}")]

        assert client.delete(f"/posts/{post}").status_code == 404
        assert client.patch("/people/2", json={"name": " "}).status_code == 400


def test_reset_puts_the_initial_rows_back_under_their_ids(client, sql) -> None:
    everything = (
        "SELECT json_build_array((SELECT json_agg(p ORDER BY id) FROM people p),"
        " (SELECT json_agg(p ORDER BY id) FROM posts p),"
        " (SELECT json_agg(t ORDER BY id) FROM tags t),"
        " (SELECT json_agg(l ORDER BY post_id, tag_id) FROM post_tags l))"
    )
    initial = sql(everything)
    client.patch("/people/1", json={"name": "Ada"})
    client.post("/posts/4/tags", json={"name": "codd"})
    client.delete("/posts/5")
    sql("INSERT INTO people (name) VALUES ('Edsger Dijkstra')")
    with client.websocket_connect("/ws") as ws:
        page = Page(ws)
        page.next("snapshot", "people")
        assert client.post("/reset").status_code == 204
        assert sql(everything) == initial
        page.next("diff", "people")  # the pages are told
    (person,) = sql("INSERT INTO people (name) VALUES ('Edsger Dijkstra') RETURNING id")
    assert person == 5  # the sequences start again too


def test_writer_leaves_rows_edited_from_a_page_alone(client, sql) -> None:
    demo = client.app.state.demo
    client.patch("/people/1", json={"name": "Ada"})
    client.patch("/posts/1", json={"title": "Notes, edited"})
    client.post("/posts/1/tags", json={"name": "mine"})
    kept = (
        "SELECT p.*, array_agg(t.tag_id ORDER BY t.tag_id) FROM posts p"
        " JOIN post_tags t ON t.post_id = p.id WHERE p.id = 1 GROUP BY p.id"
    )
    before = (
        sql("SELECT name FROM people WHERE id = 1"),
        sql(kept),
        sql("SELECT name FROM tags WHERE name = 'mine'"),
    )
    (others,) = sql("SELECT array_agg(p ORDER BY id) FROM posts p WHERE id <> 1")

    writer = Writer(demo.url, random.Random(7), 0, lambda _: None, demo.edited)
    with writer.engine.connect() as conn:
        for _ in range(100):
            writer.step(conn)
    writer.engine.dispose()

    assert (
        sql("SELECT name FROM people WHERE id = 1"),
        sql(kept),
        sql("SELECT name FROM tags WHERE name = 'mine'"),
    ) == before
    assert sql("SELECT array_agg(p ORDER BY id) FROM posts p WHERE id <> 1") != (others,)


def test_a_writer_change_is_timed_from_its_commit_and_a_psql_change_is_not(dsn, sql) -> None:
    url = prepare(dsn, psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    with (
        TestClient(create_app(url, interval=0.01)) as test_client,
        test_client.websocket_connect("/ws") as ws,
    ):
        page = Page(ws)
        page.next("snapshot", "people")
        sql("UPDATE people SET name = 'Ada L.' WHERE id = 1")
        assert "writer_ms" not in page.next("diff", "people")
        ws.send_json({"type": "writer", "enabled": True})
        while "writer_ms" not in (diff := page.next("diff")):
            pass
        ws.send_json({"type": "writer", "enabled": False})
    assert diff["writer_ms"] >= 0
