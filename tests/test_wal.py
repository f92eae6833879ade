"""``capture="wal"``: changes read from logical decoding reach subscribers and trees.

These tests run on a throwaway server with ``wal_level = logical`` (``logical_dsn``, started
if need be), except the one that checks what happens on a server without it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload, sessionmaker

import rowsync
from fixtures import apply_all, messages, reference_watchers, writer
from models import Base, Person, Post, Tag
from oracle import fresh, snapshot
from rowsync import Resync, Sync, slots
from rowsync.cli import main


@pytest.fixture
def wal_engine(logical_dsn: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sa.make_url(logical_dsn).set(drivername="postgresql+psycopg"))
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def wal_sessions(wal_engine: sa.Engine) -> sessionmaker[Session]:
    return sessionmaker(wal_engine, expire_on_commit=False)


@pytest.fixture
def wal_rs(wal_engine: sa.Engine) -> Iterator[rowsync.RowSync]:
    instance = rowsync.RowSync(wal_engine, reference_watchers(), capture="wal")
    instance.install()
    with instance:
        yield instance


def people_query() -> sa.Select[tuple[Person]]:
    return sa.select(Person).order_by(Person.id).options(selectinload(Person.posts))


def test_inserts_updates_and_deletes_reach_a_synced_tree(wal_rs, wal_sessions):
    write = writer(wal_sessions)
    write(Person(id=1, name="a"), Post(id=10, name="p", person_id=1))
    wal_rs.flush()
    people = fresh(wal_sessions, people_query())
    sub = wal_rs.subscribe(people, assocs=["posts"])

    write(Post(id=20, name="q", person_id=1))
    write(sa.update(Post).where(Post.id == 10).values(name="p2"))
    write(sa.update(Person).where(Person.id == 1).values(name="a2"))
    people = apply_all(wal_rs, sub, people)
    assert [(p.id, p.name) for p in people[0].posts] == [(10, "p2"), (20, "q")]
    assert people[0].name == "a2"

    write(sa.delete(Post).where(Post.id == 10))
    people = apply_all(wal_rs, sub, people)
    assert [p.id for p in people[0].posts] == [20]
    assert snapshot(people) == snapshot(fresh(wal_sessions, people_query()))


def test_a_post_moving_between_people_reaches_both_trees(wal_rs, wal_sessions):
    write = writer(wal_sessions)
    write(Person(id=1, name="a"), Person(id=2, name="b"), Post(id=10, name="p", person_id=1))
    wal_rs.flush()
    first = fresh(wal_sessions, people_query().where(Person.id == 1))
    second = fresh(wal_sessions, people_query().where(Person.id == 2))
    first_sub = wal_rs.subscribe(first, assocs=["posts"])
    second_sub = wal_rs.subscribe(second, assocs=["posts"])

    write(sa.update(Post).where(Post.id == 10).values(person_id=2))
    first = apply_all(wal_rs, first_sub, first)
    second = apply_all(wal_rs, second_sub, second)

    assert first[0].posts == []
    assert [p.id for p in second[0].posts] == [10]


def test_changes_arrive_in_commit_order_with_growing_refs(wal_rs, wal_sessions):
    write = writer(wal_sessions)
    sub = wal_rs.subscribe(Tag)
    write(Tag(id=1, name="x"), Tag(id=2, name="y"))
    write(sa.update(Tag).where(Tag.id == 1).values(name="z"))

    changes = [change for _, change in messages(wal_rs, sub)]

    assert [(c.event, c.ids["id"]) for c in changes] == [
        ("inserted", 1),
        ("inserted", 2),
        ("updated", 1),
    ]
    refs = [c.ref for c in changes]
    assert refs == sorted(set(refs))


def test_a_position_places_changes_by_their_transaction_id(wal_rs, wal_sessions):
    write = writer(wal_sessions)
    write(Tag(id=0, name="seen"))
    wal_rs.flush()
    with wal_sessions() as session:
        session.execute(sa.select(Tag)).all()  # the load: its snapshot saw tag 0
        position = wal_rs.position(session)
    write(Tag(id=1, name="x"))
    wal_rs.flush()

    sub = wal_rs.subscribe(Tag, since=position)

    assert [(c.event, c.ids["id"]) for _, c in messages(wal_rs, sub)] == [("inserted", 1)]


def test_replica_identity_is_full_only_where_old_values_beyond_the_key_are_needed(
    wal_rs, wal_engine
):
    with wal_engine.connect() as conn:
        found = dict(
            conn.execute(
                sa.text(
                    "SELECT relname, relreplident::text FROM pg_class"
                    " WHERE relname IN ('posts', 'tags')"
                )
            ).all()
        )
    assert found == {"posts": "f", "tags": "d"}


def test_withheld_columns_are_left_out_of_the_publication(wal_engine):
    rs = rowsync.RowSync(wal_engine, rowsync.watchers(Tag), capture="wal", exclude={Tag: ["name"]})
    rs.install()
    with wal_engine.connect() as conn:
        published = conn.execute(
            sa.text("SELECT attnames FROM pg_publication_tables WHERE tablename = 'tags'")
        ).scalar_one()
    assert "name" not in published and "id" in published


def test_withholding_columns_of_a_table_that_needs_full_identity_is_refused(wal_engine):
    rs = rowsync.RowSync(
        wal_engine, rowsync.watchers(Post), capture="wal", exclude={Post: ["body"]}
    )
    with pytest.raises(rowsync.ConfigurationError, match="REPLICA IDENTITY FULL"):
        rs.install()


def test_uninstall_drops_the_publication(wal_engine):
    rs = rowsync.RowSync(wal_engine, rowsync.watchers(Tag), capture="wal")
    rs.install()
    rs.uninstall()
    with wal_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM pg_publication")).scalar_one() == 0


def test_start_on_a_server_without_logical_decoding_says_what_to_run(schema):
    with psycopg.connect(schema.url.set(drivername="postgresql").render_as_string(False)) as conn:
        level = conn.execute("SHOW wal_level").fetchone()
    assert level is not None and level[0] != "logical", "the shared server must not be logical"
    rs = rowsync.RowSync(schema, reference_watchers(), capture="wal")
    rs.install()
    with pytest.raises(rowsync.ConfigurationError, match="ALTER SYSTEM SET wal_level = logical"):
        rs.start()
    assert not rs.running


# -- slots: a consumer's persistent one, temporary ones, their lifecycle ----------------------


@pytest.fixture
def consumers(wal_engine: sa.Engine) -> Iterator[Callable[..., rowsync.RowSync]]:
    """RowSyncs on tags with a consumer's persistent slot (``consumer="worker"`` unless
    told), installed. Afterwards stopped and uninstalled, which drops their slots: one left
    behind would keep the shared server's WAL forever."""
    made: list[rowsync.RowSync] = []

    def make(consumer: str | None = "worker", **options: object) -> rowsync.RowSync:
        rs = rowsync.RowSync(
            wal_engine, rowsync.watchers(Tag), capture="wal", consumer=consumer, **options
        )
        rs.install()
        made.append(rs)
        return rs

    yield make
    for rs in made:
        rs.stop()
    if made:
        made[0].uninstall()
        assert channel_slots(made[0]) == []


def channel_slots(rs: rowsync.RowSync) -> list[slots.Slot]:
    with rs.connect(autocommit=True) as conn:
        return slots.of_channel(conn, rs.channel)


def terminate_walsender(rs: rowsync.RowSync) -> None:
    """Kill the backend streaming to ``rs`` (only the replication connection) and wait
    until it is gone: what commits next cannot reach the old connection."""
    (slot,) = [s for s in channel_slots(rs) if s.active_pid is not None]
    assert slot.active_pid is not None
    with rs.connect(autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (slot.active_pid,))
        slots.release(conn, slot.active_pid)


def changes(got: list[object]) -> list[tuple[object, ...]]:
    return [
        (kind, c.event, c.ids["id"]) if kind is Sync else (kind,)
        for kind, c in got  # type: ignore[misc]
    ]


def test_slot_names_are_valid_identifiers_of_at_most_63_bytes_and_distinct():
    long = "Wörker-" + "x" * 80
    names = {
        slots.name("rowsync", "worker"),
        slots.name("rowsync", "Worker"),
        slots.name("other", "worker"),
        slots.name("rowsync", long),
        slots.name("rowsync", long + "y"),
    }
    assert len(names) == 5
    for name in names | {slots.temporary_name("rowsync")}:
        assert re.fullmatch(r"[a-z0-9_]{1,63}", name), name
    assert slots.name("rowsync", "worker") == slots.name("rowsync", "worker")
    assert slots.name("rowsync", "worker").startswith(slots.prefix("rowsync"))


def test_a_killed_walsender_resumes_from_the_consumer_slot_without_resync(consumers, wal_sessions):
    rs = consumers()
    write = writer(wal_sessions)
    with rs:
        sub = rs.subscribe(Tag)
        write(Tag(id=1, name="before"))
        rs.flush()
        terminate_walsender(rs)
        write(Tag(id=2, name="while reconnecting"))
        got = messages(rs, sub)
        assert rs.listener.stats["reconnects"] == 1
    assert changes(got) == [(Sync, "inserted", 1), (Sync, "inserted", 2)]
    assert rs.listener.stats["gaps"] == 0


def test_a_batch_whose_dispatch_broke_is_sent_again(consumers, wal_sessions):
    """The slot's position moves only once a batch was dispatched: a dispatch cut short by a
    lost connection (a row fetch's, here raised on purpose) gets the batch again."""
    rs = consumers()
    write = writer(wal_sessions)
    deliver = rs.listener.on_batch
    broken: list[object] = []

    def dispatch(batch):
        if not broken and any(getattr(item, "table", None) == "tags" for item in batch):
            broken.append(batch)
            raise psycopg.OperationalError("the row fetch lost its connection")
        deliver(batch)

    rs.listener.on_batch = dispatch
    with rs:
        sub = rs.subscribe(Tag)
        write(Tag(id=1, name="a"))
        got = messages(rs, sub)
    assert broken and rs.listener.stats["connection_errors"] == 1
    assert changes(got) == [(Sync, "inserted", 1)]


def test_a_stopped_listener_gets_what_committed_meanwhile_on_start(consumers, wal_sessions):
    rs = consumers()
    write = writer(wal_sessions)
    sub = rs.subscribe(Tag)
    with rs:
        write(Tag(id=1, name="a"))
        rs.flush()
    write(Tag(id=2, name="committed while stopped"))
    with rs:
        rs.flush()
    assert changes(sub.drain()) == [(Sync, "inserted", 1), (Sync, "inserted", 2)]
    assert rs.listener.stats["gaps"] == 0


def test_a_restarted_process_resumes_from_the_slot(consumers, wal_sessions):
    write = writer(wal_sessions)
    first = consumers()
    with first:
        write(Tag(id=1, name="seen by the first process"))
        first.flush()
    write(Tag(id=2, name="committed while no process ran"))
    second = consumers()
    sub = second.subscribe(Tag)
    with second:
        second.flush()
    assert changes(sub.drain()) == [(Sync, "inserted", 2)]
    assert second.listener.stats["gaps"] == 0
    assert [s.name for s in channel_slots(second)] == [slots.name(second.channel, "worker")]


def test_a_server_restart_resumes_from_the_slot(restartable_dsn, restartable_server):
    """The slot and its confirmed position survive ``pg_ctl restart``: what committed
    across it arrives, with no resync."""
    engine = sa.create_engine(
        sa.make_url(restartable_dsn).set(drivername="postgresql+psycopg"), pool_pre_ping=True
    )
    Base.metadata.create_all(engine)
    rs = rowsync.RowSync(engine, rowsync.watchers(Tag), capture="wal", consumer="worker")
    rs.install()
    write = writer(sessionmaker(engine))
    try:
        with rs:
            sub = rs.subscribe(Tag)
            write(Tag(id=1, name="before"))
            rs.flush()
            restartable_server.restart()
            write(Tag(id=2, name="after"))
            got = messages(rs, sub, timeout=60)
        assert changes(got) == [(Sync, "inserted", 1), (Sync, "inserted", 2)]
        assert rs.listener.stats["gaps"] == 0
    finally:
        rs.stop()
        rs.uninstall()
        engine.dispose()


def test_without_a_consumer_a_reconnect_is_announced(consumers):
    rs = consumers(consumer=None)
    with rs:
        sub = rs.subscribe(Tag)
        terminate_walsender(rs)
        got = messages(rs, sub)
    assert changes(got) == [(Resync,)]


def test_a_dropped_slot_is_announced_and_created_again(consumers, wal_sessions):
    rs = consumers()
    write = writer(wal_sessions)
    sub = rs.subscribe(Tag)
    with rs:
        rs.flush()
    with rs.connect(autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slots.name(rs.channel, "worker"),))
    write(Tag(id=1, name="committed while no slot kept the place"))
    with rs:
        write(Tag(id=2, name="after"))
        got = messages(rs, sub)
    assert changes(got) == [(Resync,), (Sync, "inserted", 2)]
    assert "dropped" in got[0][1].reason
    assert [s.name for s in channel_slots(rs)] == [slots.name(rs.channel, "worker")]


def test_a_crashed_process_leaves_no_temporary_slot(consumers, logical_dsn):
    rs = consumers(consumer=None)  # installs the publication
    script = (
        "import sys, rowsync\n"
        "from models import Tag\n"
        "rs = rowsync.RowSync(sys.argv[1], rowsync.watchers(Tag), capture='wal').start()\n"
        "print('started', flush=True)\n"
        "sys.stdin.read()\n"
    )
    tests = Path(__file__).parent
    proc = subprocess.Popen(
        [sys.executable, "-c", script, logical_dsn],
        env={"PYTHONPATH": f"{tests.parent}:{tests}", "PATH": "/usr/bin:/bin"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "started\n"
        (slot,) = channel_slots(rs)
        assert slot.temporary and slot.active_pid is not None
    finally:
        proc.kill()  # SIGKILL: no clean-up of its own
        proc.wait()
    with rs.connect(autocommit=True) as conn:
        slots.release(conn, slot.active_pid, timeout=30)  # the server notices the lost client
    assert channel_slots(rs) == []


def test_a_slot_creation_held_up_by_a_writing_transaction_names_its_backend(
    consumers, wal_sessions
):
    rs = consumers(start_timeout=1.0)
    with wal_sessions() as blocker:
        blocker.add(Tag(id=1, name="uncommitted"))
        blocker.flush()  # the transaction has an xid: logical decoding must wait for its end
        pid = blocker.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with pytest.raises(
            rowsync.NotRunningError, match=rf"slot .* within 1.0 s.* backend {pid} "
        ):
            rs.start()
        blocker.rollback()
    assert channel_slots(rs) == []  # a creation cut short leaves no slot


def test_uninstall_refuses_while_a_listener_streams_then_drops_the_slots(consumers):
    rs = consumers(start_timeout=1.0)
    with rs, pytest.raises(rowsync.ConfigurationError, match="in use.*stop their listeners"):
        rs.uninstall()
    rs.uninstall()
    assert channel_slots(rs) == []
    with pytest.raises(rowsync.NotRunningError, match="publication 'rowsync' does not exist"):
        rs.start()
    assert channel_slots(rs) == []  # no slot is made without the publication


def test_a_second_process_of_the_same_consumer_is_told_the_slot_is_in_use(consumers):
    first = consumers()
    second = consumers(start_timeout=1.0)
    with first:
        (slot,) = channel_slots(first)
        with pytest.raises(rowsync.NotRunningError, match=rf"is active for PID {slot.active_pid}"):
            second.start()


def test_the_cli_uninstall_drops_the_publication_and_the_slots(consumers, logical_dsn, capsys):
    rs = consumers()
    with rs:
        rs.flush()
    cli = ["--app", "cli_app:watchers", "--dsn", logical_dsn, "--capture", "wal", "uninstall"]
    assert main(cli) == 0
    assert 'publication "rowsync" and 1 replication slot dropped' in capsys.readouterr().out
    assert channel_slots(rs) == []


def test_status_lists_the_slots_with_the_wal_they_keep(
    consumers, wal_sessions, logical_dsn, capsys
):
    rs = consumers()
    with rs:
        writer(wal_sessions)(Tag(id=1, name="a"))
        rs.flush()
        status = rs.status()
        assert status.wal_level == "logical" and status.ok
        (slot,) = status.slots
        assert slot.name == slots.name(rs.channel, "worker") and not slot.temporary
        assert slot.retained is not None and slot.retained > 0
        assert slot.lag is not None and slot.lag >= 0

        cli = ["--app", "cli_app:watchers", "--dsn", logical_dsn, "--capture", "wal", "status"]
        assert main(cli) == 0
        out = capsys.readouterr().out
        assert "wal_level  logical" in out and f"{slot.name}  kept, streaming" in out
        assert main([*cli, "--max-retained", "0"]) == 1
        out = capsys.readouterr().out
        assert f"warning: slot {slot.name} keeps" in out
