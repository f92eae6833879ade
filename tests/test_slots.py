"""A consumer's persistent replication slot (``capture="wal"``, ``consumer="name"``) when it
is lost or sends again: invalidated by ``max_slot_wal_keep_size`` (on a server of its own:
the setting is server-wide), and the transactions a new process gets again because its
predecessor was killed before it confirmed them.

The slot's lifecycle in ordinary use (names, creation, uninstall, a stopped listener, a
restarted process or server) is in tests/test_wal.py; the hand-over between the capture
nodes of a fan-out group sharing a consumer in tests/test_fanout.py (a node stopped) and
tests/test_fanout_nodes.py (a node killed while its walsender holds the slot).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import rowsync
from brokers import wait_until
from fixtures import apply_all, messages, writer
from models import Base, Tag
from oracle import fresh, snapshot
from rowsync import Resync, Sync, slots

ROUNDS = 20
"""WAL segments switched at most while making a slot fall behind (a guard, not a timing)."""


def engine_with_models(dsn: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sa.make_url(dsn).set(drivername="postgresql+psycopg"))
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def wal_engine(logical_dsn: str) -> Iterator[sa.Engine]:
    yield from engine_with_models(logical_dsn)


@pytest.fixture
def lossy_engine(lossy_dsn: str) -> Iterator[sa.Engine]:
    yield from engine_with_models(lossy_dsn)


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


def test_a_slot_invalidated_while_its_listener_lags_is_announced_and_made_again(lossy_engine):
    """The server ends the walsender of a slot it invalidates; the listener, back from its
    batch, reconnects, finds the slot lost, and goes on from a new one."""
    write = writer(sessionmaker(lossy_engine, expire_on_commit=False))
    rs = rowsync.RowSync(lossy_engine, rowsync.watchers(Tag), capture="wal", consumer="worker")
    rs.install()
    sub = rs.subscribe(Tag)
    busy, done = threading.Event(), threading.Event()
    deliver = rs.listener.on_batch

    def slow(batch):  # a batch that takes long: the slot falls behind meanwhile
        if not done.is_set() and any(getattr(i, "table", None) == "tags" for i in batch):
            busy.set()
            done.wait(60)
        deliver(batch)

    rs.listener.on_batch = slow
    try:
        with rs:
            write(Tag(id=1, name="its batch takes long"))
            assert busy.wait(60)
            write(Tag(id=2, name="committed while the listener lags"))
            leave_behind(rs)
            done.set()
            # what commits before the new slot is made is in the gap it announces
            wait_until(lambda: rs.listener.stats["reconnects"] > 0)
            write(Tag(id=3, name="after"))
            got = messages(rs, sub, timeout=30)
            found = slot_of(rs)
        kinds = [(k, c.ids["id"]) if k is Sync else (k,) for k, c in got]
        assert kinds == [(Sync, 1), (Resync,), (Sync, 3)]
        assert "invalidated" in got[1][1].reason
        assert found is not None and found.wal_status != "lost" and found.active_pid is not None
    finally:
        done.set()
        rs.stop()
        rs.uninstall()


# -- transactions sent again to a new process ---------------------------------------------


class NoteBase(DeclarativeBase):
    pass


class Note(NoteBase):
    """A table no relationship criteria read: its rows come from the WAL, not from a read
    (which would find the newest row, whatever change it is for)."""

    __tablename__ = "slot_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


CRASHING = """
import os, signal, sys
import rowsync
from test_slots import Note

rs = rowsync.RowSync(sys.argv[1], rowsync.watchers(Note), capture="wal", consumer="worker")
deliver = rs.listener.on_batch


def crash(batch):
    # dispatched, then killed before the WAL thread confirms it to the slot
    deliver(batch)
    if any(getattr(item, "table", None) == "slot_notes" for item in batch):
        os.kill(os.getpid(), signal.SIGKILL)


rs.listener.on_batch = crash
rs.start()
print("started", flush=True)
sys.stdin.read()
"""


def crash_after_dispatch(rs: rowsync.RowSync, dsn: str, write: Callable[[], None]) -> None:
    """A process of ``rs``'s consumer dispatches ``write``'s transaction and is killed
    (SIGKILL) before it confirms it; returns once the server let go of its slot."""
    tests = Path(__file__).parent
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING, dsn],
        env={"PYTHONPATH": f"{tests.parent}:{tests}", "PATH": "/usr/bin:/bin"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "started\n"
        (slot,) = [s for s in channel_slots(rs) if s.active_pid is not None]
        write()
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    with rs.connect(autocommit=True) as conn:
        slots.release(conn, slot.active_pid, timeout=30)  # the server notices the lost client


def channel_slots(rs: rowsync.RowSync) -> list[slots.Slot]:
    with rs.connect(autocommit=True) as conn:
        return slots.of_channel(conn, rs.channel)


NOTES = sa.select(Note).order_by(Note.id)


def test_transactions_sent_again_to_a_new_process_do_not_take_a_tree_back(wal_engine, logical_dsn):
    """The killed process dispatched an update but never confirmed it: the slot sends it
    again to the next process, after that process loaded its tree with a later version of
    the row. A tree subscribed ``since`` a position that saw those transactions skips them,
    rather than be patched back to the older row and then forward."""
    NoteBase.metadata.create_all(wal_engine)
    sessions = sessionmaker(wal_engine, expire_on_commit=False)
    write = writer(sessions)
    rs = rowsync.RowSync(wal_engine, rowsync.watchers(Note), capture="wal", consumer="worker")
    rs.install()
    write(Note(id=1, body="v0"))
    update = sa.update(Note).where(Note.id == 1)
    try:
        crash_after_dispatch(rs, logical_dsn, lambda: write(update.values(body="v1")))
        write(update.values(body="v2"))
        loaded = threading.Event()
        deliver = rs.listener.on_batch

        def late(batch):  # what the slot sends again arrives after the tree was loaded
            loaded.wait(60)
            deliver(batch)

        rs.listener.on_batch = late
        with rs:
            position = rs.position()
            notes = fresh(sessions, NOTES)
            sub = rs.subscribe(notes, since=position)
            loaded.set()
            rs.flush()
            seen = []
            for message in sub.drain():
                notes = rs.sync(notes, message)
                seen.append([(n.id, n.body) for n in notes])
            write(update.values(body="v3"))
            notes = apply_all(rs, sub, notes)
        assert rs.listener.stats["received"] > 0 and seen == []
        assert [(n.id, n.body) for n in notes] == [(1, "v3")]
        assert snapshot(notes) == snapshot(fresh(sessions, NOTES))
    finally:
        rs.stop()
        rs.uninstall()
