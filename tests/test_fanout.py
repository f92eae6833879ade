"""Fan-out, within one process: several RowSyncs of one group (``fanout=URL``), each with
its own broker connection, elect one capture node and serve their own subscribers.

The multi-process proof (kill -9 of the capture process) is tests/test_fanout_nodes.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import selectinload

from brokers import (
    ALL,
    BROKERS,
    KEY,
    NATS,
    REDIS,
    drop_stream,
    inject,
    relay,
    require,
    wait_until,
)
from fixtures import reference_watchers, terminate_listener
from models import Person, Post
from oracle import fresh, snapshot
from rowsync import ConfigurationError, NotRunningError, Resync, RowSync, Sync
from rowsync.cache import CachedRow
from rowsync.dispatch import Resolved
from rowsync.fanout.codec import Gap
from rowsync.fanout.node import Node
from rowsync.fanout.seal import Seal

Group = Callable[..., list[RowSync]]


@pytest.fixture
def group(schema: sa.Engine) -> Iterator[Group]:
    """``group(url, count=1, **options)``: started RowSyncs of one fan-out group, in order
    (the first one, started alone, is the capture node). Stopped afterwards, last first."""
    made: list[RowSync] = []
    dsn = schema.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def make(url: str, count: int = 1, **options: object) -> list[RowSync]:
        require(url)
        nodes = []
        for _ in range(count):
            rs = RowSync(dsn, reference_watchers(), fanout=url, fanout_key=KEY, **options)
            if not made:
                rs.install()
            made.append(rs.start())
            nodes.append(rs)
        return nodes

    yield make
    for rs in reversed(made):
        rs.stop()
    if made and made[0].capture == "wal":
        made[0].uninstall()  # a consumer's replication slot would outlive the database
    for rs in made[:1]:
        if rs.fanout is not None and rs.fanout.url.startswith("nats"):
            drop_stream(NATS, rs.fanout.backend.stream)


def kinds(messages: list[tuple[object, object]]) -> list[object]:
    return [kind for kind, _ in messages]


def sealed(node: Node, term: int, seq: int, items: list[object]) -> list[bytes]:
    """``items`` as messages of ``term`` sealed with the group's key, as only a node of the
    group (or a holder of its key) can make them."""
    assert node.seal is not None
    return [node.seal.seal(m) for m in node.codec.encode(term, seq, items, 1 << 20)]


# -- delivery ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ALL)
def test_every_node_syncs_each_change_fetched_once_by_the_capture_node(
    url, group, write, sessions
) -> None:
    write(Person(id=1, name="a"), Post(id=1, name="x", person_id=1))
    nodes = group(url, 3)
    assert [rs.fanout.capturing for rs in nodes] == [True, False, False]
    statement = sa.select(Person).where(Person.id == 1).options(selectinload(Person.posts))
    trees = [fresh(sessions, statement, many=False) for _ in nodes]
    subs = [rs.subscribe(tree, assocs=["posts"]) for rs, tree in zip(nodes, trees, strict=True)]

    write(Post(id=2, name="y", person_id=1))
    write(sa.update(Post).where(Post.id == 1).values(name="x2"))
    write(sa.delete(Post).where(Post.id == 2), sa.update(Person).values(name="b"))
    for i, (rs, sub) in enumerate(zip(nodes, subs, strict=True)):
        rs.flush()
        for message in sub.drain():
            assert message[0] is Sync
            trees[i] = rs.sync(trees[i], message)

    expected = snapshot(fresh(sessions, statement, many=False))
    assert [snapshot(tree) for tree in trees] == [expected] * 3
    assert nodes[0].rows.queries["rows"] > 0
    assert [rs.rows.queries for rs in nodes[1:]] == [{}, {}]  # not one query on the others


@pytest.mark.parametrize("url", ALL)
def test_a_stopped_capture_node_is_replaced_and_every_node_is_told_to_resync(
    url, group, write
) -> None:
    first, *others = group(url, 3)
    subs = [rs.subscribe(Post) for rs in others]

    first.stop()
    write(Person(id=1, name="a"), Post(id=1, person_id=1))  # maybe while nobody captures
    for rs in others:
        rs.flush(30)
    write(Post(id=2, person_id=1))
    for rs in others:
        rs.flush(30)

    assert sum(rs.fanout.capturing for rs in others) == 1
    for sub in subs:
        messages = sub.drain()
        resyncs = [info for kind, info in messages if kind is Resync]
        assert [info.reason for info in resyncs] == [
            "a new capture node started: changes may have been missed"
        ]
        assert messages[-1][0] is Sync and messages[-1][1].ids["id"] == 2


@pytest.mark.parametrize("url", BROKERS)
def test_a_gap_of_the_capture_nodes_listener_reaches_every_node(url, group, write) -> None:
    nodes = group(url, 2)
    subs = [rs.subscribe(Post) for rs in nodes]
    terminate_listener(nodes[0])
    write(Person(id=1, name="a"))
    for rs, sub in zip(nodes, subs, strict=True):
        rs.flush(30)
        assert [(kind, info.reason) for kind, info in sub.drain()] == [(Resync, "reconnect")]


# -- the broker connection -------------------------------------------------------------


def test_a_node_cut_from_redis_is_told_to_resync_and_then_receives_again(group, dsn, write) -> None:
    (capture,) = group(REDIS)
    with relay(REDIS) as cable:
        (far,) = group(cable.url(REDIS))
        sub = far.subscribe(Post)
        cable.cut()
        wait_until(lambda: not far.fanout.connected.is_set())
        write(Person(id=1, name="a"), Post(id=1, person_id=1))  # published while far is away
        capture.flush()
        cable.restore()
        far.flush(30)
        assert [(kind, info.reason) for kind, info in sub.drain()] == [
            (Resync, "the connection to the fan-out broker was lost")
        ]
        write(Post(id=2, person_id=1))
        far.flush()
        assert [(kind, change.ids["id"]) for kind, change in sub.drain()] == [(Sync, 2)]


def test_a_node_cut_from_nats_resumes_where_it_was_without_a_resync(group, write) -> None:
    (capture,) = group(NATS)
    with relay(NATS) as cable:
        (far,) = group(cable.url(NATS))
        sub = far.subscribe(Post)
        cable.cut()
        wait_until(lambda: not far.fanout.connected.is_set())
        write(Person(id=1, name="a"), Post(id=1, person_id=1))  # published while far is away
        capture.flush()
        cable.restore()
        far.flush(30)
        assert [(kind, change.ids["id"]) for kind, change in sub.drain()] == [(Sync, 1)]
        assert far.fanout.stats["reconnects"] >= 1
        assert far.fanout.stats["gaps"] == 0


def test_changes_the_capture_node_could_not_publish_are_announced_as_a_gap(group, write) -> None:
    """However the race goes (the cut-off capture node publishes the gap it left once back,
    the nodes see its numbering jump, or it has stepped down and the new capture node's
    start announces one), the far node is told to resync first."""
    with relay(REDIS) as cable:
        (capture,) = group(cable.url(REDIS))
        (far,) = group(REDIS)
        sub = far.subscribe(Post)
        cable.cut()
        write(Person(id=1, name="a"), Post(id=1, person_id=1))
        wait_until(lambda: capture.fanout.stats["publish_errors"] > 0 or far.fanout.capturing)
        cable.restore()
        far.flush(30)
        messages = sub.drain()
        # If the new capture node was listening before the commit, it also delivers the post.
        assert messages and messages[0][0] is Resync
        assert all(kind is Resync or change.ids["id"] == 1 for kind, change in messages)


def test_a_capture_node_cut_from_the_broker_steps_down_for_one_that_can_publish(
    group, write
) -> None:
    with relay(REDIS) as cable:
        (capture,) = group(cable.url(REDIS))
        (far,) = group(REDIS)
        assert capture.fanout.capturing and not far.fanout.capturing
        sub = far.subscribe(Post)
        cable.cut()
        wait_until(lambda: far.fanout.capturing, limit=10)
        assert not capture.fanout.capturing
        assert capture.fanout.election.stats["resigned"] == 1
        # Elected is not yet listening: what commits before its listener listens is covered
        # by the Resync its start announces. A barrier that comes back went through it.
        far.flush(10)
        assert [kind for kind, _ in sub.drain()] == [Resync]
        write(Person(id=1, name="a"), Post(id=1, person_id=1))
        far.flush(10)
        assert [kind for kind, _ in sub.drain()] == [Sync]

        cable.restore()  # back, as an ordinary node: it receives through the broker again
        wait_until(lambda: capture.fanout.connected.is_set())
        back = capture.subscribe(Post)
        write(Post(id=2, person_id=1))
        capture.flush(30)
        assert [(kind, change.ids["id"]) for kind, change in back.drain()] == [(Sync, 2)]
        assert far.fanout.capturing and not capture.fanout.capturing


def test_an_unreadable_sealed_message_tells_every_node_to_resync(group, write) -> None:
    nodes = group(REDIS, 2)
    subs = [rs.subscribe(Post) for rs in nodes]
    node = nodes[0].fanout
    inject(node.backend, [node.seal.seal(b"\x00 not json")])
    write(Person(id=1, name="a"), Post(id=1, person_id=1))
    for rs, sub in zip(nodes, subs, strict=True):
        rs.flush()
        assert kinds(sub.drain()) == [Resync, Sync]
        assert rs.fanout.stats["malformed"] == 1


def test_what_a_replaced_capture_node_still_publishes_is_ignored(group, write) -> None:
    nodes = group(REDIS, 2)
    subs = [rs.subscribe(Post) for rs in nodes]
    node = nodes[1].fanout
    inject(node.backend, sealed(node, 1, 0, [Gap("from a capture node long gone")]))
    write(Person(id=1, name="a"), Post(id=1, person_id=1))
    for rs, sub in zip(nodes, subs, strict=True):
        rs.flush()
        assert kinds(sub.drain()) == [Sync]
        assert rs.fanout.stats["stale"] == 1


# -- trust: what anyone who can publish to the broker can do --------------------------------


def forged_update(values: dict[str, object]) -> Resolved:
    """An update of a person, its row as the forger wants it (a high ref: newer than all)."""
    return Resolved(
        10**9, ("public", "persons"), "updated", {"id": 1}, None, None, CachedRow(values)
    )


@pytest.mark.parametrize("url", BROKERS)
def test_a_message_without_the_groups_seal_is_dropped_and_counted(url, group, write, sessions):
    write(Person(id=1, name="a"))
    nodes = group(url, 2)
    statement = sa.select(Person).where(Person.id == 1)
    trees = [fresh(sessions, statement, many=False) for _ in nodes]
    subs = [rs.subscribe(tree) for rs, tree in zip(nodes, trees, strict=True)]
    capture = nodes[0].fanout
    forged = capture.codec.encode(
        capture.election.term, 10**6, [forged_update({"id": 1, "name": "forged"})], 1 << 20
    )
    other_key = Seal(b"a key that is not the group's", "its stream")
    inject(capture.backend, [*forged, *(other_key.seal(m) for m in forged)])

    write(sa.update(Person).values(name="b"))
    for i, (rs, sub) in enumerate(zip(nodes, subs, strict=True)):
        rs.flush()
        messages = sub.drain()
        assert kinds(messages) == [Sync]  # no forged change, and no resync either
        trees[i] = rs.sync(trees[i], messages[0])
        assert rs.fanout.stats["forged"] == 2
    assert [tree.name for tree in trees] == ["b", "b"]


@pytest.mark.parametrize("url", BROKERS)
def test_a_message_claiming_a_huge_term_does_not_fence_out_the_capture_node(
    url, group, write
) -> None:
    """Even sealed with the group's key: a term counts once the election in Postgres says
    it is the elected node's."""
    nodes = group(url, 2)
    subs = [rs.subscribe(Post) for rs in nodes]
    node = nodes[1].fanout
    inject(node.backend, sealed(node, 2**62, 0, [Gap("from a node that was never elected")]))

    write(Person(id=1, name="a"), Post(id=1, person_id=1))
    for rs, sub in zip(nodes, subs, strict=True):
        rs.flush()
        messages = sub.drain()
        assert [(kind, getattr(info, "reason", None)) for kind, info in messages[:1]] == [
            (Resync, f"messages of capture term {2**62} are not the elected node's")
        ]
        assert kinds(messages[1:]) == [Sync] and messages[1][1].ids["id"] == 1
        assert rs.fanout.stats["unverified"] == 1
    write(Post(id=2, person_id=1))
    for rs, sub in zip(nodes, subs, strict=True):
        rs.flush()
        assert [(kind, change.ids["id"]) for kind, change in sub.drain()] == [(Sync, 2)]


def test_a_message_read_again_is_dropped_and_counted(group, write) -> None:
    nodes = group(REDIS, 2)
    subs = [rs.subscribe(Post) for rs in nodes]
    node = nodes[1].fanout
    with redis.Redis.from_url(REDIS) as client, client.pubsub() as listener:
        listener.subscribe(node.backend.channel)
        write(Person(id=1, name="a"), Post(id=1, person_id=1))
        for rs in nodes:
            rs.flush()
        recorded = [m["data"] for m in iter(listener.get_message, None) if m["type"] == "message"]
    assert recorded  # the change and the barriers, sealed by the capture node
    inject(node.backend, recorded)

    write(Post(id=2, person_id=1))
    for rs, sub in zip(nodes, subs, strict=True):
        rs.flush()
        assert [(kind, change.ids["id"]) for kind, change in sub.drain()] == [(Sync, 1), (Sync, 2)]
        assert rs.fanout.stats["replayed"] == len(recorded)  # and no resync either


@pytest.mark.parametrize("url", ALL)
def test_a_column_this_node_withholds_is_not_patched_even_from_a_sealed_message(
    url, group, write, sessions
) -> None:
    """The capture node reads ``body`` (configured differently): the far node does not."""
    write(Person(id=1, name="a"), Post(id=1, person_id=1, name="n", body="original"))
    (capture,) = group(url)
    (far,) = group(url, exclude={Post: ["body"]})
    tree = fresh(sessions, sa.select(Post).where(Post.id == 1), many=False)
    sub = far.subscribe(tree)

    write(sa.update(Post).values(name="n2", body="withheld here"))
    far.flush()
    (message,) = sub.drain()
    tree = far.sync(tree, message)
    assert (tree.name, tree.body) == ("n2", "original")
    assert far.fanout.stats["withheld"] == 1
    assert capture.fanout.stats["withheld"] == 0


REDIS_ACL = (
    "on >{password} resetkeys resetchannels &rowsync:* -@all"
    " +publish +subscribe +unsubscribe +ping +client|setname"
)
"""The Redis ACL rule docs/security.md ("The fan-out broker") gives rowsync's nodes."""


def test_a_group_runs_with_the_documented_redis_acl_that_other_users_lack(group, write) -> None:
    user, other = f"rowsync-test-{uuid.uuid4().hex}", f"other-test-{uuid.uuid4().hex}"
    with redis.Redis.from_url(REDIS) as admin:
        admin.execute_command("ACL", "SETUSER", user, *REDIS_ACL.format(password="pw1").split())
        admin.execute_command("ACL", "SETUSER", other, "on", ">pw2", "resetchannels", "+@all")
        try:
            _, node = group(f"redis://{user}:pw1@127.0.0.1:6379/0", 2)
            sub = node.subscribe(Post)
            write(Person(id=1, name="a"), Post(id=1, person_id=1))
            node.flush()
            assert [(kind, change.ids["id"]) for kind, change in sub.drain()] == [(Sync, 1)]
            with (
                redis.Redis.from_url(f"redis://{other}:pw2@127.0.0.1:6379/0") as client,
                pytest.raises(redis.exceptions.NoPermissionError),
            ):
                client.publish(node.fanout.backend.channel, b"forged")
        finally:
            admin.acl_deluser(user, other)


@pytest.mark.parametrize("capture", ["durable", "stream", "wal"])
def test_with_a_shared_consumer_a_new_capture_node_resumes_without_a_gap(
    group, write, capture
) -> None:
    """The consumer's position (a change log's saved cursor, a persistent replication slot)
    outlives the capture node: the next one reads on from it."""
    first, second = group("memory://", 2, capture=capture, consumer="group")
    sub = second.subscribe(Post)
    first.stop()
    write(Person(id=1, name="a"), Post(id=1, person_id=1))  # maybe while nobody captures
    second.flush(30)
    assert second.fanout.capturing
    assert [(kind, change.ids["id"]) for kind, change in sub.drain()] == [(Sync, 1)]


@pytest.mark.parametrize("capture", ["wal"])
def test_a_capture_node_reading_the_wal_serves_every_node(group, write, capture) -> None:
    first, second = group("memory://", 2, capture=capture)
    subs = [rs.subscribe(Post) for rs in (first, second)]
    write(Person(id=1, name="a"), Post(id=1, person_id=1))
    for rs, sub in zip((first, second), subs, strict=True):
        rs.flush()
        assert [(kind, change.ids["id"]) for kind, change in sub.drain()] == [(Sync, 1)]
    assert [rs.fanout.capturing for rs in (first, second)] == [True, False]
    assert second.rows.queries == {}  # the row came through the broker


@pytest.mark.parametrize("capture", ["wal"])
def test_a_truncate_reaches_each_node_for_the_subscriptions_its_tables_concern(
    group, write, capture
) -> None:
    first, second = group("memory://", 2, capture=capture)
    posts, people = second.subscribe(Post), second.subscribe(Person)

    write(sa.text("TRUNCATE posts CASCADE"))
    first.flush()
    second.flush()

    ((kind, info),) = posts.drain()
    assert kind is Resync and "TRUNCATE of public.posts" in info.reason
    assert people.drain() == []


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("url", [REDIS, NATS])
def test_a_broker_without_a_key_or_with_a_short_one_is_a_configuration_error(url) -> None:
    with pytest.raises(ConfigurationError, match="needs fanout_key="):
        RowSync("postgresql://u@h/db", reference_watchers(), fanout=url)
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        RowSync("postgresql://u@h/db", reference_watchers(), fanout=url, fanout_key="short")


def test_an_unknown_fanout_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="use redis://, nats:// or memory://"):
        RowSync("postgresql://u@h/db", reference_watchers(), fanout="kafka://h:9092")


def test_start_fails_clearly_when_the_broker_cannot_be_reached(schema, dsn) -> None:
    rs = RowSync(dsn, reference_watchers(), fanout="redis://127.0.0.1:1/0", fanout_key=KEY)
    with pytest.raises(NotRunningError, match="cannot reach the fan-out broker"):
        rs.start()
    assert not rs.running


def test_without_fanout_nothing_is_elected_and_the_listener_delivers(rs, write) -> None:
    sub = rs.subscribe(Post)
    write(Person(id=1, name="a"), Post(id=1, person_id=1))
    rs.flush()
    assert rs.fanout is None
    assert kinds(sub.drain()) == [Sync]


def test_a_session_squatting_the_election_lock_is_named_when_no_node_captures(
    schema: sa.Engine, dsn: str
) -> None:
    """Any role may take any advisory lock: one that holds the election's keeps every node
    from capturing. Starting then fails (nothing is delivered silently meanwhile) and the error
    names the session, so an operator can end it."""
    require(REDIS)
    rs = RowSync(dsn, reference_watchers(), fanout=REDIS, fanout_key=KEY, start_timeout=2.0)
    rs.install()
    assert rs.fanout is not None
    with psycopg.connect(dsn, autocommit=True) as squatter:
        squatter.execute("SET application_name = 'squatter'")
        squatter.execute("SELECT pg_advisory_lock(%s)", (rs.fanout.election.key,))
        with pytest.raises(NotRunningError, match=r"held by pid \d+ .*'squatter'.*not a rowsync"):
            rs.start()
