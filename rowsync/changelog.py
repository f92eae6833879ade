"""Reading the change log (migration 0003): positions, catch-up, saved cursors, retention.

In durable mode and with ``capture="stream"`` the triggers append each event to
``<schema>.log``; the listener reads what was committed since its position. A position is
the ``pg_snapshot`` the last read ran under, not an id: ids are taken at insert and rows
appear at commit, so a smaller id can show up after a larger one was read. The next read
takes exactly the rows of transactions that were invisible to that snapshot (their xid is
at or past its ``xmax``, or among its in-progress xids) and are visible now. Nothing is
skipped, nothing is read twice, and a long transaction holds back only its own rows.

The position moves once a read's rows are handed over; a read cut short is started again
from the same position, skipping the rows it already handed over. The position is saved
(when the log has a consumer name) every ``save_interval`` and on stop, so a restarted
process replays at most the rows since the last save: at-least-once across restarts.
A saved position belongs to the role that saved it first; no other role can move it.

Pruning (by age, never below the installed retention) may still pass a reader that fell
behind. Every read looks, in its own snapshot, whether a prune happened since the last one
and removed rows its position had not read; if so it announces a gap before handing over
anything. A prune keeps the range of xids it removed, so a reader that saw one prune tells
exactly whether it lost rows; one that missed several (or restarts from a saved position)
compares the newest xid ever pruned with its position's xmin, which may announce a gap that
did not happen while a transaction older than the retention runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from rowsync.connect import run

logger = logging.getLogger(__name__)


class ChangeLog:
    """One reader's position in the log, and the upkeep it owes (saving it, pruning)."""

    def __init__(
        self,
        schema: str,
        *,
        consumer: str | None = None,
        retention: float = 3600.0,
        batch: int = 5000,
        save_interval: float = 1.0,
        prune_interval: float = 60.0,
    ) -> None:
        self.schema = schema
        self.consumer = consumer
        """Name the position is saved under, so a restarted process resumes from it."""
        self.retention = retention
        self.batch = batch
        self.save_interval = save_interval
        self.prune_interval = prune_interval
        self.position: str | None = None
        """The snapshot (``pg_snapshot`` text) of the last completed read."""
        self._saved: str | None = None
        self._handed: set[int] = set()
        """Log ids handed over since the position: a read cut short (a lost connection, a
        stop) and started again skips them, so a subscriber never sees an older change again
        after a newer one (within a process; after a restart, a replay is possible)."""
        self._next_save = 0.0
        self._next_prune = 0.0
        self._prunes: int | None = None
        """The log's prune count at the last read: unchanged, nothing was pruned since."""
        self._refused = False
        """Whether the consumer name belongs to another role (this position is not saved)."""
        # The queries name the schema and take values: run raw (``connect.run``), ``$1`` is
        # the position.
        ident = sql.Identifier(schema)
        self._read = sql.SQL(
            "SELECT id, payload FROM {}.log"
            " WHERE xid >= pg_snapshot_xmax($1::pg_snapshot)"
            " OR xid = ANY(ARRAY(SELECT pg_snapshot_xip($1::pg_snapshot)))"
            " ORDER BY id"
        ).format(ident)
        self._now = sql.SQL(
            "SELECT pg_current_snapshot()::text, coalesce(p.prunes, 0),"
            " coalesce(p.xid >= pg_snapshot_xmin($1::pg_snapshot), false),"
            " coalesce(NOT pg_visible_in_snapshot(p.high, $1::pg_snapshot)"
            "  OR EXISTS (SELECT FROM pg_snapshot_xip($1::pg_snapshot) AS x"
            "   WHERE x BETWEEN p.low AND p.high), true)"
            " FROM (SELECT) AS one LEFT JOIN {}.log_pruned AS p ON true"
        ).format(ident)

    def resume(self, conn: psycopg.Connection[TupleRow]) -> None:
        """Set the position on (re)connecting: the one held in memory, else the one this role
        saved for the consumer, else now."""
        if self.position is None and self.consumer is not None:
            row = run(
                conn,
                sql.SQL(
                    "SELECT last_read::text FROM {}.cursors"
                    " WHERE consumer = $1 AND owner = session_user"
                ).format(sql.Identifier(self.schema)),
                (self.consumer,),
            ).fetchone()
            if row is not None:
                self.position = self._saved = row[0]
                logger.info("resuming consumer %r from %s", self.consumer, self.position)
        if self.position is None:
            row = run(conn, self._now, (None,)).fetchone()
            assert row is not None
            self.position, self._prunes = row[0], row[1]  # nothing before now is owed

    def read(
        self,
        conn: psycopg.Connection[TupleRow],
        handle: Callable[[list[str]], None],
        gap: Callable[[str], None],
    ) -> None:
        """Hand the payloads committed since the position to ``handle``, oldest first, in
        batches; then move the position. First, if a prune removed rows the position had not
        read, call ``gap`` with the reason.

        Runs in one repeatable-read transaction, so the rows and the new position come from
        one snapshot. If ``handle`` raises, the position stays: the rows are read again.
        """
        assert self.position is not None, "resume() first"
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            row = run(conn, self._now, (self.position,)).fetchone()
            assert row is not None
            now, prunes, past_any, past_last = row
            seen = self._prunes
            if prunes != seen and (
                past_last if seen is not None and prunes == seen + 1 else past_any
            ):
                logger.warning("the change log was pruned past this listener's position")
                gap("the change log was pruned past this listener's position")
            self._prunes = prunes
            with psycopg.RawServerCursor(conn, "rowsync_log") as cursor:
                cursor.itersize = self.batch
                cursor.execute(self._read, (self.position,))
                while rows := cursor.fetchmany(self.batch):
                    fresh = [(i, payload) for i, payload in rows if i not in self._handed]
                    handle([payload for _, payload in fresh])
                    self._handed.update(i for i, _ in fresh)
        self.position = now
        self._handed.clear()

    def upkeep(self, conn: psycopg.Connection[TupleRow], *, final: bool = False) -> None:
        """Save the position and prune the log when they are due (saving always when final)."""
        now = time.monotonic()
        if (
            self.consumer is not None
            and self.position is not None
            and self.position != self._saved
            and (final or now >= self._next_save)
            and not self._refused
        ):
            row = run(
                conn,
                sql.SQL("SELECT {}.save_cursor($1, $2::pg_snapshot)").format(
                    sql.Identifier(self.schema)
                ),
                (self.consumer, self.position),
            ).fetchone()
            if row is None or not row[0]:
                self._refused = True
                logger.warning(
                    "consumer %r belongs to another database role: this listener's position "
                    "is not saved (choose another consumer name)",
                    self.consumer,
                )
            self._saved = self.position
            self._next_save = now + self.save_interval
        if not final and now >= self._next_prune:
            self._next_prune = now + self.prune_interval
            # Never past this reader's own position (the installed retention is kept anyway).
            row = run(
                conn,
                sql.SQL(
                    "SELECT {}.prune_log(make_interval(secs => $1), upto => $2::pg_snapshot)"
                ).format(sql.Identifier(self.schema)),
                (self.retention, self.position),
            ).fetchone()
            if row and row[0]:
                logger.info("pruned %d change-log rows older than %s s", row[0], self.retention)
