"""Subscriptions and messages: who receives what, once, and how (SCENARIOS 7 to 11)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import selectinload

import rowsync
from fixtures import messages
from models import Label, Person, Post, PostTag, Profile, Tag, posts_labels
from oracle import fresh
from rowsync import Change, Resync, RowSync, Sync


def seen(msgs: list[Any]) -> list[tuple[str, str, Any]]:
    """``(model name, event, primary key)`` of each message, in order; all must be Syncs."""
    assert all(kind is Sync and isinstance(change, Change) for kind, change in msgs), msgs
    result = []
    for _, change in msgs:
        table = change.model if isinstance(change.model, sa.Table) else change.model.__table__
        key = tuple(change.ids[c.name] for c in table.primary_key.columns)
        result.append((table.name, change.event, key[0] if len(key) == 1 else key))
    return result


def load_person(sessions, *options: Any, id: int = 1) -> Person:
    [person] = fresh(sessions, sa.select(Person).where(Person.id == id).options(*options))
    return person


@pytest.fixture
def people(rs, write) -> None:
    """Two people with posts; post 10 is tagged with tag 1, tag 2 is free. Flushed, so
    none of these inserts reaches a subscription made afterwards."""
    write(
        Person(id=1, name="ann"),
        Person(id=2, name="bob"),
        Tag(id=1, name="one"),
        Tag(id=2, name="two"),
        Post(id=10, name="a", person_id=1),
        Post(id=11, name="b", person_id=1),
        Post(id=20, name="c", person_id=2),
        PostTag(post_id=10, tag_id=1),
    )
    rs.flush()


# -- scenario 7 ------------------------------------------------------------------------


def test_object_subscription_delivers_changes_of_the_object_and_its_loaded_rows_only(
    rs, sessions, write, people
) -> None:
    person = load_person(sessions, selectinload(Person.posts))
    sub = rs.subscribe(person, assocs=["posts"])

    write(sa.update(Person).where(Person.id == 1).values(name="ann2"))
    write(sa.update(Post).where(Post.id == 10).values(body="new"))
    write(sa.delete(Post).where(Post.id == 11))
    write(sa.update(Person).where(Person.id == 2).values(name="bob2"))
    write(sa.update(Post).where(Post.id == 20).values(body="other's"))

    assert seen(messages(rs, sub)) == [
        ("persons", "updated", 1),
        ("posts", "updated", 10),
        ("posts", "deleted", 11),
    ]


def test_deleting_the_subscribed_object_is_delivered(rs, sessions, write, people) -> None:
    person = load_person(sessions, selectinload(Person.posts))
    sub = rs.subscribe(person, assocs=["posts"])

    write(sa.delete(Person).where(Person.id == 1))

    got = seen(messages(rs, sub))
    assert ("persons", "deleted", 1) in got
    assert set(got) <= {
        ("persons", "deleted", 1),
        ("posts", "updated", 10),
        ("posts", "updated", 11),
    }


def test_inserts_into_collections_are_delivered_even_when_not_loaded(
    rs, sessions, write, people
) -> None:
    person = load_person(sessions)  # nothing below it is loaded
    sub = rs.subscribe(person, assocs=["posts", "other_posts", "profile"])

    write(Post(id=30, person_id=1), Post(id=31, other_id=1), Post(id=32, person_id=2), Post(id=33))
    write(Profile(id=1, person_id=2), Profile(id=2, person_id=1))

    assert seen(messages(rs, sub)) == [
        ("posts", "inserted", 30),
        ("posts", "inserted", 31),
        ("profiles", "inserted", 2),
    ]


def test_nested_assocs_follow_links_as_they_come_and_go(rs, sessions, write, people) -> None:
    person = load_person(sessions, selectinload(Person.posts).selectinload(Post.tags))
    sub = rs.subscribe(person, assocs=[{"posts": ["tags"]}])

    write(sa.update(Tag).where(Tag.id == 1).values(name="linked"))
    write(sa.update(Tag).where(Tag.id == 2).values(name="not yet linked"))
    first = seen(messages(rs, sub))
    write(PostTag(post_id=10, tag_id=2))
    write(sa.update(Tag).where(Tag.id == 2).values(name="linked now"))
    write(sa.delete(PostTag).where(PostTag.tag_id == 1))
    write(sa.update(Tag).where(Tag.id == 1).values(name="unlinked"))
    second = seen(messages(rs, sub))

    assert first == [("tags", "updated", 1)]
    assert second == [
        ("post_tags", "inserted", (10, 2)),
        ("tags", "updated", 2),
        ("post_tags", "deleted", (10, 1)),
    ]


def test_many_to_one_assoc_delivers_changes_of_the_parent(rs, sessions, write, people) -> None:
    [post] = fresh(
        sessions, sa.select(Post).where(Post.id == 10).options(selectinload(Post.person))
    )
    sub = rs.subscribe(post, assocs=["person"])

    write(sa.update(Person).where(Person.id == 1).values(name="parent renamed"))
    write(sa.update(Person).where(Person.id == 2).values(name="someone else"))

    assert seen(messages(rs, sub)) == [("persons", "updated", 1)]


def test_subscribing_a_list_covers_each_object(rs, sessions, write, people) -> None:
    everyone = fresh(sessions, sa.select(Person).order_by(Person.id))
    sub = rs.subscribe(everyone)

    write(sa.update(Person).values(name="all renamed"))

    assert sorted(seen(messages(rs, sub))) == [("persons", "updated", 1), ("persons", "updated", 2)]


# -- scenario 8 ------------------------------------------------------------------------


def test_subscribing_twice_to_the_same_thing_delivers_each_change_once(
    rs, sessions, write, people
) -> None:
    person = load_person(sessions, selectinload(Person.posts))
    same_row = load_person(sessions, selectinload(Person.posts))
    sub = rs.subscribe(person, assocs=["posts"])
    sub.add(person, assocs=["posts"])
    sub.add(same_row, assocs=["posts"])

    write(sa.update(Post).where(Post.id == 10).values(body="once"))
    write(Post(id=12, person_id=1))

    assert seen(messages(rs, sub)) == [("posts", "updated", 10), ("posts", "inserted", 12)]


def test_overlapping_interests_of_one_subscription_deliver_each_change_once(
    rs, sessions, write, people
) -> None:
    person = load_person(sessions, selectinload(Person.posts).selectinload(Post.tags))
    sub = rs.subscribe(person, assocs=["posts"])
    sub.add(person, assocs=[{"posts": ["tags"]}, "other_posts"])
    sub.add(Post)
    sub.add(Post, "inserted", person_id=1)

    write(Post(id=12, person_id=1, other_id=1))  # in both of person 1's collections
    write(sa.update(Post).where(Post.id == 10).values(other_id=1))
    write(Post(id=21, person_id=2))

    assert seen(messages(rs, sub)) == [
        ("posts", "inserted", 12),
        ("posts", "updated", 10),
        ("posts", "inserted", 21),
    ]


def test_separate_subscriptions_each_receive_a_change_once(rs, sessions, write, people) -> None:
    person = load_person(sessions, selectinload(Person.posts))
    by_tree = rs.subscribe(person, assocs=["posts"])
    by_model = rs.subscribe(Post)
    by_filter = rs.subscribe(Post, person_id=1)

    write(sa.update(Post).where(Post.id == 10).values(body="x"))
    rs.flush()

    for sub in (by_tree, by_model, by_filter):
        assert seen(sub.drain()) == [("posts", "updated", 10)]


# -- scenario 9 ------------------------------------------------------------------------


def test_model_subscription_to_inserts_gives_one_message_per_inserted_row(rs, write) -> None:
    sub = rs.subscribe(Post, "inserted")

    write(sa.insert(Post).values([{"id": i} for i in range(1, 6)]))
    for i in range(6, 9):
        write(Post(id=i))
    write(sa.update(Post).values(body="not an insert"))
    write(sa.delete(Post).where(Post.id > 4))

    assert seen(messages(rs, sub)) == [("posts", "inserted", i) for i in range(1, 9)]


def test_model_subscription_without_event_gets_every_event(rs, write) -> None:
    sub = rs.subscribe(Tag)

    write(Tag(id=1, name="a"))
    write(sa.update(Tag).values(name="b"))
    write(sa.delete(Tag))

    assert seen(messages(rs, sub)) == [
        ("tags", "inserted", 1),
        ("tags", "updated", 1),
        ("tags", "deleted", 1),
    ]


def test_model_subscription_filters_on_identifying_columns(rs, write, people) -> None:
    hers = rs.subscribe(Post, "inserted", person_id=2)
    both = rs.subscribe(Post, "inserted", person_id=2, other_id=1)

    write(
        Post(id=30, person_id=1),
        Post(id=31, person_id=2),
        Post(id=32, person_id=2, other_id=1),
        Post(id=33),
    )
    rs.flush()

    assert seen(hers.drain()) == [("posts", "inserted", 31), ("posts", "inserted", 32)]
    assert seen(both.drain()) == [("posts", "inserted", 32)]


def test_filtered_update_subscription_sees_rows_moving_in_and_out(rs, write, people) -> None:
    sub = rs.subscribe(Post, "updated", person_id=2)

    write(sa.update(Post).where(Post.id == 10).values(person_id=2))
    write(sa.update(Post).where(Post.id == 20).values(person_id=1))
    write(sa.update(Post).where(Post.id == 11).values(body="stays with person 1"))

    assert seen(messages(rs, sub)) == [("posts", "updated", 10), ("posts", "updated", 20)]


def test_model_subscription_to_a_plain_association_table(rs, write, people) -> None:
    sub = rs.subscribe(posts_labels, "inserted")

    write(Label(id=1, name="l"))
    write(sa.insert(posts_labels).values(post_id=10, label_id=1))

    [(_, change)] = messages(rs, sub)
    assert change.model is posts_labels
    assert change.ids == {"post_id": 10, "label_id": 1}


# -- scenario 10 -----------------------------------------------------------------------


def test_subscriptions_are_listed_until_closed(rs, sessions, people) -> None:
    person = load_person(sessions)
    first = rs.subscribe(Post)
    second = rs.subscribe(person, assocs=["posts"])

    listed = set(rs.subscriptions())
    first.close()

    assert listed == {first, second}
    assert rs.subscriptions() == [second]
    assert first.closed and not second.closed


def test_unsubscribing_stops_inserts_and_updates(rs, sessions, write, people) -> None:
    person = load_person(sessions, selectinload(Person.posts))
    tree = rs.subscribe(person, assocs=["posts"])
    model = rs.subscribe(Post)
    kept = rs.subscribe(Post)

    write(Post(id=12, person_id=1))
    rs.flush()
    tree.close()
    model.close()
    write(Post(id=13, person_id=1))
    write(sa.update(Post).where(Post.id == 10).values(body="after close"))
    write(sa.update(Person).where(Person.id == 1).values(name="after close"))
    rs.flush()

    assert seen(tree.drain()) == [("posts", "inserted", 12)]  # queued before close: still readable
    assert seen(model.drain()) == [("posts", "inserted", 12)]
    assert seen(kept.drain()) == [
        ("posts", "inserted", 12),
        ("posts", "inserted", 13),
        ("posts", "updated", 10),
    ]
    assert rs.subscriptions() == [kept]


def test_subscription_used_as_context_manager_is_closed_on_exit(rs, write) -> None:
    with rs.subscribe(Post) as sub:
        assert rs.subscriptions() == [sub]
    write(Post(id=1))
    rs.flush()

    assert rs.subscriptions() == []
    assert sub.drain() == []


# -- scenario 11 -----------------------------------------------------------------------


def test_message_is_sync_and_a_change_with_primary_key_and_identifying_columns(
    rs, write, people
) -> None:
    sub = rs.subscribe(Post)

    write(Post(id=30, name="n", body="b", person_id=1, other_id=2))
    [message] = messages(rs, sub)

    kind, change = message
    assert kind is Sync
    assert isinstance(change, Change)
    assert change == Change(Post, "inserted", {"id": 30, "other_id": 2, "person_id": 1}, change.ref)
    assert type(change.ids["id"]) is int and type(change.ref) is int


def test_ids_hold_new_values_after_an_update_and_old_values_for_a_delete(rs, write, people) -> None:
    sub = rs.subscribe(Post)

    write(sa.update(Post).where(Post.id == 10).values(person_id=2, other_id=1))
    write(sa.delete(Post).where(Post.id == 10))
    updated, deleted = (change for _, change in messages(rs, sub))

    assert (updated.event, updated.ids) == ("updated", {"id": 10, "person_id": 2, "other_id": 1})
    assert (deleted.event, deleted.ids) == ("deleted", {"id": 10, "person_id": 2, "other_id": 1})


def test_composite_primary_key_is_in_the_ids(rs, write, people) -> None:
    sub = rs.subscribe(PostTag)

    write(PostTag(post_id=20, tag_id=2))

    [(_, change)] = messages(rs, sub)
    assert change.model is PostTag and change.ids == {"post_id": 20, "tag_id": 2}


def test_ref_is_unique_per_change_and_grows_with_each_change_of_a_row(rs, write, people) -> None:
    sub = rs.subscribe(Post)

    write(sa.update(Post).values(body="all rows, one statement"))
    for i in range(3):
        write(sa.update(Post).where(Post.id == 10).values(body=str(i)))
    write(sa.delete(Post).where(Post.id == 10))
    changes = [change for _, change in messages(rs, sub)]

    refs = [c.ref for c in changes]
    assert len(changes) == 3 + 3 + 1
    assert len(set(refs)) == len(refs)
    of_post_10 = [c.ref for c in changes if c.ids["id"] == 10]
    assert len(of_post_10) == 5 and of_post_10 == sorted(of_post_10)


# -- consuming -------------------------------------------------------------------------


def test_blocking_iteration_from_a_plain_thread_receives_messages(rs, write) -> None:
    sub = rs.subscribe(Post)
    got: list[Any] = []

    def consume() -> None:
        for message in sub:
            got.append(message)
            if len(got) == 2:
                return

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    write(Post(id=1))
    write(Post(id=2))
    consumer.join(10)

    assert not consumer.is_alive()
    assert seen(got) == [("posts", "inserted", 1), ("posts", "inserted", 2)]


def test_blocking_iteration_ends_when_the_subscription_is_closed(rs) -> None:
    sub = rs.subscribe(Post)
    got: list[Any] = []
    consumer = threading.Thread(target=lambda: got.extend(sub), daemon=True)
    consumer.start()

    sub.close()
    consumer.join(10)

    assert not consumer.is_alive()
    assert got == []


def test_asyncio_consumers_receive_the_same_messages(rs, write) -> None:
    async def consume() -> tuple[Any, list[Any], list[Any]]:
        async with rs.subscribe(Post) as sub:
            await asyncio.to_thread(write, Post(id=1))
            first = await sub.aget(timeout=10)
            await asyncio.to_thread(write, Post(id=2), Post(id=3))
            rest = []
            async for message in sub:
                rest.append(message)
                if len(rest) == 2:
                    break
            try:
                await sub.aget(timeout=0.05)
            except TimeoutError as exc:
                timed_out = [exc]
            else:
                timed_out = []
        return first, rest, timed_out

    first, rest, timed_out = asyncio.run(consume())

    assert seen([first, *rest]) == [("posts", "inserted", i) for i in (1, 2, 3)]
    assert len(timed_out) == 1


def test_async_iteration_ends_when_the_subscription_is_closed(rs) -> None:
    async def consume() -> list[Any]:
        sub = rs.subscribe(Post)
        got: list[Any] = []

        async def iterate() -> None:
            async for message in sub:
                got.append(message)

        task = asyncio.create_task(iterate())
        await asyncio.sleep(0)  # let it start waiting
        sub.close()
        await asyncio.wait_for(task, 10)
        return got

    assert asyncio.run(consume()) == []


def test_get_raises_timeout_error_when_nothing_comes(rs, write) -> None:
    sub = rs.subscribe(Post)
    write(Tag(id=1))
    rs.flush()

    with pytest.raises(TimeoutError):
        sub.get(timeout=0.05)


def test_get_returns_a_message_that_is_queued(rs, write) -> None:
    sub = rs.subscribe(Post)
    write(Post(id=1))
    rs.flush()

    assert seen([sub.get(timeout=5)]) == [("posts", "inserted", 1)]
    assert len(sub) == 0


# -- backpressure ----------------------------------------------------------------------


def test_slow_subscriber_gets_a_bounded_queue_starting_with_an_overflow_resync(rs, write) -> None:
    slow = rs.subscribe(Post, maxsize=5)
    fast = rs.subscribe(Post)

    for i in range(1, 21):
        write(Post(id=i))
    rs.flush()  # returns: the listener is never blocked by the slow subscriber

    queued = slow.drain()
    assert 2 <= len(queued) <= 5
    kind, info = queued[0]
    assert kind is Resync and info.reason == "overflow"
    assert seen(queued[1:])[-1] == ("posts", "inserted", 20)
    assert slow.overflows >= 1
    assert seen(fast.drain()) == [("posts", "inserted", i) for i in range(1, 21)]


def test_queue_size_is_the_default_bound_of_every_subscription(schema, write) -> None:
    rs = RowSync(schema, rowsync.watchers(Tag), queue_size=3)
    rs.install()
    with rs:
        sub = rs.subscribe(Tag)
        write(*[Tag(id=i) for i in range(1, 11)])
        rs.flush()

    queued = sub.drain()
    assert len(queued) <= 3 and queued[0][0] is Resync
