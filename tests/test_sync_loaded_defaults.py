"""What the loader loaded is followed, whether ``assocs`` names it or not: a relationship
a mapping loads by default (``lazy="joined"``, ``lazy="selectin"``) or one that loader
options load must not go stale because the subscription did not list it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    contains_eager,
    load_only,
    mapped_column,
    relationship,
    sessionmaker,
)

import rowsync
from fixtures import apply_all
from oracle import differences, fresh, snapshot


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors_ld"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None]
    books: Mapped[list[Book]] = relationship(
        back_populates="author", lazy="selectin", order_by="Book.id"
    )


class Book(Base):
    __tablename__ = "books_ld"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str | None]
    author_id: Mapped[int | None] = mapped_column(sa.ForeignKey("authors_ld.id"))
    author: Mapped[Author | None] = relationship(back_populates="books", lazy="joined")


class Shelf(Base):
    __tablename__ = "shelves_ld"
    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str | None]


class Box(Base):
    __tablename__ = "boxes_ld"
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str | None]
    shelf_id: Mapped[int | None] = mapped_column(sa.ForeignKey("shelves_ld.id"))
    shelf: Mapped[Shelf | None] = relationship(lazy="noload")


@pytest.fixture
def library(engine, write_to):
    Base.metadata.create_all(engine)
    rs = rowsync.RowSync(
        engine,
        rowsync.watchers(Author, ["books"])
        + rowsync.watchers(Book)
        + rowsync.watchers(Box, ["shelf"])
        + rowsync.watchers(Shelf),
    )
    rs.install()
    write = write_to(engine)
    write(Author(id=1, name="a"), Author(id=2, name="b"), Book(id=10, title="x", author_id=1))
    write(Shelf(id=1, label="s"), Box(id=10, note="n", shelf_id=1))
    with rs:
        yield rs, write, sessionmaker(engine, expire_on_commit=False)


def test_a_joined_default_many_to_one_not_in_assocs_is_followed(library):
    rs, write, sessions = library
    query = sa.select(Book).order_by(Book.id)
    books = fresh(sessions, query)
    sub = rs.subscribe(books)  # nothing named: book.author (and its books) are loaded anyway

    write(sa.update(Author).where(Author.id == 1).values(name="renamed"))
    write(sa.update(Book).where(Book.id == 10).values(author_id=2))
    books = apply_all(rs, sub, books)

    assert books[0].author.name == "b"
    assert not differences(snapshot(books), snapshot(fresh(sessions, query)))


def test_a_selectin_default_collection_not_in_assocs_is_followed(library):
    rs, write, sessions = library
    query = sa.select(Author).order_by(Author.id)
    authors = fresh(sessions, query)
    sub = rs.subscribe(authors, assocs=[])

    write(Book(id=12, title="z", author_id=2))
    write(sa.update(Book).where(Book.id == 10).values(title="retitled"))
    authors = apply_all(rs, sub, authors)

    assert [b.title for b in authors[1].books] == ["z"]
    assert not differences(snapshot(authors), snapshot(fresh(sessions, query)))


BOXES_WITH_THEIR_SHELF = (
    sa.select(Box)
    .join(Box.shelf)
    .options(contains_eager(Box.shelf), load_only(Box.id, Box.shelf_id))
    .order_by(Box.id)
)
"""``contains_eager`` fills a relationship the mapping never fills (``lazy="noload"``)."""


def test_resync_keeps_what_contains_eager_loaded_over_a_noload_default(library):
    rs, write, sessions = library
    found = fresh(sessions, BOXES_WITH_THEIR_SHELF)
    assert found[0].shelf is not None

    found = rs.resync(found)

    assert not differences(snapshot(found), snapshot(fresh(sessions, BOXES_WITH_THEIR_SHELF)))


def test_a_box_joining_roots_gets_the_shelf_contains_eager_loads_over_a_noload_default(library):
    rs, write, sessions = library
    found = fresh(sessions, BOXES_WITH_THEIR_SHELF)
    sub = rs.subscribe(found, assocs=["shelf"])
    sub.add(Box, "inserted", follow=True)

    write(Box(id=11, note="m", shelf_id=1))
    found = apply_all(rs, sub, found)

    assert not differences(snapshot(found), snapshot(fresh(sessions, BOXES_WITH_THEIR_SHELF)))
