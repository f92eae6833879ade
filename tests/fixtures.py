"""Fixtures for tests that run rowsync against the reference schema (tests/models.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import rowsync
from models import Base, Person, Post, Tag
from rowsync import RowSync

ALL_ASSOCS: list[Any] = [
    "profile",
    "other_posts",
    "test_posts",
    "bad_posts",
    "all_tags",
    "favourite_people",
    {"posts": ["tags", "test_tags", "labels", "post_tags", "person", "other_person"]},
]


def reference_watchers() -> list[rowsync.Watcher]:
    """Watchers covering every table and relationship of the reference schema."""
    return rowsync.watchers(Person, ALL_ASSOCS) + rowsync.watchers(Post, ["tags", "labels"]) + rowsync.watchers(Tag)


@pytest.fixture
def schema(engine: sa.Engine) -> sa.Engine:
    """The reference schema's tables, created in this test's fresh database."""
    Base.metadata.create_all(engine)
    return engine


@pytest.fixture
def sessions(schema: sa.Engine) -> sessionmaker[Session]:
    """Sessions that keep their objects readable after commit, like a web request's."""
    return sessionmaker(schema, expire_on_commit=False)


@pytest.fixture
def rs(schema: sa.Engine) -> Iterator[RowSync]:
    """A started RowSync with triggers installed for the whole reference schema."""
    instance = RowSync(schema, reference_watchers())
    instance.install()
    with instance:
        yield instance


@pytest.fixture
def write(sessions: sessionmaker[Session]) -> Callable[..., None]:
    """Run statements or add objects in one committed transaction, on its own connection."""

    def run(*items: Any) -> None:
        with sessions() as session, session.begin():
            for item in items:
                if isinstance(item, sa.Executable):
                    session.execute(item)
                else:
                    session.add(item)
                    session.flush()

    return run


def apply_all(rs: RowSync, sub: rowsync.Subscription, value: Any, timeout: float = 5.0) -> Any:
    """Flush the listener, then apply every queued message to ``value``."""
    rs.flush(timeout)
    for message in sub.drain():
        value = rs.sync(value, message)
    return value
