"""``capture="wal"``: changes read from logical decoding reach subscribers and trees.

These tests run on a throwaway server with ``wal_level = logical`` (``logical_dsn``, started
if need be), except the one that checks what happens on a server without it.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload, sessionmaker

import rowsync
from fixtures import apply_all, messages, reference_watchers, writer
from models import Base, Person, Post, Tag
from oracle import fresh, snapshot


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
