"""``rs.announce`` / ``rowsync resync``: rows written where no trigger saw them (a restore, a
load with triggers disabled) reach every subscriber once announced, in every mode whose capture
is a trigger (``capture="wal"`` reads the WAL, where an announcement would not be)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, selectinload, sessionmaker

import rowsync
from fixtures import TRIGGERED, apply_all, messages
from models import Person, Post
from oracle import differences, snapshot
from rowsync import Change, RowSync
from rowsync.errors import ConfigurationError

PEOPLE = sa.select(Person).options(selectinload(Person.posts)).order_by(Person.id)


def unseen(engine: sa.Engine, *statements: sa.Executable) -> None:
    """Write as a restore or a bulk load does: with the session's triggers off."""
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        for statement in statements:
            conn.execute(statement)


@pytest.mark.parametrize("capture", TRIGGERED)  # capture="wal" refuses announce()
def test_rows_written_unseen_reach_a_tree_once_announced(moded, sessions):
    rs = moded
    with sessions() as session, session.begin():
        session.add_all(
            [Person(id=1, name="ann"), Person(id=2, name="bob")]
            + [Post(id=i, name=f"p{i}", person_id=1) for i in range(1, 6)]
        )
    rs.flush()  # their own events are behind us
    with sessions() as session:
        people = list(session.scalars(PEOPLE))
    with rs.subscribe(people, assocs=["posts"]) as sub:
        unseen(
            rs.engine,
            sa.update(Post).where(Post.id <= 2).values(name="restored"),
            sa.update(Post).where(Post.id == 3).values(person_id=2),
            sa.insert(Post).values(id=9, name="loaded", person_id=2),
        )
        assert messages(rs, sub) == [], "the writes above must be invisible to rowsync"

        counts = rs.announce(["posts"], batch=2)

        assert counts == {"public.posts": 6}
        people = apply_all(rs, sub, people)
        with sessions() as fresh:
            expected = snapshot(list(fresh.scalars(PEOPLE)))
        assert not differences(snapshot(people), expected)
        assert [p.name for p in people[1].posts] == ["p3", "loaded"]


def test_every_row_is_announced_once_across_batches_with_its_progress(rs, sessions):
    with sessions() as session, session.begin():
        session.add_all([Person(id=i, name=f"n{i}") for i in range(1, 8)])
    rs.flush()
    seen: list[tuple[str, int, int]] = []
    with rs.subscribe(Person) as sub:
        counts = rs.announce(["public.persons"], batch=3, progress=lambda *args: seen.append(args))
        got = messages(rs, sub)
    assert counts == {"public.persons": 7}
    changes = [change for _, change in got]
    assert [c.event for c in changes] == ["updated"] * 7
    assert sorted(c.ids["id"] for c in changes) == list(range(1, 8))
    assert seen == [
        ("public.persons", 0, 7),
        ("public.persons", 3, 7),
        ("public.persons", 6, 7),
        ("public.persons", 7, 7),
    ]


def test_announcing_an_unwatched_table_is_a_clear_error(rs):
    with pytest.raises(ConfigurationError, match="not watched for updates or inserts: nope"):
        rs.announce(["nope"])


class HostileBase(DeclarativeBase):
    pass


class Composite(HostileBase):
    """A two-column key whose text part sorts by collation, in a table named to break SQL."""

    __tablename__ = 'x; drop table "y'
    part: Mapped[str] = mapped_column('a"b', primary_key=True)
    number: Mapped[int] = mapped_column("№", primary_key=True)
    value: Mapped[str | None]


@pytest.mark.parametrize("mode", TRIGGERED)
def test_a_composite_hostile_key_pages_through_every_row_even_oversized_ones(engine, mode):
    """Keyset paging on a two-column key; a key too long for a NOTIFY payload is parked
    (NOTIFY mode) or logged like any other event."""
    HostileBase.metadata.create_all(engine)
    long_key = "k" * 9000
    keys = [("a", 1), ("a", 2), ("b", 1), ("é", 1), (long_key, 7)]
    with sessionmaker(engine).begin() as session:
        session.add_all([Composite(part=p, number=n) for p, n in keys])
    instance = RowSync(engine, rowsync.watchers(Composite), capture=mode)
    instance.install()
    with instance, instance.subscribe(Composite) as sub:
        counts = instance.announce(batch=2)
        got: list[Any] = messages(instance, sub)
    assert counts == {'public.x; drop table "y': 5}
    changes: list[Change] = [change for _, change in got]
    assert sorted((c.ids['a"b'], c.ids["№"]) for c in changes) == sorted(keys)
    assert all(c.event == "updated" for c in changes)
