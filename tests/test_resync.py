"""The gap signal: a reconnect or an overflow is announced by (Resync, info), and
rs.resync(tree) brings the tree back to what a fresh query gives."""

import sqlalchemy as sa
from sqlalchemy.orm import selectinload

import rowsync
from fixtures import apply_all
from models import Person, Post, PostTag, Tag
from oracle import fresh, snapshot


def test_resync_rereads_what_the_tree_holds(rs, sessions, write):
    write(
        Person(id=1, name="a"),
        Person(id=2, name="b"),
        Tag(id=1, name="t"),
        Post(id=10, person_id=1),
    )
    query = sa.select(Person).options(selectinload(Person.posts).selectinload(Post.tags))
    people = fresh(sessions, query)

    # Changes nobody was told about (as if sent while the listener was away).
    write(sa.update(Person).where(Person.id == 1).values(name="renamed"), Post(id=11, person_id=1))
    write(sa.delete(Person).where(Person.id == 2))

    same_list = people
    people = rs.resync(people)

    assert people is same_list
    assert snapshot(people) == snapshot(fresh(sessions, query))
    assert [p.name for p in people] == ["renamed"]


def test_resync_of_a_deleted_single_object_is_none(rs, sessions, write):
    write(Person(id=1, name="a"))
    person = fresh(sessions, sa.select(Person), many=False)
    write(sa.delete(Person))
    assert rs.resync(person) is None
    assert rs.resync(None) is None


def test_an_overflowing_subscription_is_told_to_resync(rs, sessions, write):
    write(Person(id=1, name="a"))
    person = fresh(sessions, sa.select(Person), many=False)
    sub = rs.subscribe(person, maxsize=2)
    for name in "bcdef":
        write(sa.update(Person).values(name=name))
    rs.flush()
    messages = sub.drain()
    assert messages[0][0] is rowsync.Resync and messages[0][1].reason == "overflow"
    person = rs.resync(person)
    assert person.name == "f"


def test_a_batch_that_cannot_be_dispatched_is_announced_and_the_listener_goes_on(
    rs, sessions, write, monkeypatch
):
    write(Person(id=1, name="a"))
    rs.flush()  # the insert is behind us
    sub = rs.subscribe(Person)
    route = rs.router.route

    def broken(*args, **kwargs):
        monkeypatch.setattr(rs.router, "route", route)  # fails once, then works again
        raise RuntimeError("boom")

    monkeypatch.setattr(rs.router, "route", broken)
    write(sa.update(Person).values(name="b"))
    rs.flush()
    write(sa.update(Person).values(name="c"))
    rs.flush()

    kinds = [(kind, getattr(info, "reason", None) or info.event) for kind, info in sub.drain()]
    assert kinds == [
        (rowsync.Resync, "a batch of changes could not be dispatched"),
        (rowsync.Sync, "updated"),
    ]
    assert rs.listener.stats["batch_errors"] == 1


def unseen(engine: sa.Engine, *statements: sa.Executable) -> None:
    """Write with the session's triggers off: a change the stream never carried."""
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        for statement in statements:
            conn.execute(statement)


def test_rows_a_resync_brings_in_are_followed_from_then_on(rs, schema, sessions, write):
    write(Person(id=1, name="a"), Tag(id=1, name="t"), Post(id=10, name="p", person_id=1))
    query = sa.select(Person).options(selectinload(Person.posts).selectinload(Post.tags))
    people = fresh(sessions, query)
    sub = rs.subscribe(people)
    unseen(schema, sa.insert(Post).values(id=11, name="missed", person_id=1))

    people = rs.resync(people)
    write(sa.insert(PostTag).values(post_id=11, tag_id=1))  # below the row resync brought in
    people = apply_all(rs, sub, people)

    assert [t.id for t in people[0].posts[1].tags] == [1]
    assert snapshot(people) == snapshot(fresh(sessions, query))


def test_a_resynced_single_object_is_followed_in_its_new_instance(rs, sessions, write):
    write(Person(id=1, name="a"), Post(id=10, name="p", person_id=1))
    query = sa.select(Person).options(selectinload(Person.posts))
    person = fresh(sessions, query, many=False)
    sub = rs.subscribe(person)

    person = rs.resync(person)
    write(sa.update(Post).where(Post.id == 10).values(name="renamed"))
    person = apply_all(rs, sub, person)

    assert person.posts[0].name == "renamed"


def test_a_followed_insert_still_queued_at_a_resync_is_followed_after_it(rs, sessions, write):
    """The router registered row 2 when its insert was dispatched; the resync happens before
    that message is applied. Its later delete must still arrive (no ghost root)."""
    write(Person(id=1, name="a"))
    rs.flush()
    query = sa.select(Person).order_by(Person.id)
    people = fresh(sessions, query)
    sub = rs.subscribe(people).add(Person, "inserted", follow=True)

    write(Person(id=2, name="b"))
    rs.flush()  # dispatched and queued, not applied yet
    people = rs.resync(people)
    write(sa.delete(Person).where(Person.id == 2))
    people = apply_all(rs, sub, people)

    assert [p.id for p in people] == [1]
