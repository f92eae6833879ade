"""``capture="wal"``: changes read from logical decoding reach subscribers and trees.

These tests run on a throwaway server with ``wal_level = logical`` (``logical_dsn``, started
if need be), except the one that checks what happens on a server without it.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    selectinload,
    sessionmaker,
)

import rowsync
from fixtures import apply_all, messages, reference_watchers, writer
from models import Base, Person, Post, PostTag, Tag
from oracle import fresh, snapshot
from rowsync import Resync, Sync, pgoutput, slots, wal
from rowsync.cli import main
from rowsync.testing import one_batch
from rowsync.wal import Decoder, Visibility


@pytest.fixture
def wal_engine(logical_dsn: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sa.make_url(logical_dsn).set(drivername="postgresql+psycopg"))
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def wal_sessions(wal_engine: sa.Engine) -> sessionmaker[Session]:
    return sessionmaker(wal_engine, expire_on_commit=False)


@pytest.fixture
def wal_rs(wal_engine: sa.Engine) -> Iterator[rowsync.RowSync]:
    instance = rowsync.RowSync(wal_engine, reference_watchers(), capture="wal")
    instance.install()
    with instance:
        yield instance


def people_query() -> sa.Select[tuple[Person]]:
    return sa.select(Person).order_by(Person.id).options(selectinload(Person.posts))


def test_inserts_updates_and_deletes_reach_a_synced_tree(wal_rs, wal_sessions):
    write = writer(wal_sessions)
    write(Person(id=1, name="a"), Post(id=10, name="p", person_id=1))
    wal_rs.flush()
    people = fresh(wal_sessions, people_query())
    sub = wal_rs.subscribe(people, assocs=["posts"])

    write(Post(id=20, name="q", person_id=1))
    write(sa.update(Post).where(Post.id == 10).values(name="p2"))
    write(sa.update(Person).where(Person.id == 1).values(name="a2"))
    people = apply_all(wal_rs, sub, people)
    assert [(p.id, p.name) for p in people[0].posts] == [(10, "p2"), (20, "q")]
    assert people[0].name == "a2"

    write(sa.delete(Post).where(Post.id == 10))
    people = apply_all(wal_rs, sub, people)
    assert [p.id for p in people[0].posts] == [20]
    assert snapshot(people) == snapshot(fresh(wal_sessions, people_query()))


def test_a_post_moving_between_people_reaches_both_trees(wal_rs, wal_sessions):
    write = writer(wal_sessions)
    write(Person(id=1, name="a"), Person(id=2, name="b"), Post(id=10, name="p", person_id=1))
    wal_rs.flush()
    first = fresh(wal_sessions, people_query().where(Person.id == 1))
    second = fresh(wal_sessions, people_query().where(Person.id == 2))
    first_sub = wal_rs.subscribe(first, assocs=["posts"])
    second_sub = wal_rs.subscribe(second, assocs=["posts"])

    write(sa.update(Post).where(Post.id == 10).values(person_id=2))
    first = apply_all(wal_rs, first_sub, first)
    second = apply_all(wal_rs, second_sub, second)

    assert first[0].posts == []
    assert [p.id for p in second[0].posts] == [10]


def test_changes_arrive_in_commit_order_with_growing_refs(wal_rs, wal_sessions):
    write = writer(wal_sessions)
    sub = wal_rs.subscribe(Tag)
    write(Tag(id=1, name="x"), Tag(id=2, name="y"))
    write(sa.update(Tag).where(Tag.id == 1).values(name="z"))

    changes = [change for _, change in messages(wal_rs, sub)]

    assert [(c.event, c.ids["id"]) for c in changes] == [
        ("inserted", 1),
        ("inserted", 2),
        ("updated", 1),
    ]
    refs = [c.ref for c in changes]
    assert refs == sorted(set(refs))


def test_a_position_places_changes_by_their_transaction_id(wal_rs, wal_sessions):
    write = writer(wal_sessions)
    write(Tag(id=0, name="seen"))
    wal_rs.flush()
    with wal_sessions() as session:
        session.execute(sa.select(Tag)).all()  # the load: its snapshot saw tag 0
        position = wal_rs.position(session)
    write(Tag(id=1, name="x"))
    wal_rs.flush()

    sub = wal_rs.subscribe(Tag, since=position)

    assert [(c.event, c.ids["id"]) for _, c in messages(wal_rs, sub)] == [("inserted", 1)]


def test_replica_identity_is_full_only_where_old_values_beyond_the_key_are_needed(
    wal_rs, wal_engine
):
    with wal_engine.connect() as conn:
        found = dict(
            conn.execute(
                sa.text(
                    "SELECT relname, relreplident::text FROM pg_class"
                    " WHERE relname IN ('posts', 'tags')"
                )
            ).all()
        )
    assert found == {"posts": "f", "tags": "d"}


def test_withheld_columns_are_left_out_of_the_publication(wal_engine):
    rs = rowsync.RowSync(wal_engine, rowsync.watchers(Tag), capture="wal", exclude={Tag: ["name"]})
    rs.install()
    with wal_engine.connect() as conn:
        published = conn.execute(
            sa.text("SELECT attnames FROM pg_publication_tables WHERE tablename = 'tags'")
        ).scalar_one()
    assert "name" not in published and "id" in published


def test_withholding_columns_of_a_table_that_needs_full_identity_is_refused(wal_engine):
    rs = rowsync.RowSync(
        wal_engine, rowsync.watchers(Post), capture="wal", exclude={Post: ["body"]}
    )
    with pytest.raises(rowsync.ConfigurationError, match="REPLICA IDENTITY FULL"):
        rs.install()


def test_uninstall_drops_the_publication(wal_engine):
    rs = rowsync.RowSync(wal_engine, rowsync.watchers(Tag), capture="wal")
    rs.install()
    rs.uninstall()
    with wal_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM pg_publication")).scalar_one() == 0


def test_start_on_a_server_without_logical_decoding_says_what_to_run(schema):
    with psycopg.connect(schema.url.set(drivername="postgresql").render_as_string(False)) as conn:
        level = conn.execute("SHOW wal_level").fetchone()
    assert level is not None and level[0] != "logical", "the shared server must not be logical"
    rs = rowsync.RowSync(schema, reference_watchers(), capture="wal")
    rs.install()
    with pytest.raises(rowsync.ConfigurationError, match="ALTER SYSTEM SET wal_level = logical"):
        rs.start()
    assert not rs.running


# -- slots: a consumer's persistent one, temporary ones, their lifecycle ----------------------


@pytest.fixture
def consumers(wal_engine: sa.Engine) -> Iterator[Callable[..., rowsync.RowSync]]:
    """RowSyncs on tags with a consumer's persistent slot (``consumer="worker"`` unless
    told), installed. Afterwards stopped and uninstalled, which drops their slots: one left
    behind would keep the shared server's WAL forever."""
    made: list[rowsync.RowSync] = []

    def make(consumer: str | None = "worker", **options: object) -> rowsync.RowSync:
        rs = rowsync.RowSync(
            wal_engine, rowsync.watchers(Tag), capture="wal", consumer=consumer, **options
        )
        rs.install()
        made.append(rs)
        return rs

    yield make
    for rs in made:
        rs.stop()
    if made:
        made[0].uninstall()
        assert channel_slots(made[0]) == []


def channel_slots(rs: rowsync.RowSync) -> list[slots.Slot]:
    with rs.connect(autocommit=True) as conn:
        return slots.of_channel(conn, rs.channel)


def terminate_walsender(rs: rowsync.RowSync) -> None:
    """Kill the backend streaming to ``rs`` (only the replication connection) and wait
    until it is gone: what commits next cannot reach the old connection."""
    (slot,) = [s for s in channel_slots(rs) if s.active_pid is not None]
    assert slot.active_pid is not None
    with rs.connect(autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (slot.active_pid,))
        slots.release(conn, slot.active_pid)


def changes(got: list[object]) -> list[tuple[object, ...]]:
    return [
        (kind, c.event, c.ids["id"]) if kind is Sync else (kind,)
        for kind, c in got  # type: ignore[misc]
    ]


def test_slot_names_are_valid_identifiers_of_at_most_63_bytes_and_distinct():
    long = "Wörker-" + "x" * 80
    names = {
        slots.name("rowsync", "worker"),
        slots.name("rowsync", "Worker"),
        slots.name("other", "worker"),
        slots.name("rowsync", long),
        slots.name("rowsync", long + "y"),
    }
    assert len(names) == 5
    for name in names | {slots.temporary_name("rowsync")}:
        assert re.fullmatch(r"[a-z0-9_]{1,63}", name), name
    assert slots.name("rowsync", "worker") == slots.name("rowsync", "worker")
    assert slots.name("rowsync", "worker").startswith(slots.prefix("rowsync"))


def test_a_killed_walsender_resumes_from_the_consumer_slot_without_resync(consumers, wal_sessions):
    rs = consumers()
    write = writer(wal_sessions)
    with rs:
        sub = rs.subscribe(Tag)
        write(Tag(id=1, name="before"))
        rs.flush()
        terminate_walsender(rs)
        write(Tag(id=2, name="while reconnecting"))
        got = messages(rs, sub)
        assert rs.listener.stats["reconnects"] == 1
    assert changes(got) == [(Sync, "inserted", 1), (Sync, "inserted", 2)]
    assert rs.listener.stats["gaps"] == 0


def test_a_batch_whose_dispatch_broke_is_sent_again(consumers, wal_sessions):
    """The slot's position moves only once a batch was dispatched: a dispatch cut short by a
    lost connection (a row fetch's, here raised on purpose) gets the batch again."""
    rs = consumers()
    write = writer(wal_sessions)
    deliver = rs.listener.on_batch
    broken: list[object] = []

    def dispatch(batch):
        if not broken and any(getattr(item, "table", None) == "tags" for item in batch):
            broken.append(batch)
            raise psycopg.OperationalError("the row fetch lost its connection")
        deliver(batch)

    rs.listener.on_batch = dispatch
    with rs:
        sub = rs.subscribe(Tag)
        write(Tag(id=1, name="a"))
        got = messages(rs, sub)
    assert broken and rs.listener.stats["connection_errors"] == 1
    assert changes(got) == [(Sync, "inserted", 1)]


def test_a_stopped_listener_gets_what_committed_meanwhile_on_start(consumers, wal_sessions):
    rs = consumers()
    write = writer(wal_sessions)
    sub = rs.subscribe(Tag)
    with rs:
        write(Tag(id=1, name="a"))
        rs.flush()
    write(Tag(id=2, name="committed while stopped"))
    with rs:
        rs.flush()
    assert changes(sub.drain()) == [(Sync, "inserted", 1), (Sync, "inserted", 2)]
    assert rs.listener.stats["gaps"] == 0


def test_a_restarted_process_resumes_from_the_slot(consumers, wal_sessions):
    write = writer(wal_sessions)
    first = consumers()
    with first:
        write(Tag(id=1, name="seen by the first process"))
        first.flush()
    write(Tag(id=2, name="committed while no process ran"))
    second = consumers()
    sub = second.subscribe(Tag)
    with second:
        second.flush()
    assert changes(sub.drain()) == [(Sync, "inserted", 2)]
    assert second.listener.stats["gaps"] == 0
    assert [s.name for s in channel_slots(second)] == [slots.name(second.channel, "worker")]


def test_a_server_restart_resumes_from_the_slot(restartable_dsn, restartable_server):
    """The slot and its confirmed position survive ``pg_ctl restart``: what committed
    across it arrives, with no resync."""
    engine = sa.create_engine(
        sa.make_url(restartable_dsn).set(drivername="postgresql+psycopg"), pool_pre_ping=True
    )
    Base.metadata.create_all(engine)
    rs = rowsync.RowSync(engine, rowsync.watchers(Tag), capture="wal", consumer="worker")
    rs.install()
    write = writer(sessionmaker(engine))
    try:
        with rs:
            sub = rs.subscribe(Tag)
            write(Tag(id=1, name="before"))
            rs.flush()
            restartable_server.restart()
            write(Tag(id=2, name="after"))
            got = messages(rs, sub, timeout=60)
        assert changes(got) == [(Sync, "inserted", 1), (Sync, "inserted", 2)]
        assert rs.listener.stats["gaps"] == 0
    finally:
        rs.stop()
        rs.uninstall()
        engine.dispose()


def test_without_a_consumer_a_reconnect_is_announced(consumers):
    rs = consumers(consumer=None)
    with rs:
        sub = rs.subscribe(Tag)
        terminate_walsender(rs)
        got = messages(rs, sub)
    assert changes(got) == [(Resync,)]


def test_a_dropped_slot_is_announced_and_created_again(consumers, wal_sessions):
    rs = consumers()
    write = writer(wal_sessions)
    sub = rs.subscribe(Tag)
    with rs:
        rs.flush()
    with rs.connect(autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slots.name(rs.channel, "worker"),))
    write(Tag(id=1, name="committed while no slot kept the place"))
    with rs:
        write(Tag(id=2, name="after"))
        got = messages(rs, sub)
    assert changes(got) == [(Resync,), (Sync, "inserted", 2)]
    assert "dropped" in got[0][1].reason
    assert [s.name for s in channel_slots(rs)] == [slots.name(rs.channel, "worker")]


def test_a_crashed_process_leaves_no_temporary_slot(consumers, logical_dsn):
    rs = consumers(consumer=None)  # installs the publication
    script = (
        "import sys, rowsync\n"
        "from models import Tag\n"
        "rs = rowsync.RowSync(sys.argv[1], rowsync.watchers(Tag), capture='wal').start()\n"
        "print('started', flush=True)\n"
        "sys.stdin.read()\n"
    )
    tests = Path(__file__).parent
    proc = subprocess.Popen(
        [sys.executable, "-c", script, logical_dsn],
        env={"PYTHONPATH": f"{tests.parent}:{tests}", "PATH": "/usr/bin:/bin"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "started\n"
        (slot,) = channel_slots(rs)
        assert slot.temporary and slot.active_pid is not None
    finally:
        proc.kill()  # SIGKILL: no clean-up of its own
        proc.wait()
    with rs.connect(autocommit=True) as conn:
        slots.release(conn, slot.active_pid, timeout=30)  # the server notices the lost client
    assert channel_slots(rs) == []


def test_a_slot_creation_held_up_by_a_writing_transaction_names_its_backend(
    consumers, wal_sessions
):
    rs = consumers(start_timeout=1.0)
    with wal_sessions() as blocker:
        blocker.add(Tag(id=1, name="uncommitted"))
        blocker.flush()  # the transaction has an xid: logical decoding must wait for its end
        pid = blocker.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with pytest.raises(
            rowsync.NotRunningError, match=rf"slot .* within 1.0 s.* backend {pid} "
        ):
            rs.start()
        blocker.rollback()
    assert channel_slots(rs) == []  # a creation cut short leaves no slot


def test_uninstall_refuses_while_a_listener_streams_then_drops_the_slots(consumers):
    rs = consumers(start_timeout=1.0)
    with rs, pytest.raises(rowsync.ConfigurationError, match="in use.*stop their listeners"):
        rs.uninstall()
    rs.uninstall()
    assert channel_slots(rs) == []
    with pytest.raises(rowsync.NotRunningError, match="publication 'rowsync' does not exist"):
        rs.start()
    assert channel_slots(rs) == []  # no slot is made without the publication


def test_a_second_process_of_the_same_consumer_is_told_the_slot_is_in_use(consumers):
    first = consumers()
    second = consumers(start_timeout=1.0)
    with first:
        (slot,) = channel_slots(first)
        with pytest.raises(rowsync.NotRunningError, match=rf"is active for PID {slot.active_pid}"):
            second.start()


def test_the_cli_uninstall_drops_the_publication_and_the_slots(consumers, logical_dsn, capsys):
    rs = consumers()
    with rs:
        rs.flush()
    cli = ["--app", "cli_app:watchers", "--dsn", logical_dsn, "--capture", "wal", "uninstall"]
    assert main(cli) == 0
    assert 'publication "rowsync" and 1 replication slot dropped' in capsys.readouterr().out
    assert channel_slots(rs) == []


def test_status_lists_the_slots_with_the_wal_they_keep(
    consumers, wal_sessions, logical_dsn, capsys
):
    rs = consumers()
    with rs:
        writer(wal_sessions)(Tag(id=1, name="a"))
        rs.flush()
        status = rs.status()
        assert status.wal_level == "logical" and status.ok
        (slot,) = status.slots
        assert slot.name == slots.name(rs.channel, "worker") and not slot.temporary
        assert slot.retained is not None and slot.retained > 0
        assert slot.lag is not None and slot.lag >= 0

        cli = ["--app", "cli_app:watchers", "--dsn", logical_dsn, "--capture", "wal", "status"]
        assert main(cli) == 0
        out = capsys.readouterr().out
        assert "wal_level  logical" in out and f"{slot.name}  kept, streaming" in out
        assert main([*cli, "--max-retained", "0"]) == 1
        out = capsys.readouterr().out
        assert f"warning: slot {slot.name} keeps" in out


# -- rows from the WAL ----------------------------------------------------------------


class Kind(enum.Enum):
    small = "small"
    large = "large"


class Shouted(sa.TypeDecorator[str]):
    """Stored in capitals, loaded in small letters with a mark: a result processor of its own."""

    impl = sa.String(40)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else value.upper()

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else value.lower() + "!"


class ItemBase(DeclarativeBase):
    pass


class Item(ItemBase):
    """A table with a value of every kind a load converts, and a withheld column."""

    __tablename__ = "wal_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[Kind] = mapped_column(sa.Enum(Kind, name="wal_item_kind"), default=Kind.small)
    title: Mapped[str | None] = mapped_column(Shouted())
    amount: Mapped[decimal.Decimal] = mapped_column(sa.Numeric(10, 2), default=0)
    at: Mapped[datetime.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    data: Mapped[Any] = mapped_column(postgresql.JSONB, nullable=True)
    scores: Mapped[list[int] | None] = mapped_column(postgresql.ARRAY(sa.Integer))
    body: Mapped[str | None] = mapped_column(sa.Text)
    api_token: Mapped[str | None]
    """Withheld: a sensitive name."""


BIG = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(20_000))
"""Kept out of line (the column's storage is EXTERNAL): an update that does not change it
leaves it out of the WAL."""


@pytest.fixture
def items_engine(wal_engine: sa.Engine) -> sa.Engine:
    ItemBase.metadata.create_all(wal_engine)
    with wal_engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE wal_items ALTER body SET STORAGE EXTERNAL"))
    return wal_engine


@pytest.fixture
def items_rs(items_engine: sa.Engine) -> Iterator[rowsync.RowSync]:
    instance = rowsync.RowSync(items_engine, rowsync.watchers(Item), capture="wal")
    instance.install()
    with instance:
        yield instance


def cached(rs: rowsync.RowSync, key: int, ref: int) -> Any:
    return rs.cache.get((Item.__table__, (key,), ref))


def test_inserted_and_updated_rows_are_cached_from_the_wal_as_a_read_loads_them(
    items_rs, wal_sessions
):
    write = writer(wal_sessions)
    sub = items_rs.subscribe(Item)
    at = datetime.datetime(2026, 12, 6, 1, 2, 3, 456789, tzinfo=datetime.UTC)
    write(
        Item(
            id=1,
            kind=Kind.large,
            title="Hello",
            amount=decimal.Decimal("12.50"),
            at=at,
            data={"a": [1, {"b": None}], "c": "é"},
            scores=[3, 1],
            body="short",
            api_token="secret",
        ),
        Item(id=2, title=None, data=None, scores=None),
    )
    write(sa.update(Item).where(Item.id == 2).values(title="bye", kind=Kind.large, scores=[]))

    changes = [change for _, change in messages(items_rs, sub)]

    assert [(c.event, c.ids["id"]) for c in changes] == [
        ("inserted", 1),
        ("inserted", 2),
        ("updated", 2),
    ]
    assert items_rs.stats["wal_fetches"] == 0
    assert items_rs.rows.queries["rows"] == 0  # no row was read
    read = items_rs.rows.fetch(Item.__table__, [(1,), (2,)])
    for change in changes[0], changes[2]:
        key = change.ids["id"]
        row = cached(items_rs, key, change.ref)
        assert row.values == read[(key,)].values
        assert {k: type(v) for k, v in row.values.items()} == {
            k: type(v) for k, v in read[(key,)].values.items()
        }
    assert cached(items_rs, 1, changes[0].ref).values["kind"] is Kind.large
    assert cached(items_rs, 1, changes[0].ref).values["title"] == "hello!"
    assert "api_token" not in cached(items_rs, 1, changes[0].ref).values


def test_changes_from_the_wal_reach_a_synced_tree_with_no_row_read(items_rs, wal_sessions):
    write = writer(wal_sessions)
    write(Item(id=1, title="a"), Item(id=2, title="b"))
    items_rs.flush()
    query = sa.select(Item).order_by(Item.id)
    items = fresh(wal_sessions, query)
    sub = items_rs.subscribe(items)

    write(sa.update(Item).where(Item.id == 2).values(kind=Kind.large, scores=[2]))
    write(sa.update(Item).where(Item.id == 1).values(title="c", data={"x": 1}))
    items = apply_all(items_rs, sub, items)

    expected = fresh(wal_sessions, query)
    columns = ["id", "kind", "title", "amount", "data", "scores", "body"]
    assert [[getattr(i, c) for c in columns] for i in items] == [
        [getattr(i, c) for c in columns] for i in expected
    ]
    assert items_rs.stats["wal_fetches"] == 0
    assert items_rs.rows.queries["rows"] == 0


def test_each_change_of_a_batch_caches_its_row_as_of_its_own_commit(items_rs, wal_sessions):
    write = writer(wal_sessions)
    write(Item(id=1, title="one"))
    items_rs.flush()
    sub = items_rs.subscribe(Item)

    with one_batch(items_rs):
        write(sa.update(Item).where(Item.id == 1).values(title="two"))
        write(sa.update(Item).where(Item.id == 1).values(title="three"))
    changes = [change for _, change in messages(items_rs, sub)]

    assert [cached(items_rs, 1, c.ref).values["title"] for c in changes] == ["two!", "three!"]


def test_an_unchanged_toasted_value_comes_from_the_row_its_change_started_from(
    items_rs, items_engine, wal_sessions
):
    write = writer(wal_sessions)
    write(Item(id=1, body=BIG))
    write(sa.update(Item).where(Item.id == 1).values(amount=2))
    sub = items_rs.subscribe(Item)
    write(sa.update(Item).where(Item.id == 1).values(amount=3))
    (_, change), *_ = messages(items_rs, sub)

    assert cached(items_rs, 1, change.ref).values["body"] == BIG
    assert items_rs.stats["wal_fetches"] == 0

    # A RowSync that did not see the row's earlier changes cannot tell the value: it reads it.
    with rowsync.RowSync(items_engine, rowsync.watchers(Item), capture="wal") as other:
        other_sub = other.subscribe(Item)
        write(sa.update(Item).where(Item.id == 1).values(amount=4))
        (_, change), *_ = messages(other, other_sub)
        assert other.stats["wal_fetches"] == 1
        assert cached(other, 1, change.ref).values["body"] == BIG


def test_an_unchanged_toasted_value_is_read_when_a_change_of_its_table_may_go_unseen(
    items_engine, wal_sessions
):
    write = writer(wal_sessions)
    watched = rowsync.watchers(Item, events=["inserted", "updated"])  # a delete goes unseen
    rs = rowsync.RowSync(items_engine, watched, capture="wal")
    rs.install()
    with rs:
        sub = rs.subscribe(Item)
        write(Item(id=1, body=BIG))
        write(sa.update(Item).where(Item.id == 1).values(amount=2))
        *_, (_, change) = messages(rs, sub)

        assert rs.stats["wal_fetches"] == 1
        assert cached(rs, 1, change.ref).values["body"] == BIG


class CriteriaBase(DeclarativeBase):
    pass


class Shelf(CriteriaBase):
    """Collections of books filtered by criteria on hostile column names, with NULLs."""

    __tablename__ = 'wal "shelf" 100%s'
    id: Mapped[int] = mapped_column(primary_key=True)

    marked: Mapped[list[Book]] = orm.relationship(
        primaryjoin=lambda: sa.and_(Shelf.id == orm.foreign(Book.shelf_id), Book.kind == "x"),
        order_by=lambda: Book.id,
        viewonly=True,
    )
    unmarked: Mapped[list[Book]] = orm.relationship(  # a NULL kind is neither x nor not x
        primaryjoin=lambda: sa.and_(Shelf.id == orm.foreign(Book.shelf_id), Book.kind != "x"),
        order_by=lambda: Book.id,
        viewonly=True,
    )
    either: Mapped[list[Book]] = orm.relationship(  # NULL or true holds, NULL or false does not
        primaryjoin=lambda: sa.and_(
            Shelf.id == orm.foreign(Book.shelf_id), sa.or_(Book.kind == "x", Book.score > 3)
        ),
        order_by=lambda: Book.id,
        viewonly=True,
    )
    red: Mapped[list[Book]] = orm.relationship(
        primaryjoin=lambda: sa.and_(
            Shelf.id == orm.foreign(Book.shelf_id),
            Book.colour == Colour.red,
            Book.meta["a"].as_integer() == 1,
            Book.marks.any_() == 2,
        ),
        order_by=lambda: Book.id,
        viewonly=True,
    )
    noted: Mapped[list[Note]] = orm.relationship(  # a subquery: evaluated in the read
        primaryjoin=lambda: sa.and_(
            Shelf.id == orm.foreign(Note.shelf_id),
            Note.score < sa.select(sa.literal(3)).scalar_subquery(),
        ),
        order_by=lambda: Note.id,
        viewonly=True,
    )


class Colour(enum.Enum):
    red = "red"
    blue = "blue"


class Book(CriteriaBase):
    __tablename__ = 'wal "book"; 50%s'
    id: Mapped[int] = mapped_column(primary_key=True)
    shelf_id: Mapped[int | None] = mapped_column("shelf:%(id)s", sa.ForeignKey(Shelf.id))
    kind: Mapped[str | None] = mapped_column('kind "of"')
    score: Mapped[int | None] = mapped_column("score's")
    colour: Mapped[Colour | None] = mapped_column(sa.Enum(Colour, name="wal colour"))
    meta: Mapped[Any] = mapped_column(postgresql.JSONB(none_as_null=True), nullable=True)
    marks: Mapped[list[int] | None] = mapped_column(postgresql.ARRAY(sa.Integer))


class Note(CriteriaBase):
    __tablename__ = "wal_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    shelf_id: Mapped[int | None] = mapped_column(sa.ForeignKey(Shelf.id))
    score: Mapped[int | None]


SHELVES = ["marked", "unmarked", "either", "red", "noted"]


def shelves_query() -> sa.Select[tuple[Shelf]]:
    loads = [selectinload(getattr(Shelf, key)) for key in SHELVES]
    return sa.select(Shelf).order_by(Shelf.id).options(*loads)


@pytest.fixture
def shelves_rs(wal_engine: sa.Engine) -> Iterator[rowsync.RowSync]:
    CriteriaBase.metadata.create_all(wal_engine)
    instance = rowsync.RowSync(
        wal_engine,
        [*rowsync.watchers(Shelf), *rowsync.watchers(Book), *rowsync.watchers(Note)],
        capture="wal",
    )
    instance.install()
    with instance:
        yield instance


def test_criteria_are_evaluated_on_the_rows_the_wal_carried_with_no_row_read(
    shelves_rs, wal_sessions
):
    write = writer(wal_sessions)
    write(Shelf(id=1), Shelf(id=2), Book(id=1, shelf_id=1, kind="x"), Book(id=2, shelf_id=1))
    shelves_rs.flush()
    shelves = fresh(wal_sessions, shelves_query())
    sub = shelves_rs.subscribe(shelves, assocs=SHELVES)
    queries = shelves_rs.rows.queries
    read_before, judged_before = queries["rows"], queries["criteria"]

    red = {"colour": Colour.red, "meta": {"a": 1}, "marks": [1, 2]}
    with one_batch(shelves_rs):  # criteria evaluated for the whole batch at once
        write(
            Book(id=3, shelf_id=1, kind="y", score=None),  # kind != x; score > 3 is NULL
            Book(id=4, shelf_id=2, kind=None, score=5),  # NULL kind: only "either"
            Book(id=5, shelf_id=2, kind="x", **red),
            Book(id=6, shelf_id=1, colour=Colour.red, meta={"a": 2}, marks=[2]),
        )
        write(sa.update(Book).where(Book.id == 1).values(kind=None))  # leaves marked
        write(sa.update(Book).where(Book.id == 2).values(kind="x", shelf_id=2))
    shelves_rs.flush()
    assert queries["criteria"] == judged_before + 1  # one for the batch's six changes
    write(sa.update(Book).where(Book.id == 6).values(meta={"a": 1}))  # enters red
    write(sa.update(Book).where(Book.id == 5).values(marks=None))  # ANY of NULL: leaves red
    write(sa.update(Book).where(Book.id == 3).values(score=4))  # enters either
    shelves = apply_all(shelves_rs, sub, shelves)

    expected = fresh(wal_sessions, shelves_query())
    assert snapshot(shelves) == snapshot(expected)
    assert [b.id for b in expected[0].either] == [3]
    assert [b.id for b in expected[0].red] == [6]
    assert [b.id for b in expected[1].marked] == [2, 5]
    assert shelves_rs.stats["wal_fetches"] == 0
    assert queries["rows"] == read_before  # no row read


def test_criteria_on_a_json_null_or_a_subquery_are_read(shelves_rs, wal_sessions):
    # A JSON null and NULL are one to json_populate_record, and a subquery reads other rows
    # (here none, but in general): the rows are read.
    write = writer(wal_sessions)
    write(Shelf(id=1))
    shelves_rs.flush()
    shelves = fresh(wal_sessions, shelves_query())
    sub = shelves_rs.subscribe(shelves, assocs=SHELVES)

    write(Book(id=1, shelf_id=1, kind="x", meta=sa.JSON.NULL))
    write(Note(id=1, shelf_id=1, score=2), Note(id=2, shelf_id=1, score=3))
    shelves = apply_all(shelves_rs, sub, shelves)

    assert [n.id for n in shelves[0].noted] == [1]
    assert shelves_rs.stats["wal_fetches"] == 3
    assert snapshot(shelves) == snapshot(fresh(wal_sessions, shelves_query()))


class TicketBase(DeclarativeBase):
    pass


class Ticket(TicketBase):
    """Identified beyond its key by an enum and a type of its own (REPLICA IDENTITY FULL)."""

    __tablename__ = "wal_tickets"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[Kind] = mapped_column(sa.Enum(Kind, name="wal_ticket_kind"))
    code: Mapped[str | None] = mapped_column(Shouted())


def test_identifying_values_route_as_a_read_loads_them(wal_engine, wal_sessions):
    # Values before an update and a delete's values come from the WAL alone: they must be
    # the Python values a read gives (an enum member, the custom type's result), or a
    # filter on them misses the change.
    TicketBase.metadata.create_all(wal_engine)
    watched = rowsync.watchers(Ticket, extra_columns=["kind", "code"])
    rs = rowsync.RowSync(wal_engine, watched, capture="wal")
    rs.install()
    write = writer(wal_sessions)
    with rs:
        write(Ticket(id=1, kind=Kind.large, code="a"), Ticket(id=2, kind=Kind.large, code="b"))
        rs.flush()
        updated = rs.subscribe(Ticket, "updated", kind=Kind.large)
        deleted = rs.subscribe(Ticket, "deleted", kind=Kind.large, code="b!")

        write(sa.update(Ticket).where(Ticket.id == 1).values(kind=Kind.small))  # leaves large
        write(sa.delete(Ticket).where(Ticket.id == 2))

        assert [(c.event, c.ids["id"]) for _, c in messages(rs, updated)] == [("updated", 1)]
        assert [(c.event, c.ids) for _, c in messages(rs, deleted)] == [
            ("deleted", {"id": 2, "kind": Kind.large, "code": "b!"})
        ]


def test_the_whole_old_row_fills_what_the_new_one_left_out():
    decoder = Decoder(rowsync.watchers(Tag), "ch")
    columns = (pgoutput.Column("id", 23, True), pgoutput.Column("name", 25, False))
    decoder.feed(pgoutput.Relation(7, "public", "tags", "f", columns))
    decoder.feed(pgoutput.Begin(100, 0, 1))
    unchanged = pgoutput.UNCHANGED
    decoder.feed(pgoutput.Update(7, (b"1", b"long"), False, (b"1", unchanged)))
    decoder.feed(pgoutput.Update(7, (b"1", None), True, (b"2", unchanged)))
    full, key_only = decoder.feed(pgoutput.Commit(100, 120, 0))

    assert full.row.layout.names == ("id", "name") and full.row.layout.oids == (23, 25)
    assert full.row.values == (b"1", b"long")
    assert not full.row.unchanged and full.row.followed
    assert key_only.row.values == (b"2", unchanged)
    assert key_only.row.unchanged == {"name"}


def test_values_before_an_update_are_told_only_when_they_differ():
    decoder = Decoder(rowsync.watchers(Post), "ch")
    names = ("id", "name", "body", "person_id", "other_id")
    columns = tuple(pgoutput.Column(n, 25 if n in ("name", "body") else 23, True) for n in names)
    decoder.feed(pgoutput.Relation(9, "public", "posts", "f", columns))
    decoder.feed(pgoutput.Begin(100, 0, 1))
    renamed = (b"1", b"b", None, b"5", None)
    decoder.feed(pgoutput.Update(9, (b"1", b"a", None, b"5", None), False, renamed))
    decoder.feed(pgoutput.Update(9, renamed, False, (b"1", b"b", None, b"6", None)))
    rename, move = decoder.feed(pgoutput.Commit(100, 120, 0))

    assert rename.new == {"id": 1, "person_id": 5, "other_id": None} and rename.old is None
    assert move.new == {"id": 1, "person_id": 6, "other_id": None}
    assert move.old == {"id": 1, "person_id": 5, "other_id": None}


def test_an_identifying_column_the_stream_does_not_send_is_left_out():
    decoder = Decoder(rowsync.watchers(Post), "ch")
    columns = (pgoutput.Column("id", 23, True), pgoutput.Column("person_id", 23, True))
    decoder.feed(pgoutput.Relation(9, "public", "posts", "f", columns))
    decoder.feed(pgoutput.Begin(100, 0, 1))
    decoder.feed(pgoutput.Insert(9, (b"1", None)))
    (insert,) = decoder.feed(pgoutput.Commit(100, 120, 0))

    assert insert.new == {"id": 1, "person_id": None}
    assert insert.row.layout.names == ("id", "person_id") and insert.row.values == (b"1", None)


def test_visibility_queries_only_for_transactions_no_snapshot_saw_ended(logical_dsn, monkeypatch):
    xid = "SELECT pg_current_xact_id()::text::bigint"
    with (
        psycopg.connect(logical_dsn, autocommit=True) as conn,
        psycopg.connect(logical_dsn, autocommit=True) as other,
        psycopg.connect(logical_dsn) as open_,
    ):
        committed = other.execute(xid).fetchone()[0]
        running = open_.execute(xid).fetchone()[0]  # its transaction stays open
        stats: Counter[str] = Counter()
        visible = Visibility(conn, stats)

        assert visible.wait([committed]) and stats["visibility_queries"] == 1
        # the open transaction was running at the snapshot: the horizon stays at or below it
        assert 0 < visible.horizon <= running
        assert visible.wait([visible.horizon - 1]) and stats["visibility_queries"] == 1

        monkeypatch.setattr(wal, "VISIBLE_TIMEOUT", 0.05)
        assert not visible.wait([running])  # asked (and asked again), never assumed
        assert stats["visibility_queries"] > 2


def test_transactions_the_last_snapshot_saw_need_no_visibility_query(logical_dsn):
    xid = "SELECT pg_current_xact_id()::text::bigint"
    with (
        psycopg.connect(logical_dsn, autocommit=True) as conn,
        psycopg.connect(logical_dsn, autocommit=True) as other,
        psycopg.connect(logical_dsn) as open_,
    ):
        running = open_.execute(xid).fetchone()[0]  # holds the snapshots' xmin at it
        committed = other.execute(xid).fetchone()[0]
        stats: Counter[str] = Counter()
        visible = Visibility(conn, stats)

        assert visible.wait([committed]) and stats["visibility_queries"] == 1
        assert visible.horizon <= running < committed  # not known by the horizon
        assert visible.wait([committed]) and stats["visibility_queries"] == 1
        later = other.execute(xid).fetchone()[0]  # committed after the snapshot: asked
        assert visible.wait([later]) and stats["visibility_queries"] == 2


def test_transaction_ids_are_widened_across_the_epoch_boundary():
    epoch = 1 << 32
    decoder = Decoder(rowsync.watchers(Tag), "ch", near=epoch - 10)
    decoder.feed(pgoutput.Relation(7, "public", "tags", "d", (pgoutput.Column("id", 23, True),)))
    xids = []
    for xid in epoch - 3, 2, epoch - 1:
        decoder.feed(pgoutput.Begin(100, 0, xid))
        decoder.feed(pgoutput.Insert(7, (b"1",)))
        (notice,) = decoder.feed(pgoutput.Commit(100, 120, 0))
        xids.append(notice.xid)

    assert xids == [epoch - 3, epoch + 2, epoch - 1]


# -- what triggers cannot see ------------------------------------------------------------


def test_announced_rows_reach_a_tree_through_the_wal(wal_engine, wal_sessions):
    write = writer(wal_sessions)
    write(Person(id=1, name="a"), Post(id=10, name="p", person_id=1), Post(id=20, name="q"))
    rs = rowsync.RowSync(wal_engine, reference_watchers(), capture="wal")
    rs.install()
    people = fresh(wal_sessions, people_query())
    write(sa.update(Post).where(Post.id == 10).values(name="unseen"))  # no slot yet
    write(sa.update(Post).where(Post.id == 20).values(person_id=1))
    with rs:
        sub = rs.subscribe(people, assocs=["posts"])
        assert messages(rs, sub) == []

        counts = rs.announce(["posts"], batch=1)
        people = apply_all(rs, sub, people)

    assert counts == {"public.posts": 2}
    assert [(p.id, p.name) for p in people[0].posts] == [(10, "unseen"), (20, "q")]


def test_a_truncate_of_a_watched_table_is_a_resync_naming_it(wal_rs, wal_sessions):
    write = writer(wal_sessions)
    write(Tag(id=1, name="x"))
    wal_rs.flush()
    sub = wal_rs.subscribe(Tag)

    write(sa.text("TRUNCATE tags CASCADE"))
    found = messages(wal_rs, sub)

    assert [kind for kind, _ in found] == [rowsync.Resync]
    assert "TRUNCATE of public.tags" in found[0][1].reason
    assert wal_rs.listener.stats["truncates"] == 1


def test_a_truncate_resyncs_only_the_subscriptions_its_tables_concern(wal_rs, wal_sessions):
    write = writer(wal_sessions)
    write(Person(id=1, name="a"), Post(id=10, name="p", person_id=1), Tag(id=1, name="x"))
    wal_rs.flush()
    people = wal_rs.subscribe(fresh(wal_sessions, people_query()), assocs=["posts"])
    tags = wal_rs.subscribe(Tag)
    inserted_tags = wal_rs.subscribe(Tag, "inserted")  # a truncate inserts nothing

    write(sa.text("TRUNCATE tags CASCADE"))  # post_tags too: nothing people follow
    assert messages(wal_rs, people) == []
    assert messages(wal_rs, inserted_tags) == []
    ((kind, info),) = messages(wal_rs, tags)
    assert kind is rowsync.Resync and "TRUNCATE of public.tags, public.post_tags" in info.reason

    write(sa.text("TRUNCATE posts CASCADE"))  # below the people's root
    ((kind, info),) = messages(wal_rs, people)
    assert kind is rowsync.Resync and "TRUNCATE of public.posts" in info.reason
    assert messages(wal_rs, tags) == []


def test_a_truncate_of_an_association_table_resyncs_the_parents_subscriptions(wal_rs, wal_sessions):
    write = writer(wal_sessions)
    write(Person(id=1, name="a"), Post(id=10, name="p", person_id=1), Tag(id=1, name="x"))
    write(PostTag(post_id=10, tag_id=1))
    wal_rs.flush()
    query = sa.select(Post).options(selectinload(Post.tags))
    posts = wal_rs.subscribe(fresh(wal_sessions, query), assocs=["tags"])
    people = wal_rs.subscribe(Person)

    write(sa.text("TRUNCATE post_tags"))

    ((kind, info),) = messages(wal_rs, posts)
    assert kind is rowsync.Resync and "TRUNCATE of public.post_tags" in info.reason
    assert messages(wal_rs, people) == []


class ZooBase(DeclarativeBase):
    pass


class Zoo(ZooBase):
    __tablename__ = "wal_zoos"
    id: Mapped[int] = mapped_column(primary_key=True)
    animals: Mapped[list[Animal]] = orm.relationship(order_by=lambda: Animal.id)


class Animal(ZooBase):
    __tablename__ = "wal_animals"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str]
    zoo_id: Mapped[int | None] = mapped_column(sa.ForeignKey(Zoo.id))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "animal"}


class Cat(Animal):
    __tablename__ = "wal_cats"
    id: Mapped[int] = mapped_column(sa.ForeignKey(Animal.id), primary_key=True)
    lives: Mapped[int | None]
    __mapper_args__ = {"polymorphic_identity": "cat", "polymorphic_load": "inline"}


class Keeper(ZooBase):
    __tablename__ = "wal_keepers"
    id: Mapped[int] = mapped_column(primary_key=True)


def test_a_truncate_of_a_subclass_table_resyncs_the_trees_holding_its_rows(
    wal_engine, wal_sessions
):
    ZooBase.metadata.create_all(wal_engine)
    write = writer(wal_sessions)
    write(Zoo(id=1), Cat(id=1, zoo_id=1, lives=9), Keeper(id=1))
    rs = rowsync.RowSync(
        wal_engine,
        [*rowsync.watchers(Zoo, ["animals"]), *rowsync.watchers(Keeper)],
        capture="wal",
    )
    rs.install()
    with rs:
        query = sa.select(Zoo).options(selectinload(Zoo.animals))
        zoos = rs.subscribe(fresh(wal_sessions, query), assocs=["animals"])
        animals = rs.subscribe(Animal)  # the base class: its cats lose their part
        keepers = rs.subscribe(Keeper)

        write(sa.text("TRUNCATE wal_cats"))

        for sub in zoos, animals:
            ((kind, info),) = messages(rs, sub)
            assert kind is rowsync.Resync and "TRUNCATE of public.wal_cats" in info.reason
        assert messages(rs, keepers) == []


def test_writes_under_the_replica_role_and_copy_reach_a_synced_tree(
    wal_rs, wal_sessions, wal_engine
):
    # In the trigger modes, rowsync's triggers (ordinary ones) do not fire for a session
    # whose session_replication_role is replica, as a replication apply or some bulk loads
    # run: their changes never reach a subscriber. COPY fires row triggers, but the WAL is
    # the path of every write, whatever the session.
    write = writer(wal_sessions)
    write(Person(id=1, name="a"))
    wal_rs.flush()
    people = fresh(wal_sessions, people_query())
    sub = wal_rs.subscribe(people, assocs=["posts"])

    write(
        sa.text("SET LOCAL session_replication_role = replica"),
        sa.text("INSERT INTO posts (id, name, person_id) VALUES (10, 'replica', 1)"),
        sa.text("UPDATE persons SET name = 'b' WHERE id = 1"),
    )
    raw = wal_engine.raw_connection()
    try:
        with (
            raw.driver_connection.cursor() as cursor,
            cursor.copy("COPY posts (id, name, person_id) FROM STDIN") as copy,
        ):
            copy.write_row((20, "copied", 1))
            copy.write_row((30, "copied too", 1))
        raw.commit()
    finally:
        raw.close()
    people = apply_all(wal_rs, sub, people)

    assert people[0].name == "b"
    assert [(p.id, p.name) for p in people[0].posts] == [
        (10, "replica"),
        (20, "copied"),
        (30, "copied too"),
    ]
    assert snapshot(people) == snapshot(fresh(wal_sessions, people_query()))
