"""Scenario 14: one-to-many (Person.posts, order_by Post.id) - insert, update, delete, move."""

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import joinedload, selectinload

from fixtures import apply_all, messages, sync_each
from models import Person, Post, PostTag, Tag
from oracle import fresh, snapshot

LOADERS = [pytest.param(selectinload, id="selectin"), pytest.param(joinedload, id="joined")]


def people_query(loader, *ids):
    query = sa.select(Person).order_by(Person.id).options(loader(Person.posts))
    return query.where(Person.id.in_(ids)) if ids else query


@pytest.fixture
def two_people(rs, write):
    write(
        Person(id=1, name="a"),
        Person(id=2, name="b"),
        Post(id=10, name="p", person_id=1),
        Post(id=30, name="r", person_id=1),
        Post(id=40, name="s", person_id=2),
    )
    rs.flush()


@pytest.mark.parametrize("loader", LOADERS)
def test_insert_takes_its_order_by_position(rs, sessions, write, two_people, loader):
    people = fresh(sessions, people_query(loader))
    sub = rs.subscribe(people, assocs=["posts"])

    write(Post(id=20, name="q", person_id=1))
    people = apply_all(rs, sub, people)

    assert [p.id for p in people[0].posts] == [10, 20, 30]
    assert [p.id for p in people[1].posts] == [40]
    assert snapshot(people) == snapshot(fresh(sessions, people_query(loader)))


@pytest.mark.parametrize("loader", LOADERS)
def test_insert_into_an_empty_collection(rs, sessions, write, two_people, loader):
    write(Person(id=3, name="c"))
    rs.flush()
    people = fresh(sessions, people_query(loader, 3))
    assert people[0].posts == []
    sub = rs.subscribe(people, assocs=["posts"])

    write(Post(id=50, name="t", person_id=3))
    people = apply_all(rs, sub, people)

    assert [p.id for p in people[0].posts] == [50]
    assert snapshot(people) == snapshot(fresh(sessions, people_query(loader, 3)))


@pytest.mark.parametrize("loader", LOADERS)
def test_update_patches_the_held_object_in_place(rs, sessions, write, two_people, loader):
    people = fresh(sessions, people_query(loader))
    post = people[0].posts[1]
    sub = rs.subscribe(people, assocs=["posts"])

    write(sa.update(Post).where(Post.id == 30).values(name="renamed", body="b"))
    people = apply_all(rs, sub, people)

    assert people[0].posts[1] is post
    assert (post.name, post.body) == ("renamed", "b")
    assert snapshot(people) == snapshot(fresh(sessions, people_query(loader)))


@pytest.mark.parametrize("loader", LOADERS)
def test_delete_removes_from_the_collection(rs, sessions, write, two_people, loader):
    people = fresh(sessions, people_query(loader))
    sub = rs.subscribe(people, assocs=["posts"])

    write(sa.delete(Post).where(Post.id == 10))
    people = apply_all(rs, sub, people)

    assert [p.id for p in people[0].posts] == [30]
    assert snapshot(people) == snapshot(fresh(sessions, people_query(loader)))


@pytest.mark.parametrize("loader", LOADERS)
def test_child_moving_to_another_parent_leaves_one_tree_and_enters_the_other(
    rs, sessions, write, two_people, loader
):
    first = fresh(sessions, people_query(loader, 1))
    second = fresh(sessions, people_query(loader, 2))
    first_sub = rs.subscribe(first, assocs=["posts"])
    second_sub = rs.subscribe(second, assocs=["posts"])

    write(sa.update(Post).where(Post.id == 10).values(person_id=2))
    first_messages = messages(rs, first_sub)
    second_messages = messages(rs, second_sub)
    first = sync_each(rs, first, first_messages)
    second = sync_each(rs, second, second_messages)

    assert [(m[1].event, m[1].ids["id"]) for m in first_messages] == [("updated", 10)]
    assert [(m[1].event, m[1].ids["id"]) for m in second_messages] == [("updated", 10)]
    assert [p.id for p in first] == [1]  # each tree only its side: no person joins the roots
    assert [p.id for p in second] == [2]
    assert [p.id for p in first[0].posts] == [30]
    assert [p.id for p in second[0].posts] == [10, 40]
    assert snapshot(first) == snapshot(fresh(sessions, people_query(loader, 1)))
    assert snapshot(second) == snapshot(fresh(sessions, people_query(loader, 2)))


@pytest.mark.parametrize("loader", LOADERS)
def test_child_moving_between_two_parents_of_one_tree(rs, sessions, write, two_people, loader):
    people = fresh(sessions, people_query(loader))
    sub = rs.subscribe(people, assocs=["posts"])

    write(sa.update(Post).where(Post.id == 40).values(person_id=1))
    people = apply_all(rs, sub, people)

    assert [p.id for p in people[0].posts] == [10, 30, 40]
    assert people[1].posts == []
    assert snapshot(people) == snapshot(fresh(sessions, people_query(loader)))


def test_child_of_a_parent_outside_the_tree_is_not_added(rs, sessions, write, two_people):
    people = fresh(sessions, people_query(selectinload, 1))
    sub = rs.subscribe(Post)  # receives every post change, also those of person 2

    write(Post(id=50, name="t", person_id=2))
    people = apply_all(rs, sub, people)

    assert [p.id for p in people[0].posts] == [10, 30]
    assert snapshot(people) == snapshot(fresh(sessions, people_query(selectinload, 1)))


def test_update_changing_the_order_by_column_reorders(rs, sessions, write, two_people):
    """The primary key is the order_by column here; moving it is unusual but allowed."""
    people = fresh(sessions, people_query(selectinload, 1))
    sub = rs.subscribe(people, assocs=["posts"])

    write(sa.update(Post).where(Post.id == 10).values(id=35))
    people = apply_all(rs, sub, people)

    assert [p.id for p in people[0].posts] == [30, 35]
    assert snapshot(people) == snapshot(fresh(sessions, people_query(selectinload, 1)))


def test_unordered_one_to_many_on_a_second_foreign_key(rs, sessions, write, two_people):
    query = sa.select(Person).order_by(Person.id).options(selectinload(Person.other_posts))
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=["other_posts"])

    write(sa.update(Post).where(Post.id.in_([10, 40])).values(other_id=2))
    write(Post(id=50, name="t", other_id=1))
    write(sa.update(Post).where(Post.id == 40).values(other_id=1))
    people = apply_all(rs, sub, people)

    assert sorted(p.id for p in people[0].other_posts) == [40, 50]
    assert [p.id for p in people[1].other_posts] == [10]
    assert snapshot(people) == snapshot(fresh(sessions, query))


@pytest.mark.parametrize("loader", LOADERS)
def test_nested_person_posts_tags_follows_every_level(rs, sessions, write, two_people, loader):
    write(Tag(id=1, name="t1"), Tag(id=2, name="t2"), PostTag(post_id=10, tag_id=1))
    rs.flush()
    query = (
        sa.select(Person)
        .order_by(Person.id)
        .options(loader(Person.posts).options(loader(Post.tags)))
    )
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=[{"posts": ["tags"]}])

    write(PostTag(post_id=30, tag_id=2), PostTag(post_id=30, tag_id=1))
    write(sa.update(Tag).where(Tag.id == 1).values(name="renamed"))
    write(Post(id=20, name="q", person_id=1), PostTag(post_id=20, tag_id=2))
    write(sa.delete(PostTag).where(PostTag.post_id == 10))
    people = apply_all(rs, sub, people)

    assert [(p.id, [t.id for t in p.tags]) for p in people[0].posts] == [
        (10, []),
        (20, [2]),
        (30, [1, 2]),
    ]
    assert people[0].posts[2].tags[0].name == "renamed"
    assert snapshot(people) == snapshot(fresh(sessions, query))


def test_new_child_comes_loaded_like_the_query_loads_it(rs, sessions, write, two_people):
    """selectinload(Person.posts).selectinload(Post.tags): a new post has its tags loaded
    (empty or not), so reading them on the detached tree never raises."""
    write(Tag(id=1, name="t1"))
    rs.flush()
    query = people_query(selectinload, 1).options(
        selectinload(Person.posts).selectinload(Post.tags)
    )
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=[{"posts": ["tags"]}])

    write(Post(id=20, name="q", person_id=1))
    write(Post(id=25, name="u", person_id=1), PostTag(post_id=25, tag_id=1))
    people = apply_all(rs, sub, people)

    by_id = {p.id: p for p in people[0].posts}
    assert by_id[20].tags == []
    assert [t.id for t in by_id[25].tags] == [1]
    assert snapshot(people) == snapshot(fresh(sessions, query))


def test_child_moving_with_its_tags_arrives_loaded_in_the_other_tree(
    rs, sessions, write, two_people
):
    write(Tag(id=1, name="t1"), PostTag(post_id=10, tag_id=1))
    rs.flush()

    def query(person_id):
        return people_query(selectinload, person_id).options(
            selectinload(Person.posts).selectinload(Post.tags)
        )

    first = fresh(sessions, query(1))
    second = fresh(sessions, query(2))
    first_sub = rs.subscribe(first, assocs=[{"posts": ["tags"]}])
    second_sub = rs.subscribe(second, assocs=[{"posts": ["tags"]}])

    write(sa.update(Post).where(Post.id == 10).values(person_id=2))
    write(sa.update(Tag).values(name="renamed"))
    first = apply_all(rs, first_sub, first)
    second = apply_all(rs, second_sub, second)

    assert [(p.id, [t.name for t in p.tags]) for p in second[0].posts] == [
        (10, ["renamed"]),
        (40, []),
    ]
    assert snapshot(first) == snapshot(fresh(sessions, query(1)))
    assert snapshot(second) == snapshot(fresh(sessions, query(2)))
