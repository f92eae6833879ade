"""Read-only "through" relationships (Person.all_tags: person -> posts -> post_tags -> tags).

Their membership cannot be read off one row, so rowsync re-queries them for the parents in
the tree, with the loader strategy the tree was loaded with: "equals a fresh query" is
literal, and SQLAlchemy's selectinload keeps a tag reached through two posts twice, while
joinedload and lazy loading keep it once.
"""

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import joinedload, selectinload

from fixtures import apply_all
from models import Person, Post, PostTag, Tag
from oracle import fresh, snapshot


@pytest.mark.parametrize("loader", [selectinload, joinedload], ids=["selectin", "joined"])
def test_tag_reached_through_two_posts_appears_as_a_fresh_query_has_it(rs, sessions, write, loader):
    write(
        Person(id=1, name="a"),
        Tag(id=1, name="t"),
        Post(id=10, person_id=1),
        PostTag(post_id=10, tag_id=1),
    )
    query = sa.select(Person).options(loader(Person.all_tags))
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=["all_tags"])

    write(Post(id=11, person_id=1), PostTag(post_id=11, tag_id=1))
    people = apply_all(rs, sub, people)

    expected = fresh(sessions, query)
    assert snapshot(people) == snapshot(expected)
    assert [t.id for t in people[0].all_tags] == [t.id for t in expected[0].all_tags]


def test_inserting_a_tagged_post_adds_the_tag_and_deleting_the_tag_removes_it(rs, sessions, write):
    write(Person(id=1, name="a"), Tag(id=1, name="t"))
    query = sa.select(Person).options(selectinload(Person.all_tags))
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=["all_tags"])

    write(Post(id=10, person_id=1), PostTag(post_id=10, tag_id=1))
    people = apply_all(rs, sub, people)
    assert [t.id for t in people[0].all_tags] == [1]

    write(sa.delete(Tag).where(Tag.id == 1))
    people = apply_all(rs, sub, people)
    assert people[0].all_tags == []
    assert snapshot(people) == snapshot(fresh(sessions, query))


def test_a_post_moving_to_another_person_moves_its_tags_between_all_tags(rs, sessions, write):
    write(
        Person(id=1),
        Person(id=2),
        Tag(id=1, name="t"),
        Post(id=10, person_id=1),
        PostTag(post_id=10, tag_id=1),
    )
    query = sa.select(Person).options(selectinload(Person.all_tags))
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=["all_tags"])

    write(sa.update(Post).where(Post.id == 10).values(person_id=2))
    people = apply_all(rs, sub, people)

    assert {p.id: [t.id for t in p.all_tags] for p in people} == {1: [], 2: [1]}
    assert snapshot(people) == snapshot(fresh(sessions, query))
