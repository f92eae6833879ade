"""Scenario 13: many-to-one (Post.person) - the parent refreshed, gone, or replaced."""

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import joinedload, selectinload

from fixtures import apply_all, messages, sync_each
from models import Person, Post, PostTag, Tag
from oracle import fresh, snapshot

LOADERS = [pytest.param(selectinload, id="selectin"), pytest.param(joinedload, id="joined")]


def posts_query(loader):
    return sa.select(Post).order_by(Post.id).options(loader(Post.person))


@pytest.fixture
def two_people_three_posts(rs, write):
    write(
        Person(id=1, name="a"),
        Person(id=2, name="b"),
        Post(id=10, name="p", person_id=1),
        Post(id=11, name="q", person_id=1),
        Post(id=12, name="r", person_id=None),
    )
    rs.flush()


@pytest.mark.parametrize("loader", LOADERS)
def test_parent_row_updated_is_refreshed(rs, sessions, write, two_people_three_posts, loader):
    posts = fresh(sessions, posts_query(loader))
    person = posts[0].person
    sub = rs.subscribe(posts, assocs=["person"])

    write(sa.update(Person).where(Person.id == 1).values(name="renamed"))
    posts = apply_all(rs, sub, posts)

    assert posts[0].person is person  # patched in place, shared by both posts
    assert posts[1].person is person
    assert person.name == "renamed"
    assert snapshot(posts) == snapshot(fresh(sessions, posts_query(loader)))


@pytest.mark.parametrize("loader", LOADERS)
def test_parent_row_deleted_sets_the_attribute_to_none(
    rs, sessions, write, two_people_three_posts, loader
):
    posts = fresh(sessions, posts_query(loader))
    sub = rs.subscribe(posts, assocs=["person"])

    write(sa.delete(Person).where(Person.id == 1))  # posts.person_id: ON DELETE SET NULL
    posts = apply_all(rs, sub, posts)

    assert [(p.person_id, p.person) for p in posts] == [(None, None)] * 3
    assert snapshot(posts) == snapshot(fresh(sessions, posts_query(loader)))


@pytest.mark.parametrize("loader", LOADERS)
def test_foreign_key_changed_brings_the_new_parent(
    rs, sessions, write, two_people_three_posts, loader
):
    posts = fresh(sessions, posts_query(loader))
    sub = rs.subscribe(posts, assocs=["person"])

    write(sa.update(Post).where(Post.id == 10).values(person_id=2))
    posts = apply_all(rs, sub, posts)

    assert posts[0].person.id == 2
    assert posts[0].person.name == "b"
    assert posts[1].person.id == 1
    assert snapshot(posts) == snapshot(fresh(sessions, posts_query(loader)))


@pytest.mark.parametrize("loader", LOADERS)
def test_foreign_key_set_from_null_brings_a_parent(
    rs, sessions, write, two_people_three_posts, loader
):
    posts = fresh(sessions, posts_query(loader))
    assert posts[2].person is None
    sub = rs.subscribe(posts, assocs=["person"])

    write(sa.update(Post).where(Post.id == 12).values(person_id=1))
    posts = apply_all(rs, sub, posts)

    assert posts[2].person is posts[0].person  # the tree's own instance, as one session gives
    assert snapshot(posts) == snapshot(fresh(sessions, posts_query(loader)))


@pytest.mark.parametrize("loader", LOADERS)
def test_foreign_key_set_to_null_drops_the_parent(
    rs, sessions, write, two_people_three_posts, loader
):
    posts = fresh(sessions, posts_query(loader))
    sub = rs.subscribe(posts, assocs=["person"])

    write(sa.update(Post).where(Post.id == 11).values(person_id=None))
    posts = apply_all(rs, sub, posts)

    assert posts[1].person is None
    assert posts[0].person.id == 1
    assert snapshot(posts) == snapshot(fresh(sessions, posts_query(loader)))


def test_new_parent_comes_loaded_like_the_query_loads_it(
    rs, sessions, write, two_people_three_posts
):
    write(Post(id=20, name="s", person_id=2))
    rs.flush()
    query = (
        sa.select(Post)
        .where(Post.id == 10)
        .options(selectinload(Post.person).selectinload(Person.posts))
    )
    post = fresh(sessions, query, many=False)
    sub = rs.subscribe(post, assocs=[{"person": ["posts"]}])

    write(sa.update(Post).where(Post.id == 10).values(person_id=2))
    post = apply_all(rs, sub, post)

    assert [p.id for p in post.person.posts] == [10, 20]
    assert snapshot(post) == snapshot(fresh(sessions, query, many=False))


def test_other_many_to_one_on_a_second_foreign_key_is_independent(
    rs, sessions, write, two_people_three_posts
):
    query = (
        sa.select(Post)
        .order_by(Post.id)
        .options(selectinload(Post.person), selectinload(Post.other_person))
    )
    posts = fresh(sessions, query)
    sub = rs.subscribe(posts, assocs=["person", "other_person"])

    write(sa.update(Post).where(Post.id == 10).values(other_id=2))
    posts = apply_all(rs, sub, posts)

    assert (posts[0].person.id, posts[0].other_person.id) == (1, 2)
    assert snapshot(posts) == snapshot(fresh(sessions, query))


@pytest.mark.parametrize(
    "reverse", [pytest.param(False, id="delivered"), pytest.param(True, id="reversed")]
)
@pytest.mark.parametrize("loader", LOADERS)
def test_roots_moving_between_parents_loaded_below_them_look_freshly_loaded(
    rs, sessions, write, loader, reverse
):
    """Root posts, each with its person and that person's posts and their tags: a post that
    enters a person's posts gets its tags there, and loses them again when it leaves (a
    fresh query would not load them on a root post: nobody would keep them in sync)."""
    write(
        Person(id=1, name="a"),
        Person(id=2, name="b"),
        Person(id=3, name="c"),
        Tag(id=1, name="x"),
        Post(id=10, name="test", person_id=1),
        Post(id=11, name="p", person_id=2),
        PostTag(post_id=10, tag_id=1),
    )
    rs.flush()
    query = (
        sa.select(Post)
        .order_by(Post.id)
        .options(loader(Post.person).options(loader(Person.posts).options(loader(Post.tags))))
    )
    posts = fresh(sessions, query)
    sub = rs.subscribe(posts, assocs=[{"person": [{"posts": ["tags"]}]}])
    sub.add(Post, "inserted", follow=True)

    write(sa.update(Post).where(Post.id == 11).values(person_id=1))
    write(Post(id=12, name="n", person_id=3), PostTag(post_id=12, tag_id=1))
    write(sa.update(Post).where(Post.id == 10).values(person_id=3))
    write(sa.delete(Person).where(Person.id == 1))
    write(sa.update(Tag).values(name="y"))
    msgs = messages(rs, sub)
    posts = sync_each(rs, posts, msgs[::-1] if reverse else msgs)

    assert [p.id for p in posts] == [10, 11, 12]
    assert snapshot(posts) == snapshot(fresh(sessions, query))
