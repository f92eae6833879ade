"""A per-subscription authorizer decides, before delivery, what each subscriber may receive:
it sees the subscriber's context, the change and the fetched row."""

import pytest
import sqlalchemy as sa

import rowsync
from models import Person, Post


@pytest.fixture
def rs(moded: rowsync.RowSync) -> rowsync.RowSync:
    """In every capture mode: the authorizer sees the row whichever way the change came."""
    return moded


def own_posts_only(user_id, change, row):
    """A user may see their own posts; deletes carry no row, only the identifiers."""
    person_id = row["person_id"] if row is not None else change.ids.get("person_id")
    return person_id == user_id


def test_each_subscriber_receives_only_what_its_authorizer_allows(rs, write):
    write(Person(id=1), Person(id=2))
    rs.flush()
    alice = rs.subscribe(Post, authorize=own_posts_only, context=1)
    bob = rs.subscribe(Post, authorize=own_posts_only, context=2)

    write(Post(id=10, person_id=1), Post(id=20, person_id=2))
    write(sa.delete(Post).where(Post.id == 10))
    rs.flush()

    assert [(c.event, c.ids["id"]) for _, c in alice.drain()] == [("inserted", 10), ("deleted", 10)]
    assert [(c.event, c.ids["id"]) for _, c in bob.drain()] == [("inserted", 20)]
    assert rs.stats["denied"] == 3


def test_an_authorizer_that_fails_withholds_the_change_and_the_listener_goes_on(rs, write):
    def broken(context, change, row):
        raise RuntimeError("no idea")

    careful = rs.subscribe(Person, authorize=broken)
    everyone = rs.subscribe(Person)
    write(Person(id=1))
    rs.flush()
    assert careful.drain() == []
    assert [m[0] for m in everyone.drain()] == [rowsync.Sync]
    assert rs.stats["authorizer_errors"] == 1
