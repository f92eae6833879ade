"""``capture="wal"``: changes read from logical decoding reach subscribers and trees.

These tests run on a throwaway server with ``wal_level = logical`` (``logical_dsn``, started
if need be), except the one that checks what happens on a server without it.
"""

from __future__ import annotations

import datetime
import decimal
import enum
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
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
from models import Base, Person, Post, Tag
from oracle import fresh, snapshot
from rowsync import pgoutput
from rowsync.testing import one_batch
from rowsync.wal import Decoder


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


def test_rows_of_a_table_with_relationship_criteria_are_read(wal_rs, wal_sessions):
    # Person.test_posts: which posts meet ``name = 'test'`` the database tells, in the read.
    write = writer(wal_sessions)
    write(Person(id=1, name="a"), Post(id=10, name="test", person_id=1))
    wal_rs.flush()

    assert wal_rs.stats["wal_fetches"] == 1
    assert wal_rs.rows.queries["rows"] == 1  # the post's; the person's was built


def test_the_whole_old_row_fills_what_the_new_one_left_out():
    decoder = Decoder(rowsync.watchers(Tag), "ch")
    columns = (pgoutput.Column("id", 23, True), pgoutput.Column("name", 25, False))
    decoder.feed(pgoutput.Relation(7, "public", "tags", "f", columns))
    decoder.feed(pgoutput.Begin(100, 0, 1))
    unchanged = pgoutput.UNCHANGED
    decoder.feed(pgoutput.Update(7, (b"1", b"long"), False, (b"1", unchanged)))
    decoder.feed(pgoutput.Update(7, (b"1", None), True, (b"2", unchanged)))
    full, key_only = decoder.feed(pgoutput.Commit(100, 120, 0))

    assert full.row.texts == {"id": (23, b"1"), "name": (25, b"long")}
    assert not full.row.unchanged and full.row.followed
    assert key_only.row.texts == {"id": (23, b"2")}
    assert key_only.row.unchanged == {"name"}


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
