"""The listener: oversized events, reconnects, batching and bad input (SCENARIO 5 and the
listener's own promises)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import rowsync
from models import Person, Post, PostTag, Tag
from rowsync import NotRunningError, Resync, RowSync, Sync
from rowsync.listener import APPLICATION_NAME, Flush, Notice, parse


def changes(messages: list[Any]) -> list[rowsync.Change]:
    assert all(kind is Sync for kind, _ in messages), messages
    return [change for _, change in messages]


def notify(rs: RowSync, *payloads: str) -> None:
    """Send raw payloads on rowsync's channel, each committed on its own."""
    with rs.connect(autocommit=True) as conn:
        for payload in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (rs.channel, payload))


# -- scenario 5: oversized events ------------------------------------------------------


def test_row_with_identifying_columns_beyond_the_notify_limit_is_written_and_delivered(
    schema, write
) -> None:
    rs = RowSync(schema, rowsync.watchers(Post, extra_columns=["body"]))
    rs.install()
    big = "é" * 5000 + "x" * 1000  # 11 kB of UTF-8
    with rs:
        sub = rs.subscribe(Post)
        # each read on its own: an event is told with its row's values as read
        write(Post(id=1, body=big))
        rs.flush()
        write(sa.update(Post).values(body=big + "!"))
        rs.flush()
        write(sa.delete(Post))
        rs.flush()
        got = changes(sub.drain())

    assert [(c.event, c.ids["id"], c.ids["body"]) for c in got] == [
        ("inserted", 1, big),
        ("updated", 1, big + "!"),
        ("deleted", 1, big + "!"),
    ]
    assert rs.listener.stats["overflow"] == 3
    assert rs.listener.stats["overflow_missing"] == 0


def test_oversized_and_small_events_of_one_transaction_keep_their_order(schema, write) -> None:
    rs = RowSync(schema, rowsync.watchers(Post, extra_columns=["body"]))
    rs.install()
    with rs:
        sub = rs.subscribe(Post)
        write(Post(id=1, body="small"), Post(id=2, body="x" * 9000), Post(id=3, body="small"))
        rs.flush()
        got = changes(sub.drain())

    assert [c.ids["id"] for c in got] == [1, 2, 3]
    assert len(got[1].ids["body"]) == 9000
    assert got[0].ref < got[1].ref < got[2].ref
    assert rs.listener.stats["overflow"] == 1


class DocBase(DeclarativeBase):
    pass


class Doc(DocBase):
    """A table whose primary key alone can exceed the NOTIFY limit."""

    __tablename__ = "docs"
    key: Mapped[str] = mapped_column(primary_key=True)
    title: Mapped[str | None]


def test_text_primary_key_beyond_the_notify_limit_is_delivered(engine) -> None:
    DocBase.metadata.create_all(engine)
    key = "doc-" + "k" * 9000
    rs = RowSync(engine, rowsync.watchers(Doc))
    rs.install()
    with rs:
        sub = rs.subscribe(Doc)
        with engine.begin() as conn:
            conn.execute(sa.insert(Doc).values(key=key, title="a"))
        with engine.begin() as conn:
            conn.execute(sa.update(Doc).values(title="b"))
        rs.flush()
        got = changes(sub.drain())

    assert [(c.model, c.event, c.ids) for c in got] == [
        (Doc, "inserted", {"key": key}),
        (Doc, "updated", {"key": key}),
    ]
    assert rs.listener.stats["overflow"] == 2


def listener_waits_on_a_lock(rs: RowSync, timeout: float = 30.0) -> bool:
    """Whether the listener's backend comes to wait on a lock within ``timeout``.

    Polls the server's own view of the backend: a condition, not a guessed delay.
    """
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + timeout
    with rs.connect(autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(query, (APPLICATION_NAME,)).fetchone()
            if row and row[0]:
                return True
    return False


def test_notification_arriving_while_the_listener_reads_the_overflow_table_is_not_held_back(
    schema, write
) -> None:
    """A notification that comes in with the result of the listener's own query waits in
    psycopg's backlog, not in the socket: the listener must look there before sleeping
    (here it would sleep until the 300 s probe)."""
    rs = RowSync(schema, rowsync.watchers(Post, extra_columns=["body"]), probe_interval=300)
    rs.install()
    entered, gate = threading.Event(), threading.Event()
    deliver = rs.listener.on_batch

    def paused(batch: Any) -> None:
        if any(isinstance(n, Notice) and n.new.get("id") == 1 for n in batch):
            entered.set()
            gate.wait(30)
        deliver(batch)

    rs.listener.on_batch = paused
    with rs:
        sub = rs.subscribe(Post)
        write(Post(id=1))
        assert entered.wait(30)  # the listener is held in the batch of post 1
        write(Post(id=2, body="x" * 9000))  # oversized: read back from the overflow table
        with rs.connect() as locker:
            locker.execute("LOCK TABLE rowsync.overflow IN ACCESS EXCLUSIVE MODE")
            gate.set()
            assert listener_waits_on_a_lock(rs)  # its overflow read is blocked by our lock
            write(Post(id=3))  # notified while the listener's query runs
        got = [sub.get(timeout=20) for _ in range(3)]

    assert [c.ids["id"] for c in changes(got)] == [1, 2, 3]


# -- reconnect -------------------------------------------------------------------------


def listener_pids(engine: sa.Engine) -> list[int]:
    query = sa.text(
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = :name"
    )
    with engine.connect() as conn:
        return list(conn.scalars(query, {"name": APPLICATION_NAME}))


def test_listener_reconnects_by_itself_and_tells_every_subscriber_to_resync(rs, write) -> None:
    sub = rs.subscribe(Post)
    other = rs.subscribe(Tag, "inserted")
    [pid] = listener_pids(rs.engine)

    with rs.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})
    rs.flush(timeout=30)  # waits for the listener to be back
    gap, other_gap = sub.drain(), other.drain()
    write(Person(id=1), Post(id=1, person_id=1))
    rs.flush()
    after = sub.drain()

    [(kind, info)] = gap
    assert kind is Resync and info.reason == "reconnect"
    assert [(kind, info.reason) for kind, info in other_gap] == [(Resync, "reconnect")]
    assert [(c.event, c.ids["id"]) for c in changes(after)] == [("inserted", 1)]
    assert rs.listener.stats["reconnects"] == 1
    [new_pid] = listener_pids(rs.engine)
    assert new_pid != pid


# -- batching --------------------------------------------------------------------------


def test_burst_is_fetched_with_one_row_query_per_table_per_batch(rs, write) -> None:
    """200 events committed at once arrive in one batch, or in a few when the socket hands
    them over in pieces; either way each batch costs one row query per table, not one per event."""
    write(Person(id=1), *[Tag(id=i) for i in range(1, 51)])
    rs.flush()
    sub = rs.subscribe(Post, "inserted")
    links = rs.subscribe(PostTag, "inserted")
    batches: list[set[str]] = []
    deliver = rs.listener.on_batch

    def counted(batch: Any) -> None:
        if tables := {n.table for n in batch if isinstance(n, Notice)}:
            batches.append(tables)
        deliver(batch)

    rs.listener.on_batch = counted
    queries = rs.rows.queries["rows"]

    write(
        sa.insert(Post).values([{"id": i, "person_id": 1} for i in range(1, 151)]),
        sa.insert(PostTag).values([{"post_id": i, "tag_id": i} for i in range(1, 51)]),
    )
    rs.flush()

    assert len(sub.drain()) == 150
    assert len(links.drain()) == 50
    assert rs.rows.queries["rows"] - queries == sum(len(tables) for tables in batches)
    assert len(batches) <= 10  # typically 1: posts and post_tags, one query each


# -- malformed input -------------------------------------------------------------------

GARBAGE = [
    "not json",
    "",
    "null",
    '"a string"',
    "[1, 2]",
    "{}",
    '{"f": 5}',
    '{"r": 1}',
    '{"r": "1", "s": "public", "t": "posts", "e": "i", "n": {"id": 1}}',
    '{"r": true, "s": "public", "t": "posts", "e": "i", "n": {"id": 1}}',
    '{"r": 1, "s": "public", "t": "posts", "e": "x", "n": {"id": 1}}',
    '{"r": 1, "s": "public", "t": "posts", "e": "i", "n": [1]}',
    '{"r": 1, "s": "public", "t": "posts", "e": "u", "n": {"id": 1}, "o": 5}',
    '{"r": 1, "s": "public", "t": "posts", "e": "i", "n": {"id": 1}, "l": 7}',
]


@pytest.mark.parametrize("payload", GARBAGE)
def test_parse_rejects_what_is_not_a_rowsync_payload(payload: str) -> None:
    with pytest.raises(ValueError):
        parse(payload)


def test_parse_reads_events_barriers_and_overflow_references() -> None:
    event = {
        "r": 7,
        "s": "public",
        "t": "posts",
        "e": "u",
        "l": None,
        "n": {"id": 1},
        "o": {"id": 2},
    }

    assert parse(json.dumps(event)) == Notice(
        7, "public", "posts", "updated", {"id": 1}, {"id": 2}, None
    )
    assert parse('{"f": "token"}') == Flush("token")
    assert parse('{"r": 9, "x": true}') == {"r": 9, "x": True}


def test_malformed_notifications_are_counted_and_the_listener_keeps_delivering(rs, write) -> None:
    write(Post(id=11), Post(id=12), Post(id=13))  # refs 1 to 3 are issued: events could bear them
    rs.flush()
    sub = rs.subscribe(Post)
    unknown_table = '{"r": 1, "s": "public", "t": "nope", "e": "i", "n": {"id": 1}}'
    without_key = '{"r": 2, "s": "public", "t": "posts", "e": "i", "n": {"name": "x"}}'
    unsealed_overflow = '{"r": 3, "x": true}'  # no trigger sent it: no resync for anyone

    notify(rs, *GARBAGE, unknown_table, without_key, unsealed_overflow)
    write(Post(id=1))
    rs.flush()

    messages = sub.drain()
    assert [kind for kind, _ in messages if kind is rowsync.Resync] == []
    assert [(c.event, c.ids["id"]) for c in changes([m for m in messages if m[0] is Sync])] == [
        ("inserted", 1)
    ]
    assert rs.listener.stats["malformed"] == len(GARBAGE)
    assert rs.stats["unwatched"] == 1
    assert rs.stats["malformed"] == 1
    assert rs.listener.stats["overflow_forged"] == 1
    assert rs.listener.stats["reconnects"] == 0


# -- lifecycle -------------------------------------------------------------------------


def test_flush_needs_a_started_rowsync(schema) -> None:
    rs = RowSync(schema, rowsync.watchers(Post))

    with pytest.raises(NotRunningError):
        rs.flush()


def test_start_fails_clearly_when_the_listener_cannot_connect() -> None:
    rs = RowSync(
        "postgresql://rowsync@127.0.0.1:1/nowhere", rowsync.watchers(Post), start_timeout=0.5
    )

    with pytest.raises(NotRunningError, match="could not connect"):
        rs.start()
    assert not rs.running


def test_stopped_rowsync_no_longer_delivers_and_announces_the_gap_when_started_again(
    schema, write
) -> None:
    rs = RowSync(schema, rowsync.watchers(Post))
    rs.install()
    sub = rs.subscribe(Post)
    with rs:
        assert rs.running
    assert not rs.running

    write(Post(id=1))  # lost to NOTIFY: nobody listens
    with rs:
        write(Post(id=2))
        rs.flush()

    gap, *rest = sub.drain()
    assert gap[0] is Resync and gap[1].reason == "reconnect"
    assert [c.ids["id"] for c in changes(rest)] == [2]
