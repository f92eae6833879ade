"""Never trust what arrives: any role that may connect may NOTIFY on rowsync's channel (and,
in the log modes, a forged row may sit in the change log). A forged or hostile event is
skipped and counted; it never stops the listener, never spoils the genuine events around it,
never puts a row where it does not belong, never freezes a tree, never delays other
subscribers."""

from __future__ import annotations

import json
import os
import threading
import tracemalloc
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

import rowsync
from fixtures import reference_watchers
from models import Person, Post
from rowsync import Resync, RowSync, Sync
from rowsync.position import Position
from rowsync.replay import Replays
from rowsync.testing import one_batch


@pytest.fixture
def attacker(schema: sa.Engine) -> Iterator[str]:
    """The conninfo of a role that may connect, and nothing else."""
    role = f"rowsync_attacker_{os.getpid()}"
    url = schema.url.set(drivername="postgresql")
    owner = url.render_as_string(hide_password=False)
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(url.database or ""), sql.Identifier(role)
            )
        )
    yield url.set(username=role).render_as_string(hide_password=False)
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def forge(conninfo: str, channel: str, *payloads: str | dict[str, Any]) -> None:
    """NOTIFY ``payloads`` on ``channel`` in one transaction, as the role of ``conninfo``."""
    with psycopg.connect(conninfo) as conn:
        for payload in payloads:
            text = payload if isinstance(payload, str) else json.dumps(payload)
            conn.execute("SELECT pg_notify(%s, %s)", (channel, text))


def event(event: str, table: str, new: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A payload shaped as a trigger's; ``ref`` 1 unless given."""
    return {"r": 1, "s": "public", "t": table, "e": event[0], "n": new, **more}


def changes(messages: list[Any]) -> list[tuple[str, int]]:
    return [(m[1].event, m[1].ids["id"]) for m in messages if m[0] is Sync]


def resyncs(messages: list[Any]) -> list[str]:
    return [m[1].reason for m in messages if m[0] is Resync]


# -- payloads too deep, too large ------------------------------------------------------

NESTED = "[" * 3900 + "]" * 3900
"""Deeper than any JSON parser recurses (under NOTIFY's 8000 bytes)."""
NESTED_VALUE = json.dumps(event("u", "posts", {"id": 1, "name": json.loads("[" * 60 + "]" * 60)}))
"""A rowsync-shaped event with a value nested deeper than any column's."""


def test_deeply_nested_payloads_are_skipped_and_counted_without_a_reconnect(rs, write, attacker):
    write(Post(id=1))
    rs.flush()
    sub = rs.subscribe(Post)
    forge(attacker, rs.channel, NESTED, NESTED_VALUE)
    write(sa.update(Post).values(name="real"))
    rs.flush()

    assert changes(sub.drain()) == [("updated", 1)]
    assert rs.listener.stats["malformed"] == 2
    assert rs.listener.stats["reconnects"] == rs.listener.stats["listener_errors"] == 0


@pytest.mark.parametrize("mode", [{"capture": "durable"}, {"capture": "stream"}])
def test_a_deeply_nested_row_in_the_change_log_is_skipped_not_read_again_and_again(schema, mode):
    rs = RowSync(schema, reference_watchers(), **mode)
    rs.install()
    with rs:
        sub = rs.subscribe(Post)
        with schema.begin() as conn:  # as the log's owner: how a row gets there is another test's
            conn.execute(sa.text("INSERT INTO rowsync.log (payload) VALUES (:p)"), {"p": NESTED})
            conn.execute(sa.insert(Post).values(id=1))
        rs.flush()
        assert changes(sub.drain()) == [("inserted", 1)]
        assert rs.listener.stats["malformed"] == 1
        assert rs.listener.stats["reconnects"] == rs.listener.stats["listener_errors"] == 0


def test_a_flood_of_payloads_is_taken_in_by_batches_of_bounded_size(rs, write, attacker):
    """Each payload is as large as NOTIFY allows and parses into thousands of objects: the
    listener holds a bounded number of them at once, however many are sent."""
    write(Post(id=1))
    rs.flush()
    sub = rs.subscribe(Post)
    junk = {"id": 1, "name": [[]] * 1900}
    flood = [event("u", "posts", junk, g=str(i)) for i in range(1000)]  # NOTIFY folds equal ones
    tracemalloc.start()
    try:
        forge(attacker, rs.channel, *flood)
        write(sa.update(Post).values(name="real"))
        rs.flush(timeout=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert changes(sub.drain())[-1] == ("updated", 1)
    assert peak < 64 << 20, f"{peak >> 20} MB"


# -- identifiers the row gives the lie to ----------------------------------------------


def test_a_forged_insert_naming_another_parents_row_never_reaches_that_parent(rs, write, attacker):
    """Person 1 is a tenant: a forged insert naming person 2's post as person 1's is not
    delivered to person 1's subscribers, and never puts that post in their tree. Who is told
    is what the row says (its own tenant, with its own values)."""
    write(Person(id=1), Person(id=2), Post(id=20, person_id=2, name="person 2's"))
    rs.flush()
    mine = rs.subscribe(Post, "inserted", person_id=1)
    theirs = rs.subscribe(Post, "inserted", person_id=2)

    forge(attacker, rs.channel, event("i", "posts", {"id": 20, "person_id": 1}, r=2))
    write(Post(id=10, person_id=1))
    rs.flush()

    got = mine.drain()
    assert changes(got) == [("inserted", 10)]
    assert [rs.sync(None, m).id for m in got] == [10]
    assert [m[1].ids for m in theirs.drain()] == [{"id": 20, "person_id": 2}]
    assert rs.stats["contradicted"] == 1


def test_a_forged_delete_of_a_row_that_exists_is_told_as_an_update(rs, write, sessions, attacker):
    """A delete whose row exists is not believed: what is true is the row (a genuine delete
    followed by an insert of the same key, read in a later batch, looks the same)."""
    write(Person(id=1), Post(id=10, person_id=1))
    rs.flush()
    with sessions() as session:
        person = session.get(Person, 1, options=[sa.orm.selectinload(Person.posts)])
    sub = rs.subscribe(person, assocs=["posts"])

    forge(attacker, rs.channel, event("d", "posts", {"id": 10, "person_id": 1}))
    rs.flush()

    got = sub.drain()
    assert changes(got) == [("updated", 10)]
    for message in got:
        person = rs.sync(person, message)
    assert [p.id for p in person.posts] == [10]
    assert rs.stats["contradicted"] == 1


def test_an_update_is_told_with_the_rows_own_values(rs, write, attacker):
    """A forged update claiming new identifying values tells who the row's values say, with
    those values: never the claimed ones."""
    write(Person(id=1), Person(id=2), Post(id=20, person_id=2))
    rs.flush()
    mine = rs.subscribe(Post, "updated", person_id=1)
    theirs = rs.subscribe(Post, "updated", person_id=2)

    forge(attacker, rs.channel, event("u", "posts", {"id": 20, "person_id": 1}))
    rs.flush()

    assert mine.drain() == []
    assert [m[1].ids for m in theirs.drain()] == [{"id": 20, "person_id": 2}]


def test_forged_values_before_an_update_reach_nobody_the_row_does_not_concern(
    rs, write, sessions, attacker
):
    """A forged update naming person 1 as post 20's former owner carries no seal of the
    trigger's: it is not routed by those values (docs/security.md, "Forged values before an
    update"). Person 1's subscribers hear nothing; person 2's, whom the row concerns, are
    told of an update with its own values."""
    write(Person(id=1), Person(id=2), Post(id=10, person_id=1), Post(id=20, person_id=2))
    rs.flush()
    with sessions() as session:
        person = session.get(Person, 1, options=[sa.orm.selectinload(Person.posts)])
    tree = rs.subscribe(person, assocs=["posts"])
    mine = rs.subscribe(Post, person_id=1)
    theirs = rs.subscribe(Post, person_id=2)

    forge(
        attacker,
        rs.channel,
        event("u", "posts", {"id": 20, "person_id": 2}, o={"id": 20, "person_id": 1}, r=4),
    )
    rs.flush()

    assert mine.drain() == tree.drain() == []
    assert [(m[1].event, m[1].ids) for m in theirs.drain()] == [
        ("updated", {"id": 20, "person_id": 2})
    ]
    assert rs.listener.stats["unsealed"] == 1


def test_an_unsealed_update_from_outdated_triggers_is_announced(rs, write, sessions, attacker):
    """Until an upgrade installs sealing triggers, an update without a seal may be a genuine
    move of an old trigger's: the subscriptions it may have left are told to resync rather
    than keep a row that left (the start warns that the triggers are outdated)."""
    write(Person(id=1), Person(id=2), Post(id=20, person_id=2), Post(id=30, person_id=2))
    rs.flush()
    with rs.engine.begin() as conn:  # the posts triggers as an older release left them
        pg = conn.connection.driver_connection
        found = pg.execute(
            "SELECT t.tgname, n.nspname, c.relname FROM pg_trigger AS t"
            " JOIN pg_class AS c ON c.oid = t.tgrelid JOIN pg_namespace AS n"
            " ON n.oid = c.relnamespace WHERE t.tgrelid = 'posts'::regclass AND NOT t.tgisinternal"
        ).fetchall()
        for name, schema, table in found:
            pg.execute(
                sql.SQL("COMMENT ON TRIGGER {} ON {} IS {}").format(
                    sql.Identifier(name),
                    sql.Identifier(schema, table),
                    sql.Literal(f"rowsync channel={rs.channel} digest=old"),
                )
            )
    rs.stop()
    rs.start()
    assert not rs.listener.seals_expected
    mine = rs.subscribe(Post, person_id=1)
    theirs = rs.subscribe(Post, person_id=2)

    forge(
        attacker,
        rs.channel,
        event("u", "posts", {"id": 20, "person_id": 2}, o={"id": 20, "person_id": 1}, r=4),
    )
    rs.flush()

    assert [m[0] for m in mine.drain()] == [Resync]
    assert [m[0] for m in theirs.drain()] == [Resync, Sync]


def sealed_payloads(conninfo: str, channel: str, write: Any, *items: Any) -> list[str]:
    """The payloads of updates that carry values before, as a role that may only connect
    and LISTEN sees them while ``items`` are written."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        write(*items)
        payloads = [n.payload for n in conn.notifies(timeout=5, stop_after=len(items))]
    return [p for p in payloads if json.loads(p).get("o")]


def test_a_seal_copied_onto_other_values_before_is_not_honoured(rs, write, attacker):
    """The seal covers the whole event: the seal of post 20's genuine move from person 2 to
    person 3, sent again with person 1 as its former owner (or with another post's key),
    routes by no values before."""
    write(Person(id=1), Person(id=2), Person(id=3), Post(id=20, person_id=2), Post(id=30))
    rs.flush()
    mine = rs.subscribe(Post, person_id=1)
    [genuine] = sealed_payloads(
        attacker, rs.channel, write, sa.update(Post).where(Post.id == 20).values(person_id=3)
    )
    rs.flush()
    sealed = json.loads(genuine)
    assert sealed["o"]["person_id"] == 2

    forge(
        attacker,
        rs.channel,
        {**sealed, "o": {**sealed["o"], "person_id": 1}},
        {**sealed, "n": {**sealed["n"], "id": 30}},
    )
    rs.flush()

    assert mine.drain() == []
    assert rs.listener.stats["unsealed"] == 2


def moved_twice(rs: RowSync, write: Any, attacker: str) -> str:
    """The payload of post 20's genuine move from person 2 to person 3, as whoever LISTENs
    copies it; the post has moved on to person 4 since."""
    write(Person(id=2), Person(id=3), Person(id=4), Post(id=20, person_id=2))
    rs.flush()
    [genuine] = sealed_payloads(
        attacker, rs.channel, write, sa.update(Post).where(Post.id == 20).values(person_id=3)
    )
    write(sa.update(Post).where(Post.id == 20).values(person_id=4))
    rs.flush()
    return genuine


def test_a_genuine_sealed_update_sent_again_reaches_nobody_else(rs, write, attacker):
    """What a seal does not prove is that this is its first arrival (docs/security.md): a
    listening session is delivered a genuine update once, so a copy sent again is not routed
    by its values before. The parent its row left hears nothing more; the row's own
    subscribers are told of an update, with its own values."""
    genuine = moved_twice(rs, write, attacker)
    left = rs.subscribe(Post, person_id=2)
    now = rs.subscribe(Post, person_id=4)

    forge(attacker, rs.channel, genuine)
    rs.flush()

    assert left.drain() == []
    assert [m[1].ids for m in now.drain()] == [{"id": 20, "other_id": None, "person_id": 4}]
    assert rs.listener.stats["replayed"] == 1
    assert rs.listener.stats["unsealed"] == rs.listener.stats["gaps"] == 0


def test_a_sealed_update_committed_before_the_listener_began_is_not_routed_again(
    rs, write, attacker
):
    """A new session (a restart, a reconnect) is owed no notification committed before it
    began to LISTEN: a copy of one is told apart by the snapshot taken before the LISTEN."""
    genuine = moved_twice(rs, write, attacker)
    rs.stop()
    rs.start()
    left = rs.subscribe(Post, person_id=2)

    forge(attacker, rs.channel, genuine)
    rs.flush()

    assert left.drain() == []
    assert rs.listener.stats["replayed"] == 1
    assert len(rs.listener.replays) == 0


def test_the_refs_remembered_are_forgotten_once_a_later_snapshot_covers_them(rs, write, attacker):
    """The memory of a session stays bounded: past ``renew_after`` refs the listener takes a
    snapshot and sends a barrier after it; once the barrier is back, that snapshot tells the
    copies apart and the refs it saw are forgotten."""
    rs.listener.replays.renew_after = 1
    genuine = moved_twice(rs, write, attacker)
    rs.flush()  # sent after the batch that asked for the renewal: its barrier came before
    assert len(rs.listener.replays) == 0
    left = rs.subscribe(Post, person_id=2)

    forge(attacker, rs.channel, genuine)
    rs.flush()

    assert left.drain() == []
    assert rs.listener.stats["replayed"] == 1


def test_past_its_cap_the_memory_takes_an_update_rather_than_reject_it():
    """While a renewal's barrier is on its way the memory holds at most twice
    ``renew_after`` refs: past that, a genuine update is never rejected for want of room;
    a copy of it gets through until the barrier arrives and its snapshot covers it."""
    replays = Replays(renew_after=1)
    replays.begin(Position.of("100:100:"))
    assert not replays.replayed(1, 100)
    token = replays.due()
    assert token is not None
    replays.renewing(Position.of("103:103:"), token)
    assert replays.due() is None  # one renewal at a time
    assert not replays.replayed(2, 101)
    assert [replays.replayed(3, 102), replays.replayed(3, 102)] == [False, False]
    assert replays.replayed(2, 101)

    assert not replays.arrived("someone else's")
    assert replays.arrived(token)
    assert len(replays) == 0
    assert [replays.replayed(r, x) for r, x in ((1, 100), (3, 102), (4, 103))] == [
        True,
        True,
        False,
    ]


def test_a_move_in_progress_when_the_listener_begins_reaches_the_parent_it_left(
    rs, write, monkeypatch
):
    """A transaction in progress when the session's snapshot is taken, committed once the
    listener LISTENs, is delivered to it: the snapshot did not see it, so it is not taken for
    a copy. (One committed between the snapshot and the LISTEN may or may not be delivered;
    that snapshot did not see it either, so if it is, it is not rejected.)"""
    write(Person(id=2), Person(id=3), Post(id=20, person_id=2))
    rs.flush()
    mover = rs.engine.connect()
    snapshot = rs.listener._snapshot

    def begun_during_the_snapshot(conn: Any, barrier: str | None = None) -> Any:
        if barrier is None and not mover.in_transaction():
            mover.execute(sa.update(Post).where(Post.id == 20).values(person_id=3))
            write(Person(id=5))  # committed after it began: the snapshot sees the mover in progress
        return snapshot(conn, barrier)

    monkeypatch.setattr(rs.listener, "_snapshot", begun_during_the_snapshot)
    try:
        rs.stop()
        rs.start()
        left = rs.subscribe(Post, person_id=2)
        mover.commit()
    finally:
        mover.close()
    rs.flush()

    assert [m[1].ids for m in left.drain()] == [{"id": 20, "other_id": None, "person_id": 3}]
    assert rs.listener.stats["replayed"] == rs.listener.stats["unsealed"] == 0


def test_a_genuine_move_reaches_the_subscribers_of_the_parents_it_leaves_and_joins(
    rs, write, sessions
):
    write(Person(id=1), Person(id=2), Post(id=10, person_id=1), Post(id=20, person_id=1))
    rs.flush()
    with sessions() as session:
        left = session.get(Person, 1, options=[sa.orm.selectinload(Person.posts)])
        joined = session.get(Person, 2, options=[sa.orm.selectinload(Person.posts)])
    trees = [rs.subscribe(left, assocs=["posts"]), rs.subscribe(joined, assocs=["posts"])]
    filters = [rs.subscribe(Post, person_id=1), rs.subscribe(Post, person_id=2)]

    write(sa.update(Post).where(Post.id == 20).values(person_id=2))
    rs.flush()

    moved = [("updated", {"id": 20, "other_id": None, "person_id": 2})]
    assert [[(m[1].event, m[1].ids) for m in sub.drain()] for sub in filters] == [moved, moved]
    got = [sub.drain() for sub in trees]
    assert [[(m[1].event, m[1].ids) for m in messages] for messages in got] == [moved, moved]
    for message in got[0]:
        left = rs.sync(left, message)
    for message in got[1]:
        joined = rs.sync(joined, message)
    assert [[p.id for p in person.posts] for person in (left, joined)] == [[10], [20]]
    assert rs.listener.stats["unsealed"] == rs.listener.stats["seals_unchecked"] == 0


# -- refs and transactions not issued yet ----------------------------------------------


def test_a_forged_ref_from_the_future_does_not_freeze_a_row(rs, write, sessions, attacker):
    write(Post(id=1, name="before"))
    rs.flush()
    with sessions() as session:
        post = session.get(Post, 1)
    sub = rs.subscribe(post)

    forge(attacker, rs.channel, event("u", "posts", {"id": 1}, r=2**62))
    write(sa.update(Post).values(name="after"))
    rs.flush()
    for message in sub.drain():
        post = rs.sync(post, message)

    assert post.name == "after"
    assert rs.listener.stats["unissued"] == 1


def test_a_forged_transaction_id_from_the_future_is_skipped(rs, write, attacker):
    write(Post(id=1))
    rs.flush()
    sub = rs.subscribe(Post)

    forge(attacker, rs.channel, event("u", "posts", {"id": 1}, v=2**62))
    rs.flush()

    assert sub.drain() == []
    assert rs.listener.stats["unissued"] == 1


@pytest.mark.parametrize("mode", [{"capture": "durable"}, {"capture": "stream"}])
def test_a_log_row_with_a_ref_from_the_future_is_skipped(schema, mode):
    rs = RowSync(schema, reference_watchers(), **mode)
    rs.install()
    with rs:
        with schema.begin() as conn:
            conn.execute(sa.insert(Post).values(id=1, name="before"))
        rs.flush()
        sub = rs.subscribe(Post)
        forged = json.dumps(event("u", "posts", {"id": 1}, r=2**62))
        with schema.begin() as conn:
            conn.execute(sa.text("INSERT INTO rowsync.log (payload) VALUES (:p)"), {"p": forged})
            conn.execute(sa.update(Post).values(name="after"))
        rs.flush()
        assert [(c.event, c.ref < 2**62) for _, c in sub.drain()] == [("updated", True)]
        assert rs.listener.stats["unissued"] == 1


# -- one bad key, one batch ------------------------------------------------------------


def test_a_key_out_of_its_columns_range_spoils_nothing_else_in_its_batch(rs, write, attacker):
    write(Post(id=1))
    rs.flush()
    sub = rs.subscribe(Post)

    with one_batch(rs):
        forge(
            attacker,
            rs.channel,
            {"r": 10**30, "x": True},
            event("u", "posts", {"id": 10**30}),
            event("u", "posts", {"id": 2**40}),
        )
        write(sa.update(Post).values(name="real"), Post(id=2))

    messages = sub.drain()
    assert resyncs(messages) == []
    assert changes(messages) == [("updated", 1), ("inserted", 2)]
    assert rs.stats["fetch_errors"] == 0


# -- authorizers -----------------------------------------------------------------------


def test_a_blocking_authorizer_delays_only_its_own_subscription(rs, write):
    release = threading.Event()

    def blocking(context: Any, change: rowsync.Change, row: Any) -> bool:
        return release.wait()

    stuck = rs.subscribe(Post, authorize=blocking)
    quick = rs.subscribe(Post, authorize=lambda context, change, row: True)
    plain = rs.subscribe(Post)
    try:
        write(Post(id=1))
        write(Post(id=2))
        for sub in (quick, plain):
            assert [sub.get(timeout=10)[1].ids["id"] for _ in range(2)] == [1, 2]
        assert len(stuck) == 0
    finally:
        release.set()
    rs.flush()
    assert changes(stuck.drain()) == [("inserted", 1), ("inserted", 2)]
