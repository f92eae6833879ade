"""Every collection class SQLAlchemy supports, through a one-to-many (``Shelf.books``), a
many-to-many through a plain table (``Shelf.tags``) and one that rowsync re-queries
(``Shelf.others``): the synced tree holds the mapping's own
collection class with the members a fresh query gives, a dict collection each member under
the key it has now, in ``order_by`` order (a set in any order).

Each collection class gets a schema of its own (one registry per class), so that every
test runs on a mapping with exactly one kind of collection."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
)
from sqlalchemy.orm.collections import (
    KeyFuncDict,
    attribute_keyed_dict,
    collection,
    column_keyed_dict,
    keyfunc_mapping,
)

import rowsync
from fixtures import apply_all
from oracle import differences, fresh, snapshot
from rowsync import tree


class Pile(list[Any]):
    """A list subclass: SQLAlchemy instruments it as a list."""


class Bag:
    """A class SQLAlchemy knows only through its decorators; it holds members by identity."""

    def __init__(self) -> None:
        self.members: list[Any] = []

    @collection.appender
    def put(self, item: Any) -> None:
        self.members.append(item)

    @collection.remover
    def take(self, item: Any) -> None:
        self.members = [m for m in self.members if m is not item]

    @collection.iterator
    def __iter__(self) -> Iterator[Any]:
        return iter(self.members)


class ByName(KeyFuncDict[str, Any]):
    """A keyed dict subclass, as SQLAlchemy's documentation shows custom dict collections."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(operator.attrgetter("name"), *args, **kwargs)


CLASSES: dict[str, Callable[[Any], Any]] = {
    "list": lambda model: list,
    "set": lambda model: set,
    "attribute_keyed_dict": lambda model: attribute_keyed_dict("name"),
    "keyfunc_mapping": lambda model: keyfunc_mapping(lambda o: o.name.upper()),
    "column_keyed_dict": lambda model: column_keyed_dict(model.__table__.c.name),
    "list subclass": lambda model: Pile,
    "decorated class": lambda model: Bag,
    "keyed dict subclass": lambda model: ByName,
}


@dataclass(frozen=True)
class Schema:
    base: type[DeclarativeBase]
    shelf: Any
    book: Any
    tag: Any
    links: sa.Table


def schema(kind: Callable[[Any], Any]) -> Schema:
    """Shelves with their books and tags, both held in a collection of class ``kind(model)``."""

    class Base(DeclarativeBase):
        pass

    links = sa.Table(
        "shelf_tags",
        Base.metadata,
        sa.Column("shelf_id", sa.ForeignKey("shelves.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("tag_id", sa.ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True),
    )

    class Book(Base):
        __tablename__ = "books"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]
        shelf_id: Mapped[int | None] = mapped_column(sa.ForeignKey("shelves.id"))
        shelf = relationship("Shelf", back_populates="books")

    class Tag(Base):
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

    class Shelf(Base):
        __tablename__ = "shelves"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]
        books = relationship(
            Book, collection_class=kind(Book), order_by=Book.id, back_populates="shelf"
        )
        tags = relationship(Tag, secondary=links, collection_class=kind(Tag), order_by=Tag.id)
        others = relationship(  # criteria on the parent's table: rowsync re-queries it
            Tag,
            secondary=links,
            primaryjoin=lambda: sa.and_(Shelf.id == links.c.shelf_id, Shelf.name != "hidden"),
            collection_class=kind(Tag),
            order_by=Tag.id,
            viewonly=True,
        )

    return Schema(Base, Shelf, Book, Tag, links)


SCHEMAS = {name: schema(kind) for name, kind in CLASSES.items()}
KINDS = [pytest.param(s, id=name) for name, s in SCHEMAS.items()]
KEYED = [k for k in KINDS if isinstance(k.values[0].shelf.books.property.collection_class(), dict)]
LOADERS = [pytest.param(selectinload, id="selectin"), pytest.param(joinedload, id="joined")]


@dataclass
class Shelves:
    """A subscribed list of shelves and what it takes to check it against a fresh query."""

    rs: rowsync.RowSync
    schema: Schema
    write: Any
    statement: sa.Select[Any]
    value: list[Any]
    sub: rowsync.Subscription

    def sync(self) -> list[Any]:
        self.value = apply_all(self.rs, self.sub, self.value)
        expected = fresh(self.write.sessions, self.statement)
        assert snapshot(self.value) == snapshot(expected), differences(
            snapshot(self.value), snapshot(expected)
        )
        return self.value


@pytest.fixture
def shelves(engine: sa.Engine, write_to: Any) -> Iterator[Any]:
    """``shelves(schema, relationship key, loader)``: shelves 1 and 2 with books and tags,
    loaded with that relationship and subscribed to it (or ``statement`` loaded and
    subscribed with ``assocs``)."""
    started: list[rowsync.RowSync] = []

    def make(
        s: Schema,
        key: str,
        loader: Any = selectinload,
        statement: sa.Select[Any] | None = None,
        assocs: list[Any] | None = None,
    ) -> Shelves:
        s.base.metadata.create_all(engine)
        write = write_to(engine)
        write(
            s.shelf(id=1, name="one"),
            s.shelf(id=2, name="two"),
            s.book(id=10, name="a", shelf_id=1),
            s.book(id=30, name="c", shelf_id=1),
            s.book(id=40, name="d", shelf_id=2),
            s.tag(id=1, name="x"),
            s.tag(id=2, name="y"),
            s.tag(id=3, name="z"),
            s.links.insert().values([{"shelf_id": 1, "tag_id": 1}, {"shelf_id": 2, "tag_id": 1}]),
        )
        watched = [{"books": ["shelf"]}, "tags", "others"]
        rs = rowsync.RowSync(engine, rowsync.watchers(s.shelf, watched))
        rs.install()
        started.append(rs.start())
        if statement is None:
            statement = (
                sa.select(s.shelf).order_by(s.shelf.id).options(loader(getattr(s.shelf, key)))
            )
        value = fresh(write.sessions, statement)
        sub = rs.subscribe(value, assocs=[key] if assocs is None else assocs)
        return Shelves(rs, s, write, statement, value, sub)

    yield make
    for rs in started:
        rs.stop()


def held(shelf: Any, key: str) -> list[tuple[Any, int]]:
    """``(name, id)`` of what a shelf holds, in its collection's order."""
    return [(o.name, o.id) for o in tree.as_list(getattr(shelf, key))]


# -- one-to-many: Shelf.books ----------------------------------------------------------------


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("s", KINDS)
def test_an_inserted_child_joins_the_collection_in_order(shelves, s, loader):
    t = shelves(s, "books", loader)

    t.write(s.book(id=20, name="b", shelf_id=1))
    one, _ = t.sync()

    assert sorted(held(one, "books"), key=operator.itemgetter(1)) == [
        ("a", 10),
        ("b", 20),
        ("c", 30),
    ]


@pytest.mark.parametrize("s", KINDS)
def test_a_renamed_child_is_held_under_its_new_key(shelves, s):
    t = shelves(s, "books")
    book = next(o for o in tree.as_list(t.value[0].books) if o.id == 30)

    t.write(sa.update(s.book).where(s.book.id == 30).values(name="e"))
    one, _ = t.sync()

    assert ("e", 30) in held(one, "books")
    assert next(o for o in tree.as_list(one.books) if o.id == 30) is book
    if isinstance(one.books, dict):
        assert {k: o.id for k, o in one.books.items()} in ({"a": 10, "e": 30}, {"A": 10, "E": 30})


@pytest.mark.parametrize("s", KINDS)
def test_a_child_moved_to_another_parent_leaves_one_collection_for_the_other(shelves, s):
    t = shelves(s, "books")

    t.write(sa.update(s.book).where(s.book.id == 10).values(shelf_id=2))
    one, two = t.sync()

    assert held(one, "books") == [("c", 30)]
    assert sorted(held(two, "books")) == [("a", 10), ("d", 40)]


@pytest.mark.parametrize("s", KINDS)
def test_a_deleted_child_leaves_the_collection(shelves, s):
    t = shelves(s, "books")

    t.write(sa.delete(s.book).where(s.book.id == 40))
    _, two = t.sync()

    assert held(two, "books") == []


@pytest.mark.parametrize("s", KINDS)
def test_a_child_inserted_renamed_moved_and_deleted_in_turn_is_followed(shelves, s):
    t = shelves(s, "books")

    t.write(s.book(id=20, name="b", shelf_id=1))
    t.sync()
    t.write(sa.update(s.book).where(s.book.id == 20).values(name="f"))
    t.sync()
    t.write(sa.update(s.book).where(s.book.id == 20).values(shelf_id=2, name="g"))
    one, two = t.sync()
    assert ("g", 20) in held(two, "books")
    assert ("g", 20) not in held(one, "books")
    t.write(sa.delete(s.book).where(s.book.id == 20))
    _, two = t.sync()

    assert held(two, "books") == [("d", 40)]


LEAVING = {
    "deleted": lambda s: sa.delete(s.book).where(s.book.id == 20),
    "renamed": lambda s: sa.update(s.book).where(s.book.id == 20).values(name="b"),
    "moved": lambda s: sa.update(s.book).where(s.book.id == 20).values(shelf_id=2),
}


@pytest.mark.parametrize("leaving", [pytest.param(w, id=name) for name, w in LEAVING.items()])
@pytest.mark.parametrize("s", KEYED)
def test_a_child_hidden_under_a_repeated_key_comes_back_when_the_keys_holder_leaves(
    shelves, s, leaving
):
    t = shelves(s, "books")
    t.write(s.book(id=20, name="a", shelf_id=1))  # after book 10 in order_by: it takes "a"
    one, _ = t.sync()
    assert sorted(held(one, "books")) == [("a", 20), ("c", 30)]

    t.write(leaving(s))
    one, _ = t.sync()

    assert ("a", 10) in held(one, "books")


@pytest.mark.parametrize("s", KEYED)
def test_a_target_hidden_under_a_repeated_key_comes_back_when_its_link_goes(shelves, s):
    t = shelves(s, "tags")
    t.write(s.links.insert().values(shelf_id=1, tag_id=2))
    t.write(sa.update(s.tag).where(s.tag.id == 2).values(name="x"))
    one, _ = t.sync()
    assert held(one, "tags") == [("x", 2)]

    t.write(s.links.delete().where(s.links.c.tag_id == 2))
    one, _ = t.sync()

    assert held(one, "tags") == [("x", 1)]


@pytest.mark.parametrize("s", KINDS)
def test_a_new_parent_arrives_with_its_collection_of_the_mappings_class(shelves, s):
    books = (
        sa.select(s.book)
        .where(s.book.id < 50)  # a root list gains no inserted row unless told to follow
        .options(joinedload(s.book.shelf).selectinload(s.shelf.books))
    )
    t = shelves(s, "books", statement=books, assocs=[{"shelf": ["books"]}])

    t.write(
        s.shelf(id=3, name="three"),
        s.book(id=50, name="h", shelf_id=3),
        sa.update(s.book).where(s.book.id == 40).values(shelf_id=3),
    )
    t.sync()

    three = next(b for b in t.value if b.id == 40).shelf
    assert sorted(held(three, "books")) == [("d", 40), ("h", 50)]
    assert type(three.books) is type(next(b for b in t.value if b.id == 10).shelf.books)


# -- many-to-many through a plain table: Shelf.tags ------------------------------------------


@pytest.mark.parametrize("s", KINDS)
def test_a_link_row_inserted_and_deleted_adds_and_removes_the_target(shelves, s):
    t = shelves(s, "tags")

    t.write(s.links.insert().values(shelf_id=1, tag_id=2))
    one, _ = t.sync()
    assert sorted(held(one, "tags")) == [("x", 1), ("y", 2)]

    t.write(s.links.delete().where(s.links.c.tag_id == 1))
    one, two = t.sync()
    assert held(one, "tags") == [("y", 2)]
    assert held(two, "tags") == []


@pytest.mark.parametrize("s", KINDS)
def test_a_link_row_moved_to_another_parent_moves_the_target(shelves, s):
    t = shelves(s, "tags")
    t.write(s.links.insert().values(shelf_id=1, tag_id=3))
    t.sync()

    t.write(s.links.update().where(s.links.c.tag_id == 3).values(shelf_id=2))
    one, two = t.sync()

    assert held(one, "tags") == [("x", 1)]
    assert sorted(held(two, "tags")) == [("x", 1), ("z", 3)]


@pytest.mark.parametrize("s", KINDS)
def test_a_renamed_target_is_held_under_its_new_key_by_every_parent(shelves, s):
    t = shelves(s, "tags")

    t.write(sa.update(s.tag).where(s.tag.id == 1).values(name="w"))
    one, two = t.sync()

    assert held(one, "tags") == held(two, "tags") == [("w", 1)]


@pytest.mark.parametrize("s", KINDS)
def test_a_deleted_target_leaves_every_parent(shelves, s):
    t = shelves(s, "tags")

    t.write(sa.delete(s.tag).where(s.tag.id == 1))
    one, two = t.sync()

    assert held(one, "tags") == held(two, "tags") == []


@pytest.mark.parametrize("s", KINDS)
def test_a_collection_rowsync_queries_again_comes_back_in_the_mappings_class(shelves, s):
    t = shelves(s, "others")

    t.write(s.links.insert().values(shelf_id=1, tag_id=2))
    t.write(sa.update(s.tag).where(s.tag.id == 1).values(name="w"))
    t.write(sa.update(s.shelf).where(s.shelf.id == 2).values(name="hidden"))
    one, two = t.sync()

    assert sorted(held(one, "others")) == [("w", 1), ("y", 2)]
    assert held(two, "others") == []


# -- live queries ------------------------------------------------------------------------------


@pytest.mark.parametrize("s", KINDS)
def test_a_live_query_keeps_collections_of_every_class_current(shelves, s):
    t = shelves(s, "books")
    with t.rs.live(t.write.sessions, t.statement) as live:
        t.write(
            s.shelf(id=3, name="three"),
            s.book(id=50, name="h", shelf_id=3),
            s.book(id=20, name="b", shelf_id=1),
        )
        live.flush()
        t.write(sa.update(s.book).where(s.book.id == 30).values(name="e"))
        t.write(sa.update(s.book).where(s.book.id == 10).values(shelf_id=2))
        t.write(sa.delete(s.book).where(s.book.id == 40))
        live.flush()

        expected = fresh(t.write.sessions, t.statement)
        with live.read() as roots:
            assert snapshot(roots) == snapshot(expected), differences(
                snapshot(roots), snapshot(expected)
            )
            assert sorted(held(roots[0], "books")) == [("b", 20), ("e", 30)]
