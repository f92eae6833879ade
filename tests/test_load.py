"""``rs.load(session, statement)``: load and subscribe in one step. The list then changes
exactly as the statement's result would: rows join and leave by the statement itself, in its
ORDER BY place, and nothing committed around the load is missed."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload

from fixtures import apply_all
from models import Person, Post
from oracle import differences, fresh, snapshot
from rowsync import ConfigurationError

QUERY = (
    sa.select(Person)
    .where(Person.name.like("a%"))
    .order_by(Person.name.desc(), Person.id)
    .options(selectinload(Person.posts))
)


@pytest.fixture
def people(rs, write):
    write(Person(id=1, name="ab"), Person(id=2, name="b"), Post(id=10, name="p", person_id=1))
    rs.flush()


def test_rows_join_and_leave_by_the_statement_in_its_order(rs, sessions, write, people):
    with sessions() as session:
        roots, sub = rs.load(session, QUERY)
    assert [p.id for p in roots] == [1]

    write(Person(id=3, name="az"), Person(id=4, name="x"), Post(id=11, name="q", person_id=3))
    write(sa.update(Person).where(Person.id == 2).values(name="aa"))  # into the WHERE
    write(sa.update(Person).where(Person.id == 1).values(name="zz"))  # out of it
    roots = apply_all(rs, sub, roots)

    assert [p.id for p in roots] == [3, 2]
    assert [p.id for p in roots[0].posts] == [11]  # loaded as the statement loads it
    assert not differences(snapshot(roots), snapshot(fresh(sessions, QUERY)))


def test_an_update_reorders_the_roots_as_the_order_by_does(rs, sessions, write, people):
    write(Person(id=3, name="ac"))
    with sessions() as session:
        roots, sub = rs.load(session, QUERY)
    assert [p.id for p in roots] == [3, 1]

    write(sa.update(Person).where(Person.id == 1).values(name="ad"))
    roots = apply_all(rs, sub, roots)

    assert [p.id for p in roots] == [1, 3]


def test_nothing_committed_while_loading_is_missed(rs, sessions, schema, write, people):
    with Session(schema, expire_on_commit=False) as session:
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        session.execute(sa.select(1))  # the load's snapshot, taken before the write
        write(Post(id=12, name="r", person_id=1), Person(id=5, name="ae"))
        rs.flush()  # dispatched before the subscription exists
        roots, sub = rs.load(session, QUERY)
        assert [p.id for p in roots] == [1]

    roots = apply_all(rs, sub, roots)

    assert [p.id for p in roots] == [5, 1]
    assert not differences(snapshot(roots), snapshot(fresh(sessions, QUERY)))


def test_a_statement_reading_another_table_is_refused_with_the_live_query_named(rs, sessions):
    joined = sa.select(Person).join(Post).where(Post.name == "p")
    with sessions() as session, pytest.raises(ConfigurationError, match="rs.live"):
        rs.load(session, joined)
