"""``relationship(order_by=...)`` and a live query's ORDER BY keep Postgres' order: direction,
NULLS FIRST / LAST (and their defaults), ties, and terms Python cannot order (a collation,
an expression), which Postgres orders instead."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

import rowsync
from fixtures import apply_all
from oracle import differences, fresh, snapshot, tied_runs
from rowsync import ordering, tree


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[int] = mapped_column(primary_key=True)
    desc_nulls_last: Mapped[list[Player]] = relationship(
        order_by=lambda: (Player.score.desc().nulls_last(), Player.id), viewonly=True
    )
    asc_nulls_first: Mapped[list[Player]] = relationship(
        order_by=lambda: (Player.score.asc().nulls_first(), Player.id), viewonly=True
    )
    desc_default: Mapped[list[Player]] = relationship(
        order_by=lambda: (Player.score.desc(), Player.id.desc()), viewonly=True
    )
    tied: Mapped[list[Player]] = relationship(order_by=lambda: Player.score, viewonly=True)
    by_key: Mapped[list[Player]] = relationship(order_by=lambda: Player.id.desc(), viewonly=True)
    by_title: Mapped[list[Player]] = relationship(
        order_by=lambda: (Player.title, Player.id), viewonly=True
    )
    by_expression: Mapped[list[Player]] = relationship(
        order_by=lambda: (sa.func.coalesce(Player.score, 0), Player.id), viewonly=True
    )


class Player(Base):
    __tablename__ = "players"
    id: Mapped[int] = mapped_column(primary_key=True)
    team_id: Mapped[int | None] = mapped_column(sa.ForeignKey("teams.id"))
    score: Mapped[int | None]
    title: Mapped[str | None] = mapped_column(sa.String(collation="und-x-icu"))


KEYS = [
    "desc_nulls_last",
    "asc_nulls_first",
    "desc_default",
    "tied",
    "by_key",
    "by_title",
    "by_expression",
]
TEAMS = (
    sa.select(Team).order_by(Team.id).options(*(selectinload(getattr(Team, key)) for key in KEYS))
)


@pytest.fixture
def league(engine: sa.Engine, write_to: Any) -> Iterator[tuple[rowsync.RowSync, Any]]:
    Base.metadata.create_all(engine)
    rs = rowsync.RowSync(engine, rowsync.watchers(Team, KEYS) + rowsync.watchers(Player))
    rs.install()
    write = write_to(engine)
    write(
        Team(id=1),
        Team(id=2),
        Player(id=1, team_id=1, score=10, title="b"),
        Player(id=2, team_id=1, score=None, title="A"),
        Player(id=3, team_id=1, score=10, title="a"),
        Player(id=4, team_id=1, score=5, title="B"),
        Player(id=5, team_id=2, score=7, title=None),
    )
    with rs:
        yield rs, write


def assert_fresh(teams: list[Any], sessions: Any) -> None:
    expected = fresh(sessions, TEAMS)
    assert snapshot(teams) == snapshot(expected), differences(snapshot(teams), snapshot(expected))
    for team, other in zip(teams, expected, strict=True):
        for key in KEYS:
            if key != "tied":  # every other ordering breaks ties by id: exactly one order
                assert [p.id for p in getattr(team, key)] == [p.id for p in getattr(other, key)]


def commits() -> list[Any]:
    """Inserts, updates and moves that change positions, through NULLs and ties."""
    return [
        Player(id=6, team_id=1, score=7, title="c"),
        Player(id=7, team_id=1, score=None, title="C"),
        sa.update(Player).where(Player.id == 1).values(score=None, title="D"),
        sa.update(Player).where(Player.id == 2).values(score=20, title="a"),
        sa.update(Player).where(Player.id == 4).values(score=10),
        sa.update(Player).where(Player.id == 5).values(team_id=1, score=None, title="e"),
        sa.update(Player).where(Player.id == 3).values(team_id=2),
        Player(id=8, team_id=2, score=10, title="A"),
        sa.delete(Player).where(Player.id == 6),
        sa.update(Player).where(Player.id == 7).values(score=-1),
    ]


def test_order_by_with_direction_and_nulls_is_kept_after_each_commit(league):
    rs, write = league
    teams = fresh(write.sessions, TEAMS)
    sub = rs.subscribe(teams, assocs=KEYS)
    assert [p.id for p in teams[0].desc_nulls_last] == [1, 3, 4, 2]
    assert [p.id for p in teams[0].asc_nulls_first] == [2, 4, 1, 3]
    for step in commits():
        write(step)
        teams = apply_all(rs, sub, teams)
        assert_fresh(teams, write.sessions)
    assert [p.id for p in teams[0].desc_nulls_last] == [2, 4, 7, 1, 5]


def test_order_by_desc_nulls_last_is_kept_after_updates_in_one_batch(league):
    rs, write = league
    teams = fresh(write.sessions, TEAMS)
    sub = rs.subscribe(teams, assocs=KEYS)
    for step in commits():
        write(step)
    teams = apply_all(rs, sub, teams)
    assert_fresh(teams, write.sessions)


def test_a_collection_ordered_by_its_key_keeps_its_members_in_place_through_updates(league):
    """Only a key ordering tells that an update never moves a held member (a new key is
    another row): the other orderings are checked against the member's neighbours."""
    rs, write = league
    graph = rs.graph
    assert graph.edge(sa.inspect(Team), "by_key").order_is_key
    assert not graph.edge(sa.inspect(Team), "desc_default").order_is_key
    assert not graph.edge(sa.inspect(Team), "tied").order_is_key
    teams = fresh(write.sessions, TEAMS)
    sub = rs.subscribe(teams, assocs=KEYS)
    for step in commits():
        write(step)
        teams = apply_all(rs, sub, teams)
        assert_fresh(teams, write.sessions)
    assert [p.id for p in teams[0].by_key] == [7, 5, 4, 2, 1]


def test_a_term_python_cannot_order_lets_postgres_order_the_relationship(league):
    """``title`` is collated ``und-x-icu`` ("a" < "B"; Python says "B" < "a") and the other
    term is an expression: those relationships are re-queried, not sorted in Python."""
    rs, write = league
    graph = rs.graph
    assert graph.edge(sa.inspect(Team), "by_title").recompute
    assert graph.edge(sa.inspect(Team), "by_expression").recompute
    assert not graph.edge(sa.inspect(Team), "desc_nulls_last").recompute
    teams = fresh(write.sessions, TEAMS)
    sub = rs.subscribe(teams, assocs=KEYS)
    write(Player(id=9, team_id=1, score=3, title="aa"))
    teams = apply_all(rs, sub, teams)
    titles = [p.title for p in teams[0].by_title]
    assert titles != sorted(titles)  # not Python's order
    assert_fresh(teams, write.sessions)


# -- live queries --------------------------------------------------------------------------


def assert_live_fresh(live: rowsync.LiveQuery, sessions: Any, statement: Any) -> None:
    """``live.value`` is the statement's result in its order; ties (equal ORDER BY values)
    in any order, as Postgres leaves them."""
    expected = fresh(sessions, statement)
    terms = [t.expr for t in ordering.terms(statement._order_by_clauses)]
    with sessions() as session:
        values = dict(
            (tuple(row[:1]), tuple(row[1:]))
            for row in session.execute(statement.with_only_columns(Player.id, *terms))
        )
    with live.read() as roots:
        got = tied_runs(
            [values[tree.primary_key(o)] for o in roots], [tree.primary_key(o) for o in roots]
        )
        want = tied_runs(
            [values[tree.primary_key(o)] for o in expected],
            [tree.primary_key(o) for o in expected],
        )
        assert got == want
        assert snapshot(roots) == snapshot(expected)


@pytest.mark.parametrize(
    "order",
    [
        (Player.score.desc().nulls_last(), Player.id),
        (Player.score.asc().nulls_first(), Player.id),
        (Player.score.desc(),),
        (Player.title, Player.id),
        (sa.func.coalesce(Player.score, 0).desc(), Player.id),
        (sa.func.upper(Player.title), Player.id),
    ],
    ids=["desc-nulls-last", "asc-nulls-first", "desc-ties", "collated", "expression", "untyped"],
)
def test_a_live_query_keeps_its_order_by_with_nulls_and_ties(league, order):
    rs, write = league
    statement = sa.select(Player).where(Player.team_id == 1).order_by(*order)
    with rs.live(write.sessions, statement) as live:
        for step in commits():
            write(step)
            live.flush()
            assert_live_fresh(live, write.sessions, statement)


def test_nan_sorts_after_every_number_and_ties_with_nan_as_in_postgres():
    asc = ordering.terms([Player.score])
    nan = float("nan")
    assert sorted([(nan,), (None,), (1.0,), (nan,), (-2.0,)], key=ordering.sort_key(asc))[:2] == [
        (-2.0,),
        (1.0,),
    ]
    assert ordering.compare(asc, (nan,), (nan,)) == 0
    assert ordering.compare(asc, (nan,), (None,)) == -1
    assert ordering.compare(ordering.terms([Player.score.desc()]), (nan,), (1.0,)) == -1
