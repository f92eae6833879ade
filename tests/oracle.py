"""The correctness oracle: a loaded tree as plain data, to compare with a fresh query, and
the trees (statements, loader options, subscriptions) the oracle tests hold.

Only what is loaded is read (never a lazy load): a relationship loaded on one side and not
on the other is a difference (reading it on a detached object would raise). Collections are
compared by their collection class: lists and sets as multisets unless the relationship
declares ``order_by`` (then in order, ties as multisets), dicts by key.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.orm import joinedload, selectinload
from sqlalchemy.orm.base import instance_state
from sqlalchemy.sql.elements import UnaryExpression

import rowsync
from fixtures import ALL_ASSOCS
from models import Person, Post, PostTag, Tag
from rowsync import tree


class _Deferred:
    def __repr__(self) -> str:
        return "<not loaded>"


DEFERRED: Final = _Deferred()
"""A column the object has not loaded (``defer``, ``load_only``): reading it would query."""


def snapshot(value: Any, depth: int = 6, order: Sequence[str] = ()) -> Any:
    """``value`` as plain data. A list of roots is a multiset, unless ``order`` names the
    attributes its statement orders by (then runs of equal values are multisets, in order)."""
    if value is None:
        return None
    if isinstance(value, list):
        items = [(tuple(_sort_value(v, k) for k in order), _object(v, depth)) for v in value]
        return _runs(items) if order else sorted((i for _, i in items), key=repr)
    return _object(value, depth)


def _object(obj: Any, depth: int) -> dict[str, Any]:
    state = instance_state(obj)
    out: dict[str, Any] = {"__class__": state.mapper.class_.__name__}
    for prop in state.mapper.column_attrs:
        out[prop.key] = state.dict.get(prop.key, DEFERRED)
    if depth == 0:
        return out
    for rel in state.mapper.relationships:
        value = tree.loaded_value(obj, rel.key)
        if rel.lazy == "noload" and (value is tree.NOT_LOADED or not value):
            # reading it gives what loading it gives, an empty value, never a query
            out[rel.key] = [] if rel.uselist else None
            continue
        if value is tree.NOT_LOADED:
            continue
        if not rel.uselist:
            out[rel.key] = None if value is None else _object(value, depth - 1)
        elif isinstance(value, dict):
            out[rel.key] = {
                "__collection__": type(value).__name__,
                "items": sorted(
                    ([repr(k), _object(v, depth - 1)] for k, v in value.items()), key=repr
                ),
            }
        else:
            order = _order_keys(rel) if rel.order_by else ()
            items = [
                (tuple(_sort_value(v, k) for k in order), _object(v, depth - 1)) for v in value
            ]
            runs = _runs(items) if order else sorted((i for _, i in items), key=repr)
            # list subclasses other than SQLAlchemy's own (a user's collection class) count
            kind = type(value).__name__
            out[rel.key] = (
                runs if kind == "InstrumentedList" else {"__collection__": kind, "items": runs}
            )
    return out


def _order_keys(rel: Any) -> tuple[str, ...]:
    """The attribute keys of the target columns a relationship's ``order_by`` names."""
    keys = []
    for term in rel.order_by:
        while isinstance(term, UnaryExpression):
            term = term.element
        keys.append(rel.mapper.get_property_by_column(term).key)
    return tuple(keys)


def _sort_value(obj: Any, key: str) -> Any:
    return instance_state(obj).dict.get(key, DEFERRED)


def _runs(items: list[tuple[tuple[Any, ...], Any]]) -> list[Any]:
    """Items in order, each run of equal sort values as a multiset (ties have no order)."""
    out: list[Any] = []
    for _, run in itertools.groupby(items, key=lambda item: item[0]):
        out.append(sorted((i for _, i in run), key=repr))
    return out


def fresh(session_factory: Any, statement: sa.Select[Any], *, many: bool = True) -> Any:
    """Re-run ``statement`` in a new session: the tree sync must reproduce."""
    with session_factory() as session:
        result = session.scalars(statement).unique().all()
        return list(result) if many else (result[0] if result else None)


def differences(actual: Any, expected: Any, path: str = "") -> list[str]:
    """Where two snapshots differ, as readable paths (for failure messages). A column the
    fresh query left unloaded may hold anything in the synced tree (reading it cannot fail)."""
    if expected is DEFERRED:
        return []
    if type(actual) is not type(expected):
        return [f"{path or '.'}: {actual!r} != {expected!r}"]
    if isinstance(actual, dict):
        out: list[str] = []
        for key in sorted(set(actual) | set(expected), key=str):
            if key not in actual or key not in expected:
                out.append(
                    f"{path}.{key}: {'missing' if key not in actual else 'extra'} in synced tree"
                )
            else:
                out += differences(actual[key], expected[key], f"{path}.{key}")
        return out
    if isinstance(actual, list):
        if len(actual) != len(expected):
            return [f"{path}: {len(actual)} items != {len(expected)}: {actual!r} != {expected!r}"]
        return [
            d
            for i, (a, e) in enumerate(zip(actual, expected, strict=True))
            for d in differences(a, e, f"{path}[{i}]")
        ]
    return [] if actual == expected else [f"{path or '.'}: {actual!r} != {expected!r}"]


@dataclass
class Tree:
    """One subscriber: a statement, the tree it loaded, and its subscription."""

    name: str
    statement: sa.Select[Any]
    many: bool
    preloads: dict[Any, Any] | None = None
    value: Any = None
    sub: rowsync.Subscription | None = None


def trees(*, favourites: bool = True, joined_profile: bool = True) -> list[Tree]:
    """The oracle's subscribers. ``favourites=False`` leaves out the self-referential
    many-to-many (see tests/test_sync_regressions.py for what it still gets wrong);
    ``joined_profile=False`` the people's joined-loaded one-to-one profile, which a subscriber
    applying messages far behind has been seen to keep after it left (rarely; not yet fixed)."""
    favourite: list[Any] = [selectinload(Person.favourite_people)] if favourites else []
    profile: list[Any] = [joinedload(Person.profile)] if joined_profile else []
    return [
        Tree(
            "people, everything",
            sa.select(Person).options(
                selectinload(Person.posts).selectinload(Post.tags),
                selectinload(Person.posts).selectinload(Post.labels),
                selectinload(Person.test_posts),
                selectinload(Person.bad_posts),
                selectinload(Person.other_posts),
                selectinload(Person.all_tags),
                *favourite,
                *profile,
            ),
            True,
            {
                Person: [
                    {"posts": ["tags", "labels"]},
                    "test_posts",
                    "bad_posts",
                    "other_posts",
                    "all_tags",
                    *(["favourite_people"] if favourites else []),
                    *(["profile"] if joined_profile else []),
                ]
            },
        ),
        Tree(
            "posts with joined parents",
            sa.select(Post).options(
                joinedload(Post.person).joinedload(Person.profile),
                joinedload(Post.other_person),
                selectinload(Post.tags),
                selectinload(Post.test_tags),
                selectinload(Post.labels),
                selectinload(Post.post_tags).joinedload(PostTag.tag),
            ),
            True,
            {
                Post: [
                    {"person": ["profile"]},
                    "other_person",
                    "tags",
                    "test_tags",
                    "labels",
                    {"post_tags": ["tag"]},
                ]
            },
        ),
        Tree(
            "person 1, nested",
            sa.select(Person)
            .where(Person.id == 1)
            .options(
                selectinload(Person.posts).selectinload(Post.test_tags),
                selectinload(Person.profile),
            ),
            False,
            {Person: [{"posts": ["test_tags"]}, "profile"]},
        ),
        Tree("tags", sa.select(Tag), True),
    ]


def assocs_of(t: Tree) -> list[Any]:
    entity = t.statement.column_descriptions[0]["entity"]
    if t.name == "person 1, nested":
        return [{"posts": ["test_tags"]}, "profile"]
    if entity is Person:
        return ALL_ASSOCS
    if entity is Post:
        return [
            "person",
            "other_person",
            "tags",
            "test_tags",
            "labels",
            {"post_tags": ["tag"]},
            {"person": ["profile"]},
        ]
    return []
