"""Several commits in one listener batch give the tree the same commits give one by one.

In one batch every changed row is read after the last commit: a row moved and then deleted
is already gone when the move is resolved. ``rowsync.testing.one_batch`` holds the dispatch
so that each test takes the path it names, whatever the timing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import selectinload

from fixtures import apply_all
from models import Person, Post
from oracle import differences, fresh, snapshot
from rowsync.testing import one_batch

Batching = Callable[[Any], AbstractContextManager[None]]
BATCHING = [
    pytest.param(one_batch, id="one-batch"),
    pytest.param(lambda rs: nullcontext(), id="as-they-come"),
]


def people(*ids: int) -> sa.Select[Any]:
    return (
        sa.select(Person)
        .where(Person.id.in_(ids))
        .order_by(Person.id)
        .options(selectinload(Person.posts))
    )


@pytest.fixture
def three_people(rs, write) -> Iterator[None]:
    write(
        Person(id=1, name="a"),
        Person(id=2, name="b"),
        Person(id=3, name="c"),
        Post(id=10, name="p", person_id=1),
        Post(id=11, name="q", person_id=1),
    )
    rs.flush()
    yield


@pytest.mark.parametrize("batching", BATCHING)
def test_row_moved_out_of_the_tree_then_deleted_leaves_no_ghost(
    rs, sessions, write, three_people, batching: Batching
):
    tree = fresh(sessions, people(1, 2))
    sub = rs.subscribe(tree, assocs=["posts"])

    with batching(rs):
        write(sa.update(Post).where(Post.id == 10).values(person_id=3))
        write(sa.delete(Post).where(Post.id == 10))
    tree = apply_all(rs, sub, tree)

    assert not differences(snapshot(tree), snapshot(fresh(sessions, people(1, 2))))


@pytest.mark.parametrize("batching", BATCHING)
def test_single_root_loses_a_child_moved_away_then_deleted(
    rs, sessions, write, three_people, batching: Batching
):
    root = fresh(sessions, people(1))[0]
    sub = rs.subscribe(root, assocs=["posts"])

    with batching(rs):
        write(sa.update(Post).where(Post.id == 11).values(person_id=2))
        write(sa.delete(Post).where(Post.id == 11))
    root = apply_all(rs, sub, root)

    assert [p.id for p in root.posts] == [10]
    assert snapshot(root) == snapshot(fresh(sessions, people(1))[0])


@pytest.mark.parametrize("batching", BATCHING)
def test_row_moved_between_parents_of_the_tree_then_deleted(
    rs, sessions, write, three_people, batching: Batching
):
    tree = fresh(sessions, people(1, 2))
    sub = rs.subscribe(tree, assocs=["posts"])

    with batching(rs):
        write(sa.update(Post).where(Post.id == 10).values(person_id=2))
        write(sa.delete(Post).where(Post.id == 10))
    tree = apply_all(rs, sub, tree)

    assert not differences(snapshot(tree), snapshot(fresh(sessions, people(1, 2))))


@pytest.mark.parametrize("batching", BATCHING)
def test_row_inserted_moved_then_updated(rs, sessions, write, three_people, batching: Batching):
    tree = fresh(sessions, people(1, 2))
    sub = rs.subscribe(tree, assocs=["posts"])

    with batching(rs):
        write(Post(id=12, name="new", person_id=3))
        write(sa.update(Post).where(Post.id == 12).values(person_id=2))
        write(sa.update(Post).where(Post.id == 12).values(name="renamed"))
    tree = apply_all(rs, sub, tree)

    assert [p.name for p in tree[1].posts] == ["renamed"]
    assert not differences(snapshot(tree), snapshot(fresh(sessions, people(1, 2))))
