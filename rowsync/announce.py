"""Announce rows as changed: events for writes that no trigger saw.

``pg_restore``, a ``COPY`` into a table whose triggers were disabled, or a session with
``session_replication_role = replica`` change rows without a single event; every process
holding those rows goes on serving the old ones. :func:`announce` walks the watched tables
in primary-key order, a batch per transaction, and emits for every row the event its
``updated`` trigger would have (``inserted`` for a table watched only for inserts), through
the same channel as the triggers (a NOTIFY or the change log, by mode; with
``capture="wal"``, a logical message in the WAL, :func:`rowsync.wal.emit`). Listeners fetch
the rows and subscribers patch their trees as for any update.

A row deleted while the triggers were off cannot be announced: it is gone. Subscribers learn
of those by ``rs.resync`` (a resync of what they hold re-reads it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, TypeAlias

import psycopg
import sqlalchemy as sa
from psycopg import sql
from psycopg.rows import TupleRow

from rowsync import triggers, wal
from rowsync.connect import run
from rowsync.watchers import Watcher

logger = logging.getLogger(__name__)

BATCH = 1000

Mode: TypeAlias = triggers.Mode | Literal["wal"]
"""The capture mode, which decides how an announced event leaves its transaction."""


def announced(watchers: Sequence[Watcher]) -> list[Watcher]:
    """The watchers whose events announce a table's rows: its ``updated`` ones, or else its
    ``inserted`` ones; a table watched only for deletes has nothing to announce."""
    by_table: dict[tuple[str, str], list[Watcher]] = {}
    for w in watchers:
        by_table.setdefault((w.schema, w.table), []).append(w)
    return [
        w
        for ws in by_table.values()
        for w in [w for w in ws if w.event == "updated"] or [w for w in ws if w.event == "inserted"]
    ]


def announce_table(
    conn: psycopg.Connection[TupleRow],
    watcher: Watcher,
    *,
    schema: str,
    channel: str,
    mode: Mode,
    batch: int = BATCH,
    progress: triggers.Progress | None = None,
) -> int:
    """Emit ``watcher``'s event for every row of its table; return how many were sent.

    Each batch commits on its own (its events are delivered then), so a long run shows up
    progressively and an interruption keeps what was sent.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    table = sql.Identifier(watcher.schema, watcher.table)
    # A table without a primary key may hold equal rows and NULLs: pages follow ``ctid``.
    page = ("ctid",) if _keyless(watcher) else watcher.primary_key
    keys = sql.SQL(", ").join(sql.Identifier("t", c) for c in page)
    total = _one(conn, sql.SQL("SELECT count(*) FROM {}").format(table))
    _create_emitter(conn, schema, channel, mode)
    # The lateral subquery draws one ref per row, in key order. The query names the table
    # and takes the last page's keys as values: run raw (``connect.run``).
    select = sql.SQL(
        "SELECT {keys}, r.ref, {payload} FROM"
        " (SELECT {columns} FROM {table} AS t {after} ORDER BY {keys} LIMIT {batch}) AS t"
        " CROSS JOIN LATERAL (SELECT nextval({seq}) AS ref) AS r ORDER BY {keys}"
    )
    fields = dict(
        keys=keys,
        columns=sql.SQL("t.ctid, t.*" if _keyless(watcher) else "*"),
        seq=triggers.sequence(schema),
        payload=triggers.payload(
            watcher,
            sql.SQL("r.ref"),
            triggers.ids(sql.SQL("to_jsonb(t)"), watcher.columns),
            sql.SQL("NULL"),
        ),
        table=table,
        batch=sql.Literal(batch),
    )
    after: tuple[Any, ...] | None = None
    done = 0
    name = f"{watcher.schema}.{watcher.table}"
    if progress is not None:
        progress(name, done, total)
    while True:
        where: sql.Composable = sql.SQL("")
        if after is not None:
            where = sql.SQL("WHERE ({}) > ({})").format(
                keys, sql.SQL(", ").join(sql.SQL(f"${i}") for i in range(1, len(after) + 1))
            )
        with conn.transaction():
            rows = run(conn, select.format(after=where, **fields), after or ()).fetchall()
            if not rows:
                break
            width = len(page)
            conn.execute(
                "SELECT pg_temp.rowsync_announce(%s, %s)",
                ([r[width] for r in rows], [r[width + 1] for r in rows]),
            )
        after = rows[-1][:width]
        done += len(rows)
        if progress is not None:
            progress(name, done, max(total, done))
    logger.info("announced %d rows of %s", done, name)
    return done


def _keyless(watcher: Watcher) -> bool:
    """Whether the watched table is a table without a primary key (a plain association table)."""
    return isinstance(watcher.model, sa.Table) and not watcher.model.primary_key.columns


def _create_emitter(
    conn: psycopg.Connection[TupleRow], schema: str, channel: str, mode: Mode
) -> None:
    """A function of this session that hands events over exactly as the triggers do."""
    body = sql.SQL(
        """
DECLARE
    rowsync_ref bigint;
    payload text;
BEGIN
    FOR i IN 1 .. coalesce(array_length(payloads, 1), 0) LOOP
        rowsync_ref := refs[i];
        payload := payloads[i];
        {emit}
    END LOOP;
END
"""
    ).format(emit=wal.emit(channel) if mode == "wal" else triggers.emit(mode, schema, channel))
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION pg_temp.rowsync_announce("
                "refs bigint[], payloads text[]) RETURNS void LANGUAGE plpgsql AS {}"
            ).format(sql.Literal(body.as_string()))
        )


def _one(conn: psycopg.Connection[TupleRow], query: sql.Composed) -> int:
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])
