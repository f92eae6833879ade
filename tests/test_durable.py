"""Durable mode and ``capture="stream"``: the change log, read from the listener's position.

NOTIFY alone is at-most-once; in these modes nothing committed is lost to a reconnect, a
restart of the listener, or a restart under the same consumer name.
"""

from __future__ import annotations

import pytest

from fixtures import reference_watchers, terminate_listener
from models import Person, Post
from rowsync import Resync, RowSync, Sync

MODES = [
    pytest.param({"capture": "durable"}, id="durable"),
    pytest.param({"capture": "stream"}, id="stream"),
]


@pytest.fixture(params=MODES)
def logged(request, schema):
    rs = RowSync(schema, reference_watchers(), **request.param)
    rs.install()
    with rs:
        yield rs


def test_changes_are_delivered_from_the_log(logged, write) -> None:
    sub = logged.subscribe(Post, "inserted")
    write(Person(id=1, name="a"), Post(id=1, person_id=1), Post(id=2, person_id=1))
    logged.flush()
    got = [(kind, change.ids["id"]) for kind, change in sub.drain()]
    assert got == [(Sync, 1), (Sync, 2)]


def test_changes_committed_while_the_listener_is_disconnected_arrive_after_it_reconnects(
    logged, write
) -> None:
    sub = logged.subscribe(Post)
    write(Person(id=1, name="a"))
    logged.flush()
    logged.listener.stop()  # nobody listens: NOTIFY would lose what follows
    write(Post(id=1, person_id=1), Post(id=2, person_id=1))
    logged.listener.start()
    logged.flush()
    messages = sub.drain()
    assert [(kind, c.event, c.ids["id"]) for kind, c in messages] == [
        (Sync, "inserted", 1),
        (Sync, "inserted", 2),
    ]


def test_terminated_listener_connection_loses_nothing_and_announces_no_gap(logged, write) -> None:
    sub = logged.subscribe(Post)
    write(Person(id=1, name="a"))
    logged.flush()
    terminate_listener(logged)
    write(Post(id=1, person_id=1))
    logged.flush()
    assert [(kind, c.ids["id"]) for kind, c in sub.drain()] == [(Sync, 1)]
    assert logged.listener.stats["gaps"] == 0


def test_a_smaller_id_committed_after_a_larger_one_is_not_skipped(logged, schema) -> None:
    """The classic trap: log ids are taken at insert, rows appear at commit."""
    sub = logged.subscribe(Person)
    with logged.connect() as slow, logged.connect() as fast:
        slow.execute("INSERT INTO persons (id, name) VALUES (1, 'slow')")  # takes the smaller id
        fast.execute("INSERT INTO persons (id, name) VALUES (2, 'fast')")
        fast.commit()
        logged.flush()  # the listener has read past the larger id
        slow.commit()
    logged.flush()
    assert sorted(c.ids["id"] for _, c in sub.drain()) == [1, 2]


def test_restarted_process_resumes_from_its_saved_position(schema, write) -> None:
    first = RowSync(schema, reference_watchers(), capture="durable", consumer="worker-1")
    first.install()
    with first:
        write(Person(id=1, name="seen by the first process"))
        first.flush()
    write(Person(id=2, name="committed while no process ran"))
    second = RowSync(schema, reference_watchers(), capture="durable", consumer="worker-1")
    sub = second.subscribe(Person)
    with second:
        second.flush()
    assert [(kind, c.ids["id"]) for kind, c in sub.drain()] == [(Sync, 2)]


def test_without_a_consumer_name_a_new_process_starts_from_now(schema, write) -> None:
    first = RowSync(schema, reference_watchers(), capture="durable")
    first.install()
    with first:
        write(Person(id=1, name="a"))
        first.flush()
    second = RowSync(schema, reference_watchers(), capture="durable")
    sub = second.subscribe(Person)
    with second:
        second.flush()
    assert sub.drain() == []


def test_old_position_pruned_past_is_announced_as_a_gap(schema, write) -> None:
    rs = RowSync(schema, reference_watchers(), capture="durable", consumer="late", retention=0)
    rs.install()
    with rs:
        write(Person(id=1, name="a"))
        rs.flush()
    write(Person(id=2, name="b"))
    with rs.connect(autocommit=True) as conn:
        conn.execute("SELECT rowsync.prune_log(interval '0')")
    again = RowSync(schema, reference_watchers(), capture="durable", consumer="late")
    with again:
        again.flush()
        assert again.listener.stats["gaps"] == 1


def test_a_start_against_triggers_of_another_mode_warns(schema, caplog) -> None:
    RowSync(schema, reference_watchers()).install()  # the notify mode's triggers
    with (
        caplog.at_level("WARNING", logger="rowsync"),
        RowSync(schema, reference_watchers(), capture="stream"),
    ):
        pass
    assert "triggers do not match the watchers (0 missing, " in caplog.text
    assert "run rs.install()" in caplog.text


def test_events_sent_as_notify_payloads_to_a_log_listener_are_announced_as_a_gap(
    schema, write
) -> None:
    """Triggers of the notify mode, a durable listener: the events are not in its log, so
    its subscribers are told to resync instead of missing them silently."""
    RowSync(schema, reference_watchers()).install()
    rs = RowSync(schema, reference_watchers(), capture="durable")
    with rs, rs.subscribe(Person) as sub:
        write(Person(id=1, name="a"))
        rs.flush()
        assert [kind for kind, _ in sub.drain()] == [Resync]
        assert rs.listener.stats["misrouted"] == 1
