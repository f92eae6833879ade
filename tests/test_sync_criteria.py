"""Scenarios 15 and 16: relationships with extra criteria (a `where`), and a "through" relationship.

EctoSync fails on several of these: a row updated out of the `where` stays, multiple
conditions crash, and a "through" relationship cannot be watched.
"""

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import joinedload, selectinload

from fixtures import apply_all
from models import Person, Post, PostTag, Tag
from oracle import fresh, snapshot

LOADERS = [pytest.param(selectinload, id="selectin"), pytest.param(joinedload, id="joined")]


@pytest.fixture
def person(rs, write):
    write(Person(id=1, name="a"), Person(id=2, name="b"))
    rs.flush()


def query_of(relationship, loader=selectinload):
    return sa.select(Person).order_by(Person.id).options(loader(relationship))


# -- Person.test_posts: Post.name == 'test' ------------------------------------------------


@pytest.mark.parametrize("loader", LOADERS)
def test_row_inserted_matching_the_where_enters_the_collection(rs, sessions, write, person, loader):
    query = query_of(Person.test_posts, loader)
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=["test_posts"])

    write(Post(id=10, name="test", person_id=1), Post(id=11, name="other", person_id=1))
    people = apply_all(rs, sub, people)

    assert [p.id for p in people[0].test_posts] == [10]
    assert snapshot(people) == snapshot(fresh(sessions, query))


@pytest.mark.parametrize("loader", LOADERS)
def test_row_updated_into_the_where_enters_the_collection(rs, sessions, write, person, loader):
    write(Post(id=10, name="draft", person_id=1))
    rs.flush()
    query = query_of(Person.test_posts, loader)
    people = fresh(sessions, query)
    assert people[0].test_posts == []
    sub = rs.subscribe(people, assocs=["test_posts"])

    write(sa.update(Post).where(Post.id == 10).values(name="test"))
    people = apply_all(rs, sub, people)

    assert [p.id for p in people[0].test_posts] == [10]
    assert snapshot(people) == snapshot(fresh(sessions, query))


@pytest.mark.parametrize("loader", LOADERS)
def test_row_updated_out_of_where_leaves_the_collection(rs, sessions, write, person, loader):
    write(Post(id=10, name="test", person_id=1), Post(id=11, name="test", person_id=1))
    rs.flush()
    query = query_of(Person.test_posts, loader)
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=["test_posts"])

    write(sa.update(Post).where(Post.id == 10).values(name="not test"))
    people = apply_all(rs, sub, people)

    assert [p.id for p in people[0].test_posts] == [11]
    assert snapshot(people) == snapshot(fresh(sessions, query))


def test_row_updated_inside_the_where_is_patched(rs, sessions, write, person):
    write(Post(id=10, name="test", person_id=1))
    rs.flush()
    query = query_of(Person.test_posts)
    people = fresh(sessions, query)
    post = people[0].test_posts[0]
    sub = rs.subscribe(people, assocs=["test_posts"])

    write(sa.update(Post).where(Post.id == 10).values(body="new body"))
    people = apply_all(rs, sub, people)

    assert people[0].test_posts == [post]
    assert post.body == "new body"
    assert snapshot(people) == snapshot(fresh(sessions, query))


def test_row_matching_the_where_moving_to_another_parent(rs, sessions, write, person):
    write(Post(id=10, name="test", person_id=1))
    rs.flush()
    query = query_of(Person.test_posts)
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=["test_posts"])

    write(sa.update(Post).where(Post.id == 10).values(person_id=2))
    people = apply_all(rs, sub, people)

    assert (people[0].test_posts, [p.id for p in people[1].test_posts]) == ([], [10])
    assert snapshot(people) == snapshot(fresh(sessions, query))


def test_where_and_plain_collection_loaded_side_by_side(rs, sessions, write, person):
    write(Post(id=10, name="test", person_id=1), Post(id=11, name="x", person_id=1))
    rs.flush()
    query = (
        sa.select(Person)
        .order_by(Person.id)
        .options(selectinload(Person.posts), selectinload(Person.test_posts))
    )
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=["posts", "test_posts"])

    write(sa.update(Post).where(Post.id == 10).values(name="x"))
    write(sa.update(Post).where(Post.id == 11).values(name="test"))
    people = apply_all(rs, sub, people)

    assert [p.id for p in people[0].posts] == [10, 11]
    assert [p.id for p in people[0].test_posts] == [11]
    assert people[0].test_posts[0] is people[0].posts[1]  # one instance per row, as a session gives
    assert snapshot(people) == snapshot(fresh(sessions, query))


# -- Person.bad_posts: name IN ('bad', 'worst') AND body = 'blabla' -----------------------


@pytest.mark.parametrize("loader", LOADERS)
def test_multi_condition_where_row_enters_when_all_conditions_hold(
    rs, sessions, write, person, loader
):
    write(
        Post(id=10, name="bad", body="other", person_id=1),
        Post(id=11, name="fine", body="blabla", person_id=1),
    )
    rs.flush()
    query = query_of(Person.bad_posts, loader)
    people = fresh(sessions, query)
    assert people[0].bad_posts == []
    sub = rs.subscribe(people, assocs=["bad_posts"])

    write(sa.update(Post).where(Post.id == 11).values(name="worst"))  # both now hold: enters
    write(sa.update(Post).where(Post.id == 10).values(name="worst"))  # body still wrong: stays out
    write(Post(id=12, name="bad", body="blabla", person_id=1))  # inserted matching: enters
    people = apply_all(rs, sub, people)

    assert sorted(p.id for p in people[0].bad_posts) == [11, 12]
    assert snapshot(people) == snapshot(fresh(sessions, query))


@pytest.mark.parametrize("loader", LOADERS)
def test_multi_condition_where_row_leaves_when_any_condition_fails(
    rs, sessions, write, person, loader
):
    write(
        Post(id=10, name="bad", body="blabla", person_id=1),
        Post(id=11, name="worst", body="blabla", person_id=1),
        Post(id=12, name="bad", body="blabla", person_id=1),
    )
    rs.flush()
    query = query_of(Person.bad_posts, loader)
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=["bad_posts"])

    write(sa.update(Post).where(Post.id == 10).values(name="good"))  # first condition fails
    write(sa.update(Post).where(Post.id == 11).values(body=None))  # second fails (NULL)
    people = apply_all(rs, sub, people)

    assert [p.id for p in people[0].bad_posts] == [12]
    assert snapshot(people) == snapshot(fresh(sessions, query))


# -- Post.test_tags: Tag.name == 'test' on the many-to-many target ------------------------


@pytest.fixture
def tagged_post(rs, write):
    write(
        Post(id=10, name="p"),
        Tag(id=1, name="test"),
        Tag(id=2, name="other"),
        Tag(id=3, name="unlinked"),
        PostTag(post_id=10, tag_id=1),
        PostTag(post_id=10, tag_id=2),
    )
    rs.flush()


def posts_with(relationship, loader=selectinload):
    return sa.select(Post).order_by(Post.id).options(loader(relationship))


@pytest.mark.parametrize("loader", LOADERS)
def test_linked_tag_renamed_into_the_where_enters(rs, sessions, write, tagged_post, loader):
    query = posts_with(Post.test_tags, loader)
    posts = fresh(sessions, query)
    sub = rs.subscribe(posts, assocs=["test_tags"])

    write(sa.update(Tag).where(Tag.id == 2).values(name="test"))
    write(sa.update(Tag).where(Tag.id == 3).values(name="test"))  # not linked: stays out
    posts = apply_all(rs, sub, posts)

    assert sorted(t.id for t in posts[0].test_tags) == [1, 2]
    assert snapshot(posts) == snapshot(fresh(sessions, query))


@pytest.mark.parametrize("loader", LOADERS)
def test_linked_tag_renamed_out_of_the_where_leaves(rs, sessions, write, tagged_post, loader):
    query = posts_with(Post.test_tags, loader)
    posts = fresh(sessions, query)
    sub = rs.subscribe(posts, assocs=["test_tags"])

    write(sa.update(Tag).where(Tag.id == 1).values(name="no longer"))
    posts = apply_all(rs, sub, posts)

    assert posts[0].test_tags == []
    assert snapshot(posts) == snapshot(fresh(sessions, query))


def test_link_to_a_tag_outside_the_where_adds_nothing(rs, sessions, write, tagged_post):
    query = posts_with(Post.test_tags)
    posts = fresh(sessions, query)
    sub = rs.subscribe(posts, assocs=["test_tags"])

    write(PostTag(post_id=10, tag_id=3))
    write(sa.delete(PostTag).where(PostTag.tag_id == 1))
    posts = apply_all(rs, sub, posts)

    assert posts[0].test_tags == []
    assert snapshot(posts) == snapshot(fresh(sessions, query))


def test_tag_renamed_in_then_linked_then_renamed_out(rs, sessions, write, tagged_post):
    query = sa.select(Post).options(selectinload(Post.tags), selectinload(Post.test_tags))
    posts = fresh(sessions, query)
    sub = rs.subscribe(posts, assocs=["tags", "test_tags"])

    write(sa.update(Tag).where(Tag.id == 3).values(name="test"))
    write(PostTag(post_id=10, tag_id=3))
    posts = apply_all(rs, sub, posts)
    assert sorted(t.id for t in posts[0].test_tags) == [1, 3]
    assert snapshot(posts) == snapshot(fresh(sessions, query))

    write(sa.update(Tag).values(name="x"))
    posts = apply_all(rs, sub, posts)
    assert posts[0].test_tags == []
    assert [t.id for t in posts[0].tags] == [1, 2, 3]
    assert snapshot(posts) == snapshot(fresh(sessions, query))


# -- Person.all_tags: Person -> posts -> post_tags -> tags (read-only "through") ----------


@pytest.mark.parametrize("loader", LOADERS)
def test_through_post_inserted_with_a_tag_brings_the_tag(rs, sessions, write, person, loader):
    write(Tag(id=1, name="t1"), Tag(id=2, name="t2"))
    rs.flush()
    query = query_of(Person.all_tags, loader)
    people = fresh(sessions, query)
    assert people[0].all_tags == []
    sub = rs.subscribe(people, assocs=["all_tags"])

    write(Post(id=10, name="p", person_id=1), PostTag(post_id=10, tag_id=1))
    people = apply_all(rs, sub, people)

    assert [t.id for t in people[0].all_tags] == [1]
    assert people[1].all_tags == []
    assert snapshot(people) == snapshot(fresh(sessions, query))


@pytest.mark.parametrize("loader", LOADERS)
def test_through_tag_deleted_disappears(rs, sessions, write, person, loader):
    write(
        Tag(id=1, name="t1"),
        Tag(id=2, name="t2"),
        Post(id=10, name="p", person_id=1),
        PostTag(post_id=10, tag_id=1),
        PostTag(post_id=10, tag_id=2),
    )
    rs.flush()
    query = query_of(Person.all_tags, loader)
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=["all_tags"])

    write(sa.delete(Tag).where(Tag.id == 1))
    people = apply_all(rs, sub, people)

    assert [t.id for t in people[0].all_tags] == [2]
    assert snapshot(people) == snapshot(fresh(sessions, query))


def test_through_follows_links_posts_moving_and_tag_updates(rs, sessions, write, person):
    write(
        Tag(id=1, name="t1"),
        Tag(id=2, name="t2"),
        Post(id=10, name="p", person_id=1),
        Post(id=11, name="q", person_id=1),
        PostTag(post_id=10, tag_id=1),
    )
    rs.flush()
    query = query_of(Person.all_tags)
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=["all_tags"])

    write(PostTag(post_id=11, tag_id=2))
    write(sa.update(Post).where(Post.id == 10).values(person_id=2))
    write(sa.update(Tag).where(Tag.id == 1).values(name="renamed"))
    people = apply_all(rs, sub, people)

    assert [t.id for t in people[0].all_tags] == [2]
    assert [(t.id, t.name) for t in people[1].all_tags] == [(1, "renamed")]
    assert snapshot(people) == snapshot(fresh(sessions, query))


def test_through_tag_reached_by_two_posts_stays_until_both_paths_are_gone(
    rs, sessions, write, person
):
    """The relationship yields a tag once per path to it, like the query it is."""
    write(
        Tag(id=1, name="t1"),
        Post(id=10, name="p", person_id=1),
        Post(id=11, name="q", person_id=1),
        PostTag(post_id=10, tag_id=1),
    )
    rs.flush()
    query = query_of(Person.all_tags)
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=["all_tags"])

    write(PostTag(post_id=11, tag_id=1))
    people = apply_all(rs, sub, people)
    assert snapshot(people) == snapshot(fresh(sessions, query))

    write(sa.delete(PostTag).where(PostTag.post_id == 10))
    people = apply_all(rs, sub, people)
    assert [t.id for t in people[0].all_tags] == [1]
    assert snapshot(people) == snapshot(fresh(sessions, query))

    write(sa.delete(Post).where(Post.id == 11))
    people = apply_all(rs, sub, people)
    assert people[0].all_tags == []
    assert snapshot(people) == snapshot(fresh(sessions, query))


def test_row_leaving_the_where_and_its_parent_at_once_enters_nowhere(rs, sessions, write, person):
    write(Post(id=10, name="test", person_id=1))
    rs.flush()
    query = query_of(Person.test_posts)
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=["test_posts"])

    write(sa.update(Post).where(Post.id == 10).values(person_id=2, name="other"))
    people = apply_all(rs, sub, people)

    assert (people[0].test_posts, people[1].test_posts) == ([], [])
    assert snapshot(people) == snapshot(fresh(sessions, query))
