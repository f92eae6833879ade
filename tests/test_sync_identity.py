"""Models with an ``__eq__`` of their own: mapped dataclasses (``eq=True``, so unhashable,
comparing every field, relationships included) and a class equal to everything. rowsync
tells objects apart by identity and primary key only, so a tree of them syncs like any other,
and two rows that compare equal stay two rows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    MappedAsDataclass,
    mapped_column,
    relationship,
    selectinload,
)

import rowsync
from fixtures import apply_all
from oracle import differences, fresh, snapshot


class DataBase(MappedAsDataclass, DeclarativeBase):
    pass


class DataShelf(DataBase):
    __tablename__ = "data_shelves"
    id: Mapped[int] = mapped_column(primary_key=True, compare=False)
    name: Mapped[str | None] = mapped_column(default=None)
    books: Mapped[list[DataBook]] = relationship(default_factory=list)
    labels: Mapped[list[DataLabel]] = relationship(default_factory=list)
    """Never loaded by the tests: comparing two shelves would lazy-load it, detached."""


class DataBook(DataBase):
    __tablename__ = "data_books"
    id: Mapped[int] = mapped_column(primary_key=True, compare=False)
    shelf_id: Mapped[int | None] = mapped_column(sa.ForeignKey("data_shelves.id"), default=None)
    title: Mapped[str | None] = mapped_column(default=None)


class DataLabel(DataBase):
    __tablename__ = "data_labels"
    id: Mapped[int] = mapped_column(primary_key=True)
    shelf_id: Mapped[int | None] = mapped_column(sa.ForeignKey("data_shelves.id"), default=None)


class EqualBase(DeclarativeBase):
    pass


class _EqualToEverything:
    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]


class EqualShelf(_EqualToEverything, EqualBase):
    __tablename__ = "equal_shelves"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None]
    books: Mapped[list[EqualBook]] = relationship()


class EqualBook(_EqualToEverything, EqualBase):
    __tablename__ = "equal_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    shelf_id: Mapped[int | None] = mapped_column(sa.ForeignKey("equal_shelves.id"))
    title: Mapped[str | None]


@dataclass
class Family:
    base: Any
    shelf: Any
    book: Any
    rs: rowsync.RowSync
    write: Any

    @property
    def query(self) -> sa.Select[Any]:
        return sa.select(self.shelf).order_by(self.shelf.id).options(selectinload(self.shelf.books))

    def load(self) -> tuple[list[Any], rowsync.Subscription]:
        """The shelves with their books, followed, new shelves joining the list."""
        shelves = fresh(self.write.sessions, self.query)
        sub = self.rs.subscribe(shelves, assocs=["books"])
        sub.add(self.shelf, "inserted", follow=True, assocs=["books"])
        return shelves, sub

    def assert_fresh(self, shelves: list[Any]) -> None:
        expected = fresh(self.write.sessions, self.query)
        assert snapshot(shelves) == snapshot(expected), differences(
            snapshot(shelves), snapshot(expected)
        )


@pytest.fixture(params=["dataclasses", "equal-to-everything"])
def family(request: Any, engine: sa.Engine, write_to: Any) -> Iterator[Family]:
    base, shelf, book = (
        (DataBase, DataShelf, DataBook)
        if request.param == "dataclasses"
        else (EqualBase, EqualShelf, EqualBook)
    )
    base.metadata.create_all(engine)
    rs = rowsync.RowSync(engine, rowsync.watchers(shelf, ["books"]) + rowsync.watchers(book))
    rs.install()
    write = write_to(engine)
    write(
        shelf(id=1, name="same"),
        shelf(id=2, name="same"),
        shelf(id=3, name="other"),
        book(id=10, shelf_id=1, title="twin"),
        book(id=11, shelf_id=1, title="twin"),
        book(id=12, shelf_id=2, title="x"),
    )
    with rs:
        yield Family(base, shelf, book, rs, write)


def ids(objects: list[Any]) -> list[int]:
    return [o.id for o in objects]


def test_two_books_that_compare_equal_are_different_rows(family):
    """What the tests below rely on. (Two dataclass shelves cannot even be compared once
    detached: their ``__eq__`` lazy-loads ``labels``.)"""
    books = fresh(family.write.sessions, family.query)[0].books
    assert books[0] == books[1] and books[0].id != books[1].id


def test_deleting_a_root_removes_that_root_only(family):
    shelves, sub = family.load()

    family.write(sa.delete(family.shelf).where(family.shelf.id == 3))
    shelves = apply_all(family.rs, sub, shelves)

    assert ids(shelves) == [1, 2]
    family.assert_fresh(shelves)


def test_two_roots_that_compare_equal_are_both_kept_until_one_is_deleted(family):
    shelves, sub = family.load()
    family.write(sa.update(family.shelf).where(family.shelf.id == 1).values(name="same"))
    shelves = apply_all(family.rs, sub, shelves)
    assert ids(shelves) == [1, 2, 3]

    family.write(sa.delete(family.book).where(family.book.shelf_id == 2))
    family.write(sa.delete(family.shelf).where(family.shelf.id == 2))
    shelves = apply_all(family.rs, sub, shelves)

    assert ids(shelves) == [1, 3]
    family.assert_fresh(shelves)


def test_two_children_that_compare_equal_are_both_kept_until_one_is_deleted(family):
    shelves, sub = family.load()
    family.write(family.book(id=13, shelf_id=1, title="twin"))
    shelves = apply_all(family.rs, sub, shelves)
    assert sorted(ids(shelves[0].books)) == [10, 11, 13]

    family.write(sa.delete(family.book).where(family.book.id == 11))
    shelves = apply_all(family.rs, sub, shelves)

    assert sorted(ids(shelves[0].books)) == [10, 13]
    family.assert_fresh(shelves)


def test_children_inserted_moved_updated_and_deleted_match_a_fresh_query(family):
    shelves, sub = family.load()
    book = family.book
    for step in [
        book(id=14, shelf_id=3, title="new"),
        sa.update(book).where(book.id == 10).values(shelf_id=2),
        sa.update(book).where(book.id == 12).values(title="twin"),
        sa.update(book).where(book.id == 11).values(shelf_id=3, title="moved"),
        sa.delete(book).where(book.id == 14),
        sa.update(book).where(book.id == 10).values(shelf_id=None),
    ]:
        family.write(step)
        shelves = apply_all(family.rs, sub, shelves)
        family.assert_fresh(shelves)
    assert [ids(s.books) for s in shelves] == [[], [12], [11]]


def test_an_inserted_root_joins_beside_roots_it_compares_equal_to(family):
    shelves, sub = family.load()

    family.write(family.shelf(id=4, name="same"), family.book(id=15, shelf_id=4, title="twin"))
    shelves = apply_all(family.rs, sub, shelves)

    assert ids(shelves) == [1, 2, 3, 4]
    assert ids(shelves[3].books) == [15]
    family.assert_fresh(shelves)

    family.write(sa.delete(family.book).where(family.book.id == 15))
    family.write(sa.delete(family.shelf).where(family.shelf.id == 4))
    shelves = apply_all(family.rs, sub, shelves)
    assert ids(shelves) == [1, 2, 3]
    family.assert_fresh(shelves)


def test_a_live_query_of_objects_that_compare_equal_matches_a_fresh_query(family):
    book = family.book
    with family.rs.live(family.write.sessions, family.query) as live:
        for step in [
            family.shelf(id=4, name="same"),
            book(id=16, shelf_id=4, title="twin"),
            sa.update(book).where(book.id == 10).values(shelf_id=4),
            sa.update(family.shelf).where(family.shelf.id == 1).values(name="other"),
            sa.delete(book).where(book.id == 11),
            sa.delete(family.shelf).where(family.shelf.id == 1),
            sa.update(book).where(book.id == 12).values(title="twin"),
        ]:
            family.write(step)
            live.flush()
            with live.read() as roots:
                family.assert_fresh(roots)
        assert ids(live.value) == [2, 3, 4]
    assert family.rs.stats["live_errors"] == 0  # no message fell back to running the query
