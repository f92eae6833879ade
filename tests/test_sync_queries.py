"""Scenario 22: what sync costs the database. A change whose row the listener already fetched
costs no query; N subscribers applying one change share what it does cost (no stampede).

Queries are counted on the engine RowSync reads through (``before_cursor_execute``), during
the sync calls only: the listener's own fetch has happened by the time ``flush`` returns.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import joinedload, selectinload

from fixtures import counting_queries, messages, sync_each
from models import Person, Post, PostTag, Tag
from oracle import fresh, snapshot

SUBSCRIBERS = 100
THREADS = 8


def nested(loader):
    return (
        sa.select(Person)
        .order_by(Person.id)
        .options(loader(Person.posts).options(loader(Post.tags)))
    )


LOADERS = [pytest.param(selectinload, id="selectin"), pytest.param(joinedload, id="joined")]


@pytest.fixture
def seeded(rs, write):
    write(
        Person(id=1, name="a"),
        Person(id=2, name="b"),
        Tag(id=1, name="t1"),
        Tag(id=2, name="t2"),
        Post(id=10, name="p", person_id=1),
        Post(id=11, name="q", person_id=1),
        Post(id=12, name="r", person_id=2),
        PostTag(post_id=10, tag_id=1),
        PostTag(post_id=11, tag_id=1),
        PostTag(post_id=11, tag_id=2),
    )
    rs.flush()


CHANGES_OF_FETCHED_ROWS = {
    "root updated": sa.update(Person).where(Person.id == 1).values(name="renamed"),
    "child updated": sa.update(Post).where(Post.id == 10).values(body="new"),
    "grandchild updated": sa.update(Tag).where(Tag.id == 1).values(name="renamed"),
    "child moved": sa.update(Post).where(Post.id == 12).values(person_id=1),
    "child deleted": sa.delete(Post).where(Post.id == 11),
    "link deleted": sa.delete(PostTag).where(PostTag.post_id == 10),
    "grandchild deleted with its links": sa.delete(Tag).where(Tag.id == 1),
    "root deleted": sa.delete(Person).where(Person.id == 2),
}


@pytest.mark.parametrize("change", list(CHANGES_OF_FETCHED_ROWS))
@pytest.mark.parametrize("loader", LOADERS)
def test_change_of_a_row_already_fetched_costs_no_query(
    rs, sessions, write, seeded, loader, change
):
    people = fresh(sessions, nested(loader))
    sub = rs.subscribe(people, assocs=[{"posts": ["tags"]}])

    write(CHANGES_OF_FETCHED_ROWS[change])
    msgs = messages(rs, sub)
    assert msgs
    with counting_queries(rs.engine) as statements:
        people = sync_each(rs, people, msgs)

    assert statements == []
    assert snapshot(people) == snapshot(fresh(sessions, nested(loader)))


def test_many_to_one_parent_updated_costs_no_query(rs, sessions, write, seeded):
    query = sa.select(Post).order_by(Post.id).options(selectinload(Post.person))
    posts = fresh(sessions, query)
    sub = rs.subscribe(posts, assocs=["person"])

    write(sa.update(Person).values(name="renamed"))
    write(sa.update(Post).where(Post.id == 12).values(person_id=1))  # to a parent already held
    msgs = messages(rs, sub)
    with counting_queries(rs.engine) as statements:
        posts = sync_each(rs, posts, msgs)

    assert statements == []
    assert snapshot(posts) == snapshot(fresh(sessions, query))


# -- N subscribers, one change ---------------------------------------------------------------


def subscribers(rs, sessions, query, assocs):
    """SUBSCRIBERS trees loaded with ``query`` (each from its own session), each subscribed."""
    trees = [fresh(sessions, query) for _ in range(SUBSCRIBERS)]
    return trees, [rs.subscribe(t, assocs=assocs) for t in trees]


def apply_for_everyone(rs, trees, subs, *, concurrently):
    """Each subscriber applies its own messages; returns the statements issued meanwhile."""
    queued = [messages(rs, s) for s in subs]
    assert all(queued)

    def one(i):
        return sync_each(rs, trees[i], queued[i])

    with counting_queries(rs.engine) as statements:
        if concurrently:
            with ThreadPoolExecutor(THREADS) as pool:
                results = list(pool.map(one, range(len(trees))))
        else:
            results = [one(i) for i in range(len(trees))]
    return results, statements


MODES = [pytest.param(True, id="thread-pool"), pytest.param(False, id="sequential")]


@pytest.mark.parametrize("concurrently", MODES)
def test_many_subscribers_applying_one_update_cost_no_query(
    rs, sessions, write, seeded, concurrently
):
    query = nested(selectinload)
    trees, subs = subscribers(rs, sessions, query, [{"posts": ["tags"]}])

    write(sa.update(Post).where(Post.id == 10).values(name="renamed"))
    results, statements = apply_for_everyone(rs, trees, subs, concurrently=concurrently)

    assert statements == []
    expected = snapshot(fresh(sessions, query))
    assert all(snapshot(r) == expected for r in results)


@pytest.mark.parametrize("concurrently", MODES)
def test_many_subscribers_applying_an_update_into_a_where_share_one_query(
    rs, sessions, write, seeded, concurrently
):
    """A tag renamed into Post.test_tags' criteria: its links must be read, once for all."""
    query = sa.select(Post).order_by(Post.id).options(selectinload(Post.test_tags))
    trees, subs = subscribers(rs, sessions, query, ["test_tags"])

    write(sa.update(Tag).where(Tag.id == 2).values(name="test"))
    results, statements = apply_for_everyone(rs, trees, subs, concurrently=concurrently)

    assert len(statements) <= 1, statements
    expected = snapshot(fresh(sessions, query))
    assert all(snapshot(r) == expected for r in results)
    assert [t.id for t in results[0][1].test_tags] == [2]


@pytest.mark.parametrize("concurrently", MODES)
def test_many_subscribers_receiving_a_new_child_share_one_load(
    rs, sessions, write, seeded, concurrently
):
    """A new post joins Person.posts loaded with their tags: one object load for all
    subscribers - the post and, with one selectin, its tags."""
    query = nested(selectinload).where(Person.id == 1)
    trees, subs = subscribers(rs, sessions, query, [{"posts": ["tags"]}])

    write(Post(id=20, name="s", person_id=1), PostTag(post_id=20, tag_id=2))
    results, statements = apply_for_everyone(rs, trees, subs, concurrently=concurrently)

    assert len(statements) <= 2, statements
    expected = snapshot(fresh(sessions, query))
    assert all(snapshot(r) == expected for r in results)
    new_posts = {id(r[0].posts[2]) for r in results}
    assert (
        len(new_posts) == SUBSCRIBERS
    )  # shared query, private objects: trees never share instances
