"""Tables and columns whose names need quoting, are keywords, unicode or as long as Postgres
allows: triggers install under exact, bounded names and events carry the right ids (SCENARIO 3)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

import rowsync
from fixtures import db_triggers, writer
from rowsync import Change, RowSync, Sync
from rowsync.triggers import MAX_IDENTIFIER

LONG_63 = "t63_" + "x" * 59
SHARED_40 = "forty_bytes_of_shared_prefix_before_cut_"  # differs only after byte 40
LONG_A = SHARED_40 + "alpha_suffix_table"
LONG_B = SHARED_40 + "beta_suffix_tablename"
OFFLINE = "postgresql://rowsync@127.0.0.1:1/never_connected"


class HostileBase(DeclarativeBase):
    pass


class Keyword(HostileBase):
    __tablename__ = "select"
    select: Mapped[int] = mapped_column("select", primary_key=True)
    weird: Mapped[str | None] = mapped_column('weird "name"')

    quoted: Mapped[list[Quoted]] = relationship(back_populates="keyword", order_by="Quoted.id")
    weirds: Mapped[list[Weird]] = relationship()


class Quoted(HostileBase):
    __tablename__ = 'a"b'
    id: Mapped[int] = mapped_column(primary_key=True)
    keyword_id: Mapped[int | None] = mapped_column('weird "name"', sa.ForeignKey("select.select"))
    injection: Mapped[str | None] = mapped_column("x; drop table y")

    keyword: Mapped[Keyword | None] = relationship(back_populates="quoted")
    injected: Mapped[list[Injection]] = relationship()


class Injection(HostileBase):
    __tablename__ = "x; drop table y"
    id: Mapped[int] = mapped_column(primary_key=True)
    quoted_id: Mapped[int | None] = mapped_column('a"b', sa.ForeignKey('a"b.id'))


class Weird(HostileBase):
    __tablename__ = 'weird "name"'
    id: Mapped[int] = mapped_column(primary_key=True)
    select: Mapped[int | None] = mapped_column("select", sa.ForeignKey("select.select"))


class Elephant(HostileBase):
    __tablename__ = "🐘"
    key: Mapped[int] = mapped_column("🔑", primary_key=True)
    name: Mapped[str | None] = mapped_column("名前")

    tables: Mapped[list[Unicode]] = relationship()


class Unicode(HostileBase):
    __tablename__ = "tâble_ü"
    id: Mapped[int] = mapped_column("ü", primary_key=True)
    elephant: Mapped[int | None] = mapped_column("🦄", sa.ForeignKey("🐘.🔑"))


class Long(HostileBase):
    __tablename__ = LONG_63
    id: Mapped[int] = mapped_column(primary_key=True)

    alphas: Mapped[list[LongA]] = relationship()
    betas: Mapped[list[LongB]] = relationship()


class LongA(HostileBase):
    __tablename__ = LONG_A
    id: Mapped[int] = mapped_column(primary_key=True)
    long_id: Mapped[int | None] = mapped_column(sa.ForeignKey(f"{LONG_63}.id"))


class LongB(HostileBase):
    __tablename__ = LONG_B
    id: Mapped[int] = mapped_column(primary_key=True)
    long_id: Mapped[int | None] = mapped_column(sa.ForeignKey(f"{LONG_63}.id"))


class Percent(HostileBase):
    """Names a driver that looks for placeholders in a query's text would take for some."""

    __tablename__ = "100% %s %(x)s"
    id: Mapped[int] = mapped_column("%%", primary_key=True)
    share: Mapped[str | None] = mapped_column("%s")


class Sentinel(HostileBase):
    """``y``: would be dropped if any name were spliced into SQL unquoted."""

    __tablename__ = "y"
    id: Mapped[int] = mapped_column(primary_key=True)


def hostile_watchers() -> list[rowsync.Watcher]:
    return (
        rowsync.watchers(Keyword, [{"quoted": ["injected"]}, "weirds"])
        + rowsync.watchers(Quoted, extra_columns=["x; drop table y"])
        + rowsync.watchers(Elephant, ["tables"])
        + rowsync.watchers(Long, ["alphas", "betas"])
    )


MODELS = [Keyword, Quoted, Injection, Weird, Elephant, Unicode, Long, LongA, LongB]


@pytest.fixture
def hostile(engine: sa.Engine) -> sa.Engine:
    HostileBase.metadata.create_all(engine)
    return engine


@pytest.fixture
def hrs(hostile: sa.Engine) -> Iterator[RowSync]:
    instance = RowSync(hostile, hostile_watchers())
    instance.install()
    with instance:
        yield instance


def write(engine: sa.Engine, *items: Any) -> None:
    writer(sessionmaker(engine))(*items)


def seen(msgs: list[Any]) -> list[tuple[Any, str, dict[str, Any]]]:
    assert all(kind is Sync and isinstance(change, Change) for kind, change in msgs), msgs
    return [(change.model, change.event, change.ids) for _, change in msgs]


# -- names -----------------------------------------------------------------------------


def test_trigger_names_are_bounded_distinct_and_deterministic() -> None:
    first = RowSync(OFFLINE, hostile_watchers())
    second = RowSync(OFFLINE, list(reversed(hostile_watchers())))
    names = [t.name for t in first.triggers] + [t.function for t in first.triggers]

    assert {w.table for w in first.watchers} == {m.__tablename__ for m in MODELS}
    assert all(len(name.encode()) <= MAX_IDENTIFIER for name in names)
    assert len(set(names)) == len(names) == 2 * 3 * len(MODELS)
    assert {t.watcher.key: (t.name, t.function) for t in first.triggers} == {
        t.watcher.key: (t.name, t.function) for t in second.triggers
    }


def test_long_names_equal_up_to_the_cut_get_distinct_trigger_names() -> None:
    rs = RowSync(OFFLINE, rowsync.watchers(LongA) + rowsync.watchers(LongB))
    assert len(LONG_63.encode()) == MAX_IDENTIFIER and len(SHARED_40.encode()) == 40
    by_table = {(t.watcher.table, t.watcher.event): t.name for t in rs.triggers}

    for event in ("inserted", "updated", "deleted"):
        a, b = by_table[(LONG_A, event)], by_table[(LONG_B, event)]
        assert a != b
        assert a[:-10] == b[:-10]  # only the hash tells them apart


def test_install_creates_every_trigger_under_its_exact_name(hostile: sa.Engine) -> None:
    rs = RowSync(hostile, hostile_watchers())

    rs.install()
    installed = set(db_triggers(hostile))
    again = rs.install()

    assert installed == {(t.watcher.schema, t.watcher.table, t.name) for t in rs.triggers}
    assert again.ok and rs.status().ok
    assert sa.inspect(hostile).has_table("y")
    assert rs.uninstall(drop_schema=True) == len(rs.triggers)
    assert db_triggers(hostile) == {}
    assert sa.inspect(hostile).has_table("y")


# -- events ----------------------------------------------------------------------------


def test_changes_to_hostile_tables_are_delivered_with_the_right_ids(
    hrs: RowSync, hostile: sa.Engine
) -> None:
    subs = {model: hrs.subscribe(model) for model in MODELS}

    write(
        hostile,
        Keyword(select=1, weird="w"),
        Quoted(id=2, keyword_id=1, injection="'; drop table y; --"),
        Injection(id=3, quoted_id=2),
        Weird(id=4, select=1),
        Elephant(key=5, name="象"),
        Unicode(id=6, elephant=5),
        Long(id=7),
        LongA(id=8, long_id=7),
        LongB(id=9, long_id=7),
    )
    hrs.flush()  # each insert is read before the update: it is told with the values it wrote
    write(
        hostile,
        sa.update(Quoted).values(injection="changed"),
        sa.update(Unicode).values(elephant=None),
    )
    write(hostile, sa.delete(LongB), sa.delete(Injection))
    hrs.flush()
    got = {model: seen(sub.drain()) for model, sub in subs.items()}

    assert got == {
        Keyword: [(Keyword, "inserted", {"select": 1})],
        Quoted: [
            (
                Quoted,
                "inserted",
                {"id": 2, 'weird "name"': 1, "x; drop table y": "'; drop table y; --"},
            ),
            (Quoted, "updated", {"id": 2, 'weird "name"': 1, "x; drop table y": "changed"}),
        ],
        Injection: [
            (Injection, "inserted", {"id": 3, 'a"b': 2}),
            (Injection, "deleted", {"id": 3, 'a"b': 2}),
        ],
        Weird: [(Weird, "inserted", {"id": 4, "select": 1})],
        Elephant: [(Elephant, "inserted", {"🔑": 5})],
        Unicode: [
            (Unicode, "inserted", {"ü": 6, "🦄": 5}),
            (Unicode, "updated", {"ü": 6, "🦄": None}),
        ],
        Long: [(Long, "inserted", {"id": 7})],
        LongA: [(LongA, "inserted", {"id": 8, "long_id": 7})],
        LongB: [
            (LongB, "inserted", {"id": 9, "long_id": 7}),
            (LongB, "deleted", {"id": 9, "long_id": 7}),
        ],
    }
    assert sa.inspect(hostile).has_table("y")


def test_filters_on_hostile_columns_select_the_right_rows(hrs: RowSync, hostile: sa.Engine) -> None:
    wanted = hrs.subscribe(Quoted, "inserted", **{"x; drop table y": "match", 'weird "name"': 1})
    unicode = hrs.subscribe(Unicode, **{"🦄": 5})

    write(hostile, Keyword(select=1), Elephant(key=5), Elephant(key=50))
    write(
        hostile,
        Quoted(id=1, keyword_id=1, injection="match"),
        Quoted(id=2, keyword_id=1, injection="other"),
        Quoted(id=3, injection="match"),
        Unicode(id=1, elephant=5),
        Unicode(id=2, elephant=50),
    )
    hrs.flush()

    assert [ids["id"] for _, _, ids in seen(wanted.drain())] == [1]
    assert [ids["ü"] for _, _, ids in seen(unicode.drain())] == [1]


def test_tree_subscriptions_follow_hostile_relationships(hrs: RowSync, hostile: sa.Engine) -> None:
    write(hostile, Keyword(select=1), Keyword(select=2), Elephant(key=5), Long(id=7))
    hrs.flush()
    with sessionmaker(hostile, expire_on_commit=False)() as session:
        keyword = session.scalars(
            sa.select(Keyword)
            .where(Keyword.select == 1)
            .options(selectinload(Keyword.quoted).selectinload(Quoted.injected))
        ).one()
        elephant = session.get(Elephant, 5, options=[selectinload(Elephant.tables)])
        long = session.get(Long, 7, options=[selectinload(Long.alphas), selectinload(Long.betas)])
    sub = hrs.subscribe(keyword, assocs=[{"quoted": ["injected"]}, "weirds"])
    sub.add(elephant, assocs=["tables"])
    sub.add(long, assocs=["alphas", "betas"])

    write(hostile, Quoted(id=10, keyword_id=1), Quoted(id=20, keyword_id=2), Weird(id=30, select=1))
    write(hostile, Injection(id=11, quoted_id=10), Injection(id=21, quoted_id=20))
    write(
        hostile,
        Unicode(id=40, elephant=5),
        LongA(id=50, long_id=7),
        LongB(id=60, long_id=7),
        LongB(id=61),
    )
    hrs.flush()

    assert [
        (model, event, next(iter(ids.values()))) for model, event, ids in seen(sub.drain())
    ] == [
        (Quoted, "inserted", 10),
        (Weird, "inserted", 30),
        (Injection, "inserted", 11),
        (Unicode, "inserted", 40),
        (LongA, "inserted", 50),
        (LongB, "inserted", 60),
    ]


def test_hostile_rowsync_schema_and_channel_names_work(hostile: sa.Engine) -> None:
    rs = RowSync(
        hostile,
        hostile_watchers(),
        schema='rowsync "ü"; drop table y',
        channel='chan "ü" 🐘; select',
    )
    rs.install()
    with rs:
        sub = rs.subscribe(Elephant)
        write(hostile, Elephant(key=1, name="a"))
        rs.flush()
        assert seen(sub.drain()) == [(Elephant, "inserted", {"🔑": 1})]
    assert rs.status().ok
    assert rs.uninstall(drop_schema=True) == len(rs.triggers)
    assert sa.inspect(hostile).has_table("y")
    with hostile.connect() as conn:
        assert (
            conn.scalar(
                sa.text("SELECT to_regnamespace(:s)"), {"s": '"rowsync ""ü""; drop table y"'}
            )
            is None
        )


CAPTURES = {
    "notify": {},
    "durable": {"capture": "durable", "consumer": "c", "retention": 0},
    "stream": {"capture": "stream", "consumer": "c", "retention": 0},
}


@pytest.mark.parametrize("capture", CAPTURES.values(), ids=CAPTURES.keys())
@pytest.mark.parametrize(
    "name", ["rs %s", "rs %% %(x)s", "rs $$ $rowsync$ {x} '", 'rs "ü"; drop table y']
)
def test_a_rowsync_schema_name_that_holds_quotes_or_percents_installs_and_works(
    hostile: sa.Engine, name: str, capture: dict[str, Any]
) -> None:
    """Function bodies are dollar-quoted with a tag the name does not contain; queries that
    name the schema or a table and take values send a ``%`` as it is. Every query the
    listener runs (reads of the log, the parked event's, pruning, the saved position),
    and an announce, names the schema."""
    rs = RowSync(hostile, [*hostile_watchers(), *rowsync.watchers(Percent)], schema=name, **capture)
    rs.install()
    with rs:
        subs = [
            rs.subscribe(Elephant),
            rs.subscribe(Quoted),
            rs.subscribe(Percent),
            rs.subscribe(Unicode, **{"🦄": 1}),
        ]
        write(hostile, Elephant(key=1, name="a"), Quoted(id=2, injection="x" * 9000))
        write(hostile, Percent(id=3, share="%s"), Unicode(id=4, elephant=1))
        rs.flush()
        write(hostile, sa.update(Unicode).values(elephant=None))  # sealed: it leaves 🐘 1
        rs.flush()
        announced = rs.announce(["🐘", Percent.__tablename__])
        rs.flush()
        got = [seen(sub.drain()) for sub in subs]
    assert got == [
        [(Elephant, "inserted", {"🔑": 1}), (Elephant, "updated", {"🔑": 1})],
        [(Quoted, "inserted", {"id": 2, 'weird "name"': None, "x; drop table y": "x" * 9000})],
        [(Percent, "inserted", {"%%": 3}), (Percent, "updated", {"%%": 3})],
        [(Unicode, "inserted", {"ü": 4, "🦄": 1}), (Unicode, "updated", {"ü": 4, "🦄": None})],
    ]
    assert announced == {"public.🐘": 1, f"public.{Percent.__tablename__}": 1}
    assert rs.listener.stats["connection_errors"] == rs.listener.stats["listener_errors"] == 0
    assert rs.listener.stats["unsealed"] == 0
    with hostile.connect() as conn:
        cursors = sa.table("cursors", sa.column("consumer"), schema=name)
        if capture:  # the position was saved on stop
            assert conn.scalars(sa.select(cursors.c.consumer)).all() == ["c"]
        else:
            assert rs.listener.stats["overflow"] == 1
    assert rs.status().ok
    assert rs.uninstall(drop_schema=True) == len(rs.triggers)
    assert sa.inspect(hostile).has_table("y")
