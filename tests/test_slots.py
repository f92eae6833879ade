"""A consumer's persistent replication slot (``capture="wal"``, ``consumer="name"``) in the
ways it can be lost or taken over: invalidated by ``max_slot_wal_keep_size``, and the
transactions a new process gets again because its predecessor had not confirmed them.

The slot's lifecycle in ordinary use (names, creation, uninstall, a stopped listener, a
restarted process or server) is in tests/test_wal.py; the hand-over between the capture
nodes of a fan-out group sharing a consumer, in tests/test_fanout.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

import rowsync
from fixtures import messages, writer
from models import Base, Tag
from rowsync import Resync, Sync, slots

ROUNDS = 20
"""WAL segments switched at most while making a slot fall behind (a guard, not a timing)."""


@pytest.fixture
def lossy_engine(lossy_dsn: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sa.make_url(lossy_dsn).set(drivername="postgresql+psycopg"))
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def slot_of(rs: rowsync.RowSync) -> slots.Slot | None:
    with rs.connect(autocommit=True) as conn:
        return slots.find(conn, rs.channel, slots.name(rs.channel, "worker"))


def leave_behind(rs: rowsync.RowSync) -> None:
    """Write WAL past the slot's reach until a checkpoint invalidates it: switch segments
    (each after a write, else there is nothing to switch) and checkpoint, round after
    round, until ``wal_status = 'lost'``."""
    with rs.connect(autocommit=True) as conn:
        for _ in range(ROUNDS):
            conn.execute("SELECT pg_logical_emit_message(true, 'filler', repeat('x', 1 << 20))")
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            found = slot_of(rs)
            assert found is not None
            if found.wal_status == "lost":
                return
    pytest.fail(f"the slot was not invalidated after {ROUNDS} segments")


@pytest.mark.parametrize("again", ["restarted", "new process"])
def test_a_slot_invalidated_while_its_consumer_was_stopped_is_announced_and_made_again(
    lossy_engine, again
):
    """Whether this listener streamed before (a restart) or not (a new process, which
    cannot tell a dropped slot from a first start), an invalidated slot is announced."""
    write = writer(sessionmaker(lossy_engine, expire_on_commit=False))
    first = rowsync.RowSync(lossy_engine, rowsync.watchers(Tag), capture="wal", consumer="worker")
    first.install()
    rs = first
    try:
        with first:
            write(Tag(id=1, name="before"))
            first.flush()
        write(Tag(id=2, name="committed while the consumer was stopped"))
        leave_behind(first)
        if again == "new process":
            rs = rowsync.RowSync(
                lossy_engine, rowsync.watchers(Tag), capture="wal", consumer="worker"
            )
        sub = rs.subscribe(Tag)
        with rs:
            write(Tag(id=3, name="after"))
            got = messages(rs, sub)
            found = slot_of(rs)
        assert [(k, c.ids["id"]) if k is Sync else (k,) for k, c in got] == [(Resync,), (Sync, 3)]
        reason = got[0][1].reason
        assert slots.name(rs.channel, "worker") in reason and "invalidated" in reason
        assert found is not None and found.wal_status != "lost"
        assert found.active_pid is not None  # the slot made again is the one streaming
        assert rs.listener.stats["gaps"] == 1
    finally:
        rs.stop()
        first.uninstall()
