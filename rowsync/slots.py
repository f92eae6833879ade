"""rowsync's replication slots (``capture="wal"``): names, creation, listing, dropping.

A logical slot is the server's bookmark in the WAL for one reader: it keeps every WAL file the
reader has not confirmed, so a slot nobody reads fills the disk. Hence the rules:

- **Names.** ``rowsync_<channel hash>_<consumer>_<hash>`` for a consumer's persistent slot:
  a slot name may only hold ``[a-z0-9_]`` and 63 bytes, so the consumer's name is kept
  readable where it can be and a hash keeps distinct names distinct. A listener without a
  consumer takes a temporary slot, ``rowsync_<channel hash>_tmp<pid>_<random>``, which the
  server drops with the connection (a crashed process leaves none behind). Every slot of a
  channel starts with the same prefix: that is how ``uninstall`` and ``status`` find them.
- **Created by the listener**, when it starts and finds none, never by ``install``: one path
  for the first creation and for re-creating a slot an operator dropped or the server
  invalidated, and no slot where no listener will ever run (an install in CI, say).
- **Creation waits** for every transaction that was writing when it began (logical decoding
  needs a consistent starting point): it is bounded, and a timeout names the backends that
  held it up rather than hanging the start.
- **Dropped by ``uninstall``**, which refuses while a listener still streams from one: it
  would take the slot again, or create a new one that retains WAL forever.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from rowsync.errors import ConfigurationError, NotRunningError
from rowsync.triggers import MAX_IDENTIFIER

logger = logging.getLogger(__name__)

PREFIX = "rowsync_"


def prefix(channel: str) -> str:
    """What the name of every slot of ``channel`` starts with."""
    return f"{PREFIX}{hashlib.sha256(channel.encode()).hexdigest()[:8]}_"


def name(channel: str, consumer: str) -> str:
    """The persistent slot of ``consumer`` on ``channel``: the same in every process."""
    digest = hashlib.sha256(repr((channel, consumer)).encode()).hexdigest()[:10]
    head = prefix(channel)
    readable = re.sub(r"[^a-z0-9_]", "_", consumer.lower())
    room = MAX_IDENTIFIER - len(head) - len(digest) - 1
    return f"{head}{readable[:room]}_{digest}"


def temporary_name(channel: str) -> str:
    """A temporary slot's name, new at each connection."""
    return f"{prefix(channel)}tmp{os.getpid()}_{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Slot:
    """One of rowsync's slots as ``pg_replication_slots`` shows it."""

    name: str
    temporary: bool
    active_pid: int | None
    """The walsender streaming from it, if one does."""
    wal_status: str | None
    """``reserved``, ``extended``, ``unreserved``, or ``lost``: invalidated by
    ``max_slot_wal_keep_size``, it can no longer be read from."""
    retained: int | None
    """WAL bytes the slot keeps on the server's disk (``pg_current_wal_lsn() - restart_lsn``)."""
    lag: int | None
    """WAL bytes written since its reader's last confirmed position."""


_LIST = """
    SELECT slot_name::text, temporary, active_pid, wal_status,
           (pg_current_wal_lsn() - restart_lsn)::bigint,
           (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
    FROM pg_replication_slots
    WHERE database = current_database() AND starts_with(slot_name::text, %s)
    ORDER BY slot_name
"""


def of_channel(conn: psycopg.Connection[TupleRow], channel: str) -> list[Slot]:
    """rowsync's slots of ``channel`` in this database."""
    return [Slot(*row) for row in conn.execute(_LIST, (prefix(channel),)).fetchall()]


def find(conn: psycopg.Connection[TupleRow], channel: str, slot: str) -> Slot | None:
    return next((s for s in of_channel(conn, channel) if s.name == slot), None)


def create(
    cursor: Any, notes: psycopg.Connection[TupleRow], slot: str, *, temporary: bool, timeout: float
) -> None:
    """Create ``slot`` for ``pgoutput`` from the replication connection of ``cursor`` (a
    temporary slot belongs to the session that creates it), within ``timeout`` seconds;
    ``notes``, another connection, looks for what blocked it if it does not finish in time."""
    import psycopg2.errors  # the optional extra: only the WAL source gets here

    before = _writers(notes)
    cursor.execute("SET statement_timeout = %s", (max(1, round(timeout * 1000)),))
    try:
        cursor.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput', %s)", (slot, temporary)
        )
    except psycopg2.errors.QueryCanceled:
        now = _writers(notes)
        blocking = {pid: what for pid, what in now.items() if pid in before} or now
        blocking.pop(cursor.connection.get_backend_pid(), None)
        raise NotRunningError(
            f"could not create replication slot {slot} within {timeout} s: logical decoding "
            "first waits for every transaction that was writing to end; "
            + (
                "still running: "
                + "; ".join(f"backend {p} ({w})" for p, w in blocking.items())
                + " (commit or end them, e.g. SELECT pg_terminate_backend(pid))"
                if blocking
                else "none is left now: start again"
            )
        ) from None
    finally:
        cursor.execute("RESET statement_timeout")
    logger.info("created replication slot %s (%s)", slot, "temporary" if temporary else "kept")


def _writers(conn: psycopg.Connection[TupleRow]) -> dict[int, str]:
    """Backends in a transaction that has written (holds an xid), other than ``conn``'s:
    pid -> what ``pg_stat_activity`` shows this role of them."""
    rows = conn.execute(
        "SELECT l.pid, coalesce(a.datname, '?'), coalesce(a.application_name, ''),"
        " coalesce(a.state, '?'), coalesce(to_char(a.xact_start, 'YYYY-MM-DD HH24:MI:SS'), '?')"
        " FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted"
        " AND l.pid IS NOT NULL AND l.pid <> pg_backend_pid()"
    ).fetchall()
    return {
        pid: f"database {db}, application {app!r}, {state}, in a transaction since {since}"
        for pid, db, app, state, since in rows
    }


def release(conn: psycopg.Connection[TupleRow], pid: int, timeout: float = 5.0) -> None:
    """Wait until walsender ``pid``, whose connection was just closed, lets go of its slot:
    the next start (this process's or another's, same consumer) or an ``uninstall`` would
    otherwise find it still in use."""
    deadline = time.monotonic() + timeout
    while (
        conn.execute("SELECT 1 FROM pg_replication_slots WHERE active_pid = %s", (pid,)).fetchone()
        is not None
        and time.monotonic() < deadline
    ):
        time.sleep(0.005)  # the server ends the walsender a moment after the client closed


def drop(conn: psycopg.Connection[TupleRow], channel: str) -> list[str]:
    """Drop the persistent slots of ``channel``; refuse, dropping nothing, while a listener
    streams from any of them (temporary ones go by themselves when it stops)."""
    found = of_channel(conn, channel)
    if busy := [s for s in found if s.active_pid is not None]:
        raise ConfigurationError(
            "replication slots of this channel are in use: "
            + ", ".join(f"{s.name} by backend {s.active_pid}" for s in busy)
            + "; stop their listeners first (rs.stop()), else they would take them again"
        )
    dropped = [s.name for s in found if not s.temporary]
    for slot in dropped:
        discard(conn, slot)
    return dropped


def discard(conn: psycopg.Connection[TupleRow], slot: str) -> None:
    """Drop one unused slot (an invalidated one, or at uninstall)."""
    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    logger.info("dropped replication slot %s", slot)
