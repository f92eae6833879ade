"""Scenarios 12 and 21: the roots of a tree - a list, an empty list, None, a single object."""

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import joinedload, selectinload

import rowsync
from fixtures import apply_all, messages
from models import Label, Person, Post, Tag, posts_labels
from oracle import fresh, snapshot
from rowsync import Change, Resync, ResyncInfo, Sync

PEOPLE = sa.select(Person).order_by(Person.id)


def test_insert_joins_a_root_list_loaded_like_its_siblings(rs, sessions, write):
    write(Person(id=1, name="a"), Post(id=10, name="p", person_id=1))
    rs.flush()  # earlier changes are not this test's messages
    query = PEOPLE.options(selectinload(Person.posts))
    people = fresh(sessions, query)
    sub = rs.subscribe(people).add(Person, "inserted", follow=True)

    write(Person(id=2, name="b"), Post(id=20, name="q", person_id=2))
    synced = apply_all(rs, sub, people)

    assert synced is people
    assert snapshot(people) == snapshot(fresh(sessions, query))
    new = next(p for p in people if p.id == 2)
    assert [p.id for p in new.posts] == [20]  # loaded like the query loads it, no lazy load


def test_insert_joins_a_joinedload_root_list(rs, sessions, write):
    write(Person(id=1, name="a"))
    rs.flush()  # earlier changes are not this test's messages
    query = PEOPLE.options(joinedload(Person.posts))
    people = fresh(sessions, query)
    sub = rs.subscribe(people).add(Person, "inserted", follow=True)

    write(Person(id=2, name="b"))
    people = apply_all(rs, sub, people)

    assert snapshot(people) == snapshot(fresh(sessions, query))
    assert next(p for p in people if p.id == 2).posts == []


def test_insert_into_an_empty_list_gives_a_list_of_the_new_object(rs, sessions, write):
    people: list[Person] = fresh(sessions, PEOPLE)
    assert people == []
    sub = rs.subscribe(people).add(Person, "inserted", follow=True)

    write(Person(id=1, name="a"))
    synced = apply_all(rs, sub, people)

    assert synced is people
    assert snapshot(people) == snapshot(fresh(sessions, PEOPLE))


def test_insert_into_an_empty_list_with_preloads_loads_what_they_name(rs, sessions, write):
    people: list[Person] = []
    sub = rs.subscribe(people).add(Person, "inserted", follow=True, assocs=["posts"])

    write(Person(id=1, name="a"), Post(id=10, name="p", person_id=1))
    for message in messages(rs, sub):
        people = rs.sync(people, message, {Person: ["posts"]})

    assert snapshot(people) == snapshot(fresh(sessions, PEOPLE.options(selectinload(Person.posts))))
    assert [p.id for p in people[0].posts] == [10]


def test_insert_into_none_gives_the_new_object(rs, sessions, write):
    sub = rs.subscribe(Person, "inserted")

    write(Person(id=1, name="a"))
    [message] = messages(rs, sub)
    person = rs.sync(None, message)

    assert isinstance(person, Person)
    assert snapshot(person) == snapshot(fresh(sessions, PEOPLE, many=False))


def test_insert_of_a_row_already_in_the_list_adds_nothing(rs, sessions, write):
    people: list[Person] = []
    sub = rs.subscribe(people).add(Person, "inserted", follow=True)
    write(Person(id=1, name="a"))
    [message] = messages(rs, sub)
    people[:] = fresh(sessions, PEOPLE)

    people = rs.sync(people, message)

    assert [p.id for p in people] == [1]


def test_something_that_is_not_a_model_object_comes_back_unchanged(rs, write):
    sub = rs.subscribe(Person)
    write(Person(id=1, name="a"))
    [message] = messages(rs, sub)

    assert rs.sync("x", message) == "x"
    numbers = [1, 2]
    assert rs.sync(numbers, message) is numbers
    assert numbers == [1, 2]
    mapping = {"id": 1}
    assert rs.sync(mapping, message) is mapping
    assert mapping == {"id": 1}
    assert rowsync.sync("x", message) == "x"


def test_a_message_that_is_not_a_change_leaves_the_tree_alone(rs, sessions, write):
    write(Person(id=1, name="a"))
    people = fresh(sessions, PEOPLE)

    assert rs.sync(people, (Resync, ResyncInfo("overflow", 0.0))) is people
    assert rs.sync(people, "not a message") is people
    assert rs.sync(people, (Sync, "not a change")) is people
    assert [p.id for p in people] == [1]


def test_deleted_root_object_syncs_to_none(rs, sessions, write):
    write(Person(id=1, name="a"), Person(id=2, name="b"))
    rs.flush()  # earlier changes are not this test's messages
    person = fresh(sessions, PEOPLE.where(Person.id == 1), many=False)
    sub = rs.subscribe(person)

    write(sa.delete(Person).where(Person.id == 1))
    msgs = messages(rs, sub)

    assert [(m[1].event, m[1].ids["id"]) for m in msgs] == [("deleted", 1)]
    assert rs.sync(person, msgs[0]) is None


def test_deleted_root_object_leaves_the_list(rs, sessions, write):
    write(Person(id=1, name="a"), Person(id=2, name="b"), Person(id=3, name="c"))
    rs.flush()  # earlier changes are not this test's messages
    query = PEOPLE.options(selectinload(Person.posts))
    people = fresh(sessions, query)
    sub = rs.subscribe(people, assocs=["posts"])

    write(sa.delete(Person).where(Person.id == 2))
    synced = apply_all(rs, sub, people)

    assert synced is people
    assert [p.id for p in people] == [1, 3]
    assert snapshot(people) == snapshot(fresh(sessions, query))


def test_delete_of_another_row_of_the_same_table_leaves_a_root_object_alone(rs, sessions, write):
    write(Person(id=1, name="a"), Person(id=2, name="b"))
    rs.flush()  # earlier changes are not this test's messages
    person = fresh(sessions, PEOPLE.where(Person.id == 1), many=False)
    sub = rs.subscribe(Person)

    write(sa.delete(Person).where(Person.id == 2))
    [message] = messages(rs, sub)

    assert rs.sync(person, message) is person


def test_updated_root_object_is_patched_in_place(rs, sessions, write):
    write(Person(id=1, name="a"))
    rs.flush()  # earlier changes are not this test's messages
    person = fresh(sessions, PEOPLE, many=False)
    sub = rs.subscribe(person)

    write(sa.update(Person).values(name="b"))
    synced = apply_all(rs, sub, person)

    assert synced is person
    assert person.name == "b"
    assert snapshot(person) == snapshot(fresh(sessions, PEOPLE, many=False))


def test_module_level_sync_uses_the_started_rowsync(rs, sessions, write):
    write(Person(id=1, name="a"))
    rs.flush()  # earlier changes are not this test's messages
    person = fresh(sessions, PEOPLE, many=False)
    sub = rs.subscribe(person)

    write(sa.update(Person).values(name="b"))
    [message] = messages(rs, sub)

    assert rowsync.sync(person, message) is person
    assert person.name == "b"


def test_change_of_a_relationship_that_is_not_loaded_leaves_the_roots_alone(rs, sessions, write):
    write(Person(id=1, name="a"))
    rs.flush()  # earlier changes are not this test's messages
    people = fresh(sessions, PEOPLE)
    sub = rs.subscribe(Post)

    write(Post(id=10, name="p", person_id=1))
    [message] = messages(rs, sub)

    assert isinstance(message[1], Change)
    assert rs.sync(people, message) is people
    assert [p.id for p in people] == [1]
    assert "posts" not in sa.inspect(people[0]).dict  # nothing got loaded on the way


def test_change_of_a_table_unreachable_from_the_roots_leaves_them_alone(rs, sessions, write):
    write(Tag(id=1, name="t"))
    rs.flush()  # earlier changes are not this test's messages
    tags = fresh(sessions, sa.select(Tag))
    sub = rs.subscribe(Person)

    write(Person(id=1, name="a"))
    [message] = messages(rs, sub)

    assert rs.sync(tags, message) is tags
    assert [t.id for t in tags] == [1]


def test_update_delete_or_link_into_none_stays_none(rs, write):
    write(Person(id=1, name="a"), Post(id=10, name="p"), Label(id=1, name="l"))
    rs.flush()
    sub = rs.subscribe(Person).add(posts_labels)

    write(sa.update(Person).values(name="b"))
    write(posts_labels.insert().values(post_id=10, label_id=1))
    write(sa.delete(Person))
    msgs = messages(rs, sub)

    assert [m[1].event for m in msgs] == ["updated", "inserted", "deleted"]
    assert all(rs.sync(None, m) is None for m in msgs)


def test_module_level_sync_without_a_started_rowsync_raises(rs, sessions, write):
    write(Person(id=1, name="a"))
    rs.flush()
    person = fresh(sessions, PEOPLE, many=False)
    sub = rs.subscribe(person)
    write(sa.update(Person).values(name="b"))
    [message] = messages(rs, sub)

    rs.stop()
    with pytest.raises(rowsync.NotRunningError):
        rowsync.sync(person, message)
    assert rowsync.sync("x", (Resync, ResyncInfo("overflow", 0.0))) == "x"


def test_insert_joins_the_roots_even_when_the_tree_already_holds_it_below(rs, sessions, write):
    """Post 12 enters person 1's posts (loaded below root post 10) and the root list:
    one instance in both places, loaded as a root is."""
    write(Person(id=1, name="a"), Post(id=10, name="p", person_id=1))
    rs.flush()
    query = (
        sa.select(Post)
        .order_by(Post.id)
        .options(selectinload(Post.person).selectinload(Person.posts))
    )
    posts = fresh(sessions, query)
    sub = rs.subscribe(posts, assocs=[{"person": ["posts"]}]).add(Post, "inserted", follow=True)

    write(Post(id=12, name="q", person_id=1))
    posts = apply_all(rs, sub, posts)

    assert [p.id for p in posts] == [10, 12]
    assert posts[1] is posts[0].person.posts[1]
    assert snapshot(posts) == snapshot(fresh(sessions, query))


def test_a_filtered_root_list_without_a_rule_gains_no_inserted_row(rs, sessions, write):
    """Post 12 enters person 1's posts, which the roots load; the roots' query (posts named
    "p") does not return it, and rowsync, not knowing that query, must not add it."""
    write(Person(id=1, name="a"), Post(id=10, name="p", person_id=1))
    rs.flush()
    query = (
        sa.select(Post)
        .where(Post.name == "p")
        .options(selectinload(Post.person).selectinload(Person.posts))
    )
    posts = fresh(sessions, query)
    sub = rs.subscribe(posts)

    write(Post(id=12, name="q", person_id=1))
    posts = apply_all(rs, sub, posts)

    assert [p.id for p in posts] == [10]
    assert [p.id for p in posts[0].person.posts] == [10, 12]
    assert snapshot(posts) == snapshot(fresh(sessions, query))


def test_a_followed_filter_is_the_lists_rule_in_and_out(rs, sessions, write):
    write(Person(id=1, name="a"), Person(id=2, name="b"), Post(id=10, name="p", person_id=1))
    rs.flush()
    query = sa.select(Post).where(Post.person_id == 1).order_by(Post.id)
    posts = fresh(sessions, query)
    sub = rs.subscribe(posts).add(Post, follow=True, person_id=1)

    write(Post(id=11, name="q", person_id=1), Post(id=12, name="r", person_id=2))
    write(sa.update(Post).where(Post.id == 10).values(person_id=2))
    posts = apply_all(rs, sub, posts)

    assert [p.id for p in posts] == [11]
    assert snapshot(posts) == snapshot(fresh(sessions, query))
