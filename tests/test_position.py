"""``rs.position()`` / ``subscribe(..., since=position)``: what commits between a load and its
subscription reaches the tree, decided by transaction visibility, in every capture mode; and
what can no longer be replayed is announced with a Resync, never missed silently."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload, sessionmaker

from fixtures import apply_all, messages, reference_watchers, sync_each
from models import Person, Post
from oracle import differences, fresh, snapshot
from rowsync import Resync, RowSync, Sync
from rowsync.position import NOWHERE, Journal, Position, widen
from rowsync.testing import one_batch

PEOPLE = sa.select(Person).options(selectinload(Person.posts)).order_by(Person.id)


@pytest.fixture
def seeded(moded: RowSync, write) -> RowSync:
    write(Person(id=1, name="a"), Post(id=10, name="p", person_id=1))
    moded.flush()
    return moded


def test_a_write_between_load_and_subscribe_reaches_the_tree(seeded, sessions, write):
    rs = seeded
    position = rs.position()
    people = fresh(sessions, PEOPLE)
    write(Post(id=11, name="q", person_id=1))
    write(sa.update(Post).where(Post.id == 10).values(name="renamed"))
    rs.flush()  # dispatched before the subscription exists

    sub = rs.subscribe(people, assocs=["posts"], since=position)
    people = apply_all(rs, sub, people)

    assert [p.name for p in people[0].posts] == ["renamed", "q"]
    assert not differences(snapshot(people), snapshot(fresh(sessions, PEOPLE)))


def test_what_committed_before_the_position_is_not_replayed(seeded, sessions, write):
    rs = seeded
    write(sa.update(Post).where(Post.id == 10).values(name="before"))
    rs.flush()
    position = rs.position()
    people = fresh(sessions, PEOPLE)

    sub = rs.subscribe(people, assocs=["posts"], since=position)

    assert messages(rs, sub) == []


def test_a_change_the_position_saw_dispatched_after_the_subscription_is_not_queued(
    seeded, sessions, write
):
    """Dispatched late (the listener behind, or a slot sending it again), a change the
    tree's position saw is in the tree: patched in again, it would take the tree back to
    its row (in ``wal`` mode, the row as of that commit) until the changes after it came."""
    rs = seeded
    posts = sa.update(Post).where(Post.id == 10)
    with one_batch(rs):  # received, then dispatched only once the tree is subscribed
        write(posts.values(name="first"))
        write(posts.values(name="second"))
        position = rs.position()
        people = fresh(sessions, PEOPLE)
        sub = rs.subscribe(people, assocs=["posts"], since=position)
    assert messages(rs, sub) == []
    write(posts.values(name="third"))
    people = apply_all(rs, sub, people)
    assert [p.name for p in people[0].posts] == ["third"]
    assert not differences(snapshot(people), snapshot(fresh(sessions, PEOPLE)))


def test_a_tree_subscribed_without_a_position_gets_what_came_before_it(seeded, sessions, write):
    rs = seeded
    with one_batch(rs):
        write(sa.update(Post).where(Post.id == 10).values(name="late"))
        position = rs.position()
        sub = rs.subscribe(fresh(sessions, PEOPLE), assocs=["posts"], since=position)
        sub.add(fresh(sessions, PEOPLE)[0])  # no position: nothing may be skipped for it
    assert [kind for kind, _ in messages(rs, sub)] == [Sync]


def test_a_transaction_in_progress_at_the_position_is_replayed_once_committed(
    seeded, sessions, schema
):
    rs = seeded
    with schema.connect() as writer:
        writer.execute(sa.update(Post).where(Post.id == 10).values(name="in flight"))
        position = rs.position()  # the writer's transaction is in its snapshot's in-progress list
        writer.commit()
    people = fresh(sessions, PEOPLE)  # already sees it
    rs.flush()

    sub = rs.subscribe(people, assocs=["posts"], since=position)
    found = messages(rs, sub)

    assert [(m[0], m[1].event, m[1].ids["id"]) for m in found] == [(Sync, "updated", 10)]
    people = apply_all(rs, sub, people)
    assert not differences(snapshot(people), snapshot(fresh(sessions, PEOPLE)))


def test_a_position_taken_on_a_repeatable_read_session_is_its_snapshot(
    seeded, schema, sessions, write
):
    rs = seeded
    with Session(schema, expire_on_commit=False) as session:
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        session.execute(sa.select(1))  # the transaction's snapshot is taken here
        write(sa.update(Post).where(Post.id == 10).values(name="unseen by the load"))
        rs.flush()
        position = rs.position(session)
        people = list(session.scalars(PEOPLE).unique())
        assert people[0].posts[0].name == "p"
    sub = rs.subscribe(people, assocs=["posts"], since=position)
    found = messages(rs, sub)
    people = sync_each(rs, people, found)

    assert people[0].posts[0].name == "unseen by the load"


def test_a_position_older_than_what_rowsync_remembers_starts_with_a_resync(schema, write):
    rs = RowSync(schema, reference_watchers(), replay_size=2)
    rs.install()
    with rs:
        write(Person(id=1, name="a"))
        rs.flush()
        position = rs.position()
        sessions = sessionmaker(schema, expire_on_commit=False)
        people = fresh(sessions, PEOPLE)
        for i in range(3):
            write(Post(id=20 + i, name="x", person_id=1))
        rs.flush()

        sub = rs.subscribe(people, assocs=["posts"], since=position)

        assert messages(rs, sub)[0][0] is Resync


def test_a_gap_after_the_position_starts_with_a_resync(seeded, sessions):
    rs = seeded
    position = rs.position()
    people = fresh(sessions, PEOPLE)
    rs.dispatcher.gap("test: the stream lost something")

    sub = rs.subscribe(people, assocs=["posts"], since=position)

    assert [m[0] for m in messages(rs, sub)] == [Resync]


def test_a_model_subscription_replays_inserts_after_the_position(seeded, write):
    rs = seeded
    position = rs.position()
    write(Post(id=12, name="new", person_id=1))
    rs.flush()

    sub = rs.subscribe(Post, "inserted", since=position)

    assert [(m[1].event, m[1].ids["id"]) for m in messages(rs, sub)] == [("inserted", 12)]


def test_a_restart_after_the_position_starts_with_a_resync(seeded, sessions):
    rs = seeded
    position = rs.position()
    people = fresh(sessions, PEOPLE)
    rs.stop()
    rs.start()

    sub = rs.subscribe(people, assocs=["posts"], since=position)

    kinds = [m[0] for m in messages(rs, sub)]  # the restart may announce its own gap too
    assert kinds and set(kinds) == {Resync}


# -- the journal's arithmetic, without a database ---------------------------------------------


def journal_of(size: int, *xids: int) -> Journal[int]:
    journal: Journal[int] = Journal(size, lambda xid: xid)
    journal.resume(Position.of("100:100:"))
    for xid in xids:
        journal.add(xid)
    return journal


def test_an_earlier_snapshot_replays_what_it_did_not_see_in_delivery_order():
    journal = journal_of(10, 101, 103, 102, 104)
    # taken while 102 was running and before 103 began
    assert journal.since(Position.of("102:103:102")) == [103, 102, 104]


def test_an_earlier_snapshot_resyncs_once_something_it_did_not_see_was_dropped():
    journal = journal_of(2, 101, 102, 103)  # 101 dropped
    assert journal.since(Position.of("103:103:")) == [103]  # saw 102, so 101 before it
    assert journal.since(Position.of("102:102:")) is None  # 101 may be unseen too


def test_an_earlier_snapshot_resyncs_when_it_misses_what_a_gap_lost():
    journal = journal_of(10, 101)
    journal.interrupt()
    journal.resume(Position.of("105:108:106"))  # lost: anything 105 and below, and 107
    assert journal.since(Position.of("105:106:")) is None  # did not see 107
    assert journal.since(Position.of("106:110:106,109")) == []  # saw all the gap lost


def test_the_meet_of_two_positions_saw_what_both_saw():
    a, b = Position.of("100:110:103,105"), Position.of("102:108:104,106")
    meet = a.meet(b)
    assert [x for x in range(95, 115) if meet.saw(x)] == [
        x for x in range(95, 115) if a.saw(x) and b.saw(x)
    ]
    assert not any(NOWHERE.meet(a).saw(x) for x in range(0, 200))


EPOCH = 1 << 32


@pytest.mark.parametrize(
    ("xid", "near", "full"),
    [
        (5, 9, 5),
        (EPOCH - 3, EPOCH + 2, EPOCH - 3),  # decoded just before the boundary, seen after it
        (2, EPOCH - 3, EPOCH + 2),  # just after the boundary, near one before it
        (7, 3 * EPOCH + 100, 3 * EPOCH + 7),
        (EPOCH - 1, 3 * EPOCH + 5, 3 * EPOCH - 1),
        (EPOCH - 1, 5, EPOCH - 1),  # epoch 0 has no epoch before it
    ],
)
def test_a_32_bit_xid_widens_to_the_nearest_64_bit_one(xid, near, full):
    assert widen(xid, near) == full
