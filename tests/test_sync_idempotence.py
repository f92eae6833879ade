"""Scenario 20: applying a message twice is a no-op, successive updates end on the latest
values, an older message never overwrites a newer one; and patching leaves a live session
with nothing to flush."""

import sqlalchemy as sa
from sqlalchemy.orm import selectinload

from fixtures import apply_all, counting_queries, messages, sync_each
from models import Person, Post, PostTag, Tag
from oracle import fresh, snapshot

TREE = (
    sa.select(Person)
    .order_by(Person.id)
    .options(selectinload(Person.posts).selectinload(Post.tags))
)


def seed(rs, write):
    write(
        Person(id=1, name="a"),
        Person(id=2, name="b"),
        Tag(id=1, name="t1"),
        Tag(id=2, name="t2"),
        Post(id=10, name="p", person_id=1),
        PostTag(post_id=10, tag_id=1),
    )
    rs.flush()


def test_same_messages_applied_twice_change_nothing_the_second_time(rs, sessions, write):
    seed(rs, write)
    people = fresh(sessions, TREE)
    sub = rs.subscribe(people, assocs=[{"posts": ["tags"]}]).add(Person, "inserted", follow=True)

    write(Post(id=20, name="q", person_id=1))
    write(PostTag(post_id=10, tag_id=2), PostTag(post_id=20, tag_id=1))
    write(sa.update(Tag).where(Tag.id == 1).values(name="renamed"))
    write(sa.delete(PostTag).where(PostTag.post_id == 10, PostTag.tag_id == 1))
    write(Person(id=3, name="c"))
    msgs = messages(rs, sub)
    people = sync_each(rs, people, msgs)
    once = snapshot(people)
    assert once == snapshot(fresh(sessions, TREE))

    for message in msgs:
        people = rs.sync(people, message)
        assert snapshot(people) == once


def test_insert_applied_twice_adds_one_object(rs, sessions, write):
    seed(rs, write)
    people = fresh(sessions, TREE)
    sub = rs.subscribe(people, assocs=[{"posts": ["tags"]}])

    write(Post(id=20, name="q", person_id=1))
    [message] = messages(rs, sub)
    for _ in range(3):
        people = rs.sync(people, message)

    assert [p.id for p in people[0].posts] == [10, 20]


def test_root_insert_applied_twice_adds_one_root(rs, sessions, write):
    seed(rs, write)
    people = fresh(sessions, TREE)
    sub = rs.subscribe(people).add(Person, "inserted", follow=True)

    write(Person(id=3, name="c"))
    [message] = messages(rs, sub)
    people = rs.sync(rs.sync(people, message), message)

    assert [p.id for p in people] == [1, 2, 3]
    assert snapshot(people) == snapshot(fresh(sessions, TREE))


def test_link_applied_twice_adds_one_tag(rs, sessions, write):
    seed(rs, write)
    people = fresh(sessions, TREE)
    sub = rs.subscribe(people, assocs=[{"posts": ["tags"]}])

    write(PostTag(post_id=10, tag_id=2))
    [message] = messages(rs, sub)
    people = rs.sync(rs.sync(people, message), message)

    assert [t.id for t in people[0].posts[0].tags] == [1, 2]


def test_delete_applied_twice_is_harmless(rs, sessions, write):
    seed(rs, write)
    people = fresh(sessions, TREE)
    sub = rs.subscribe(people, assocs=[{"posts": ["tags"]}])

    write(sa.delete(Person).where(Person.id == 2))
    [message] = messages(rs, sub)
    people = rs.sync(rs.sync(people, message), message)

    assert [p.id for p in people] == [1]


def test_two_successive_updates_in_order_give_the_latest_values(rs, sessions, write):
    seed(rs, write)
    people = fresh(sessions, TREE)
    sub = rs.subscribe(people, assocs=[{"posts": ["tags"]}])

    write(sa.update(Post).where(Post.id == 10).values(name="first", body="one"))
    rs.flush()  # the second update in its own batch: the first one's row is its own
    write(sa.update(Post).where(Post.id == 10).values(name="second"))
    people = apply_all(rs, sub, people)

    assert (people[0].posts[0].name, people[0].posts[0].body) == ("second", "one")
    assert snapshot(people) == snapshot(fresh(sessions, TREE))


def test_older_update_applied_after_a_newer_one_does_not_overwrite(rs, sessions, write):
    seed(rs, write)
    people = fresh(sessions, TREE)
    sub = rs.subscribe(people, assocs=[{"posts": ["tags"]}])

    write(sa.update(Post).where(Post.id == 10).values(name="first"))
    [older] = messages(rs, sub)
    write(sa.update(Post).where(Post.id == 10).values(name="second"))
    [newer] = messages(rs, sub)
    assert older[1].ref < newer[1].ref

    people = rs.sync(rs.sync(people, newer), older)

    assert people[0].posts[0].name == "second"
    assert snapshot(people) == snapshot(fresh(sessions, TREE))


def test_older_update_of_a_root_applied_late_does_not_overwrite(rs, sessions, write):
    seed(rs, write)
    person = fresh(sessions, TREE, many=False)
    sub = rs.subscribe(person)

    write(sa.update(Person).where(Person.id == 1).values(name="first"))
    [older] = messages(rs, sub)
    write(sa.update(Person).where(Person.id == 1).values(name="second"))
    [newer] = messages(rs, sub)

    person = rs.sync(rs.sync(person, newer), older)

    assert person.name == "second"


# -- patching is not a modification --------------------------------------------------------


def test_patching_a_tree_in_a_live_session_leaves_nothing_to_flush(rs, sessions, write):
    seed(rs, write)
    with sessions() as session:
        people = session.scalars(TREE).all()
        sub = rs.subscribe(people, assocs=[{"posts": ["tags"]}])

        write(sa.update(Person).where(Person.id == 1).values(name="renamed"))
        write(sa.update(Post).where(Post.id == 10).values(body="new body"))
        write(sa.update(Tag).where(Tag.id == 1).values(name="renamed"))
        write(Post(id=20, name="q", person_id=1), PostTag(post_id=20, tag_id=2))
        write(sa.delete(PostTag).where(PostTag.post_id == 10))
        people = apply_all(rs, sub, list(people))

        assert people[0].name == "renamed"
        assert [p.id for p in people[0].posts] == [10, 20]
        assert not session.dirty
        assert not session.new
        assert not session.deleted
        with counting_queries(rs.engine) as statements:
            session.flush()
        assert statements == []
        assert not any(sa.inspect(obj).modified for obj in session.identity_map.values())
    assert snapshot(people) == snapshot(fresh(sessions, TREE))


def test_commit_after_patching_writes_nothing(rs, sessions, write):
    seed(rs, write)
    with sessions() as session:
        person = session.scalars(TREE).first()
        sub = rs.subscribe(person, assocs=[{"posts": ["tags"]}])

        write(sa.update(Person).where(Person.id == 1).values(name="renamed"))
        person = apply_all(rs, sub, person)

        with counting_queries(rs.engine) as statements:
            session.commit()
        assert not [
            s for s in statements if s.lstrip().upper().startswith(("UPDATE", "INSERT", "DELETE"))
        ]
