"""``capture="wal"``: changes read from Postgres' logical decoding, no trigger in the writer.

A publication (named after the channel) lists the watched tables; a replication connection
(psycopg2's ``LogicalReplicationConnection``: psycopg 3 has no replication protocol) streams
its changes through the built-in ``pgoutput`` plugin from a temporary slot, which the server
drops with the connection. The messages (:mod:`rowsync.pgoutput`) become the same
:class:`~rowsync.listener.Notice` values the triggers' events do, and take the same path.

- Whole transactions, in commit order: pgoutput sends a transaction once it committed. A
  change's ``ref`` grows with commit order: it is the commit's LSN, or one past the previous
  change's ref when a transaction holds more changes than its commit record has bytes.
- ``xid`` comes from the transaction's Begin, so positions (:mod:`rowsync.position`) work.
- A transaction is decoded as soon as its commit record is written, which can be before other
  sessions see it committed: the rows of a batch are read only once its last transaction is
  visible to a new snapshot (:func:`_await_visible`), else a read could find them as they
  were before.
- Old values: a row moving between parents must reach both, so an update needs the identifying
  columns it had before. Postgres logs them only as the replica identity: tables identified by
  more than their primary key (foreign keys, ``extra_columns``) get REPLICA IDENTITY FULL, the
  others keep the primary key (DEFAULT), which costs no extra WAL.
- Withheld columns (:mod:`rowsync.columns`) are left out of the publication by a column
  list. Postgres refuses updates of a table whose column list does not cover its replica
  identity, so a FULL table cannot have one: withholding columns of such a table is refused
  at install, rather than have them leave the server or make writes fail.
- Flush barriers still come as NOTIFY (:func:`rowsync.listener.send_flush`), on a connection
  that turns each one into a transactional logical message: it is decoded at its commit,
  after every transaction that committed before it, as a barrier must be. Its commit flushes
  the WAL; a non-transactional message would wait for the WAL writer (``wal_writer_delay``,
  200 ms by default) before the walsender could send it.
- A new slot starts at the present: after a reconnect the subscribers get ``(Resync, info)``.
- Origins (``rs.origin``): no trigger reads the writer's setting, so a tagged transaction
  that wrote carries its origin as a transactional logical message, sent at its commit
  (:func:`tag`): one small WAL record, and only for transactions tagged.
"""

from __future__ import annotations

import logging
import os
import selectors
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import psycopg
import sqlalchemy as sa
from psycopg import sql
from psycopg.pq import Format
from psycopg.rows import TupleRow

from rowsync import pgoutput
from rowsync.columns import ColumnPolicy
from rowsync.connect import Connect, conninfo_of
from rowsync.errors import ConfigurationError
from rowsync.listener import APPLICATION_NAME, Flush, Listener, Notice, _Stopped, parse
from rowsync.messages import Event
from rowsync.watchers import Watcher

logger = logging.getLogger(__name__)

_VISIBLE = sql.SQL(
    """
    SELECT pg_visible_in_snapshot(x.full::text::xid8, x.snap)
    FROM (
        SELECT snap, CASE WHEN ((top >> 32) << 32) | %(xid)s > top
                          THEN (((top >> 32) - 1) << 32) | %(xid)s
                          ELSE ((top >> 32) << 32) | %(xid)s END AS full
        FROM (SELECT pg_current_snapshot() AS snap) s,
             LATERAL (SELECT pg_snapshot_xmax(s.snap)::text::bigint AS top) t
    ) x
    """
)
"""Whether the transaction whose 32-bit id (pgoutput's) is ``xid`` is visible to a snapshot
taken now: the id widened to the epoch of the snapshot's xmax."""

VISIBLE_TIMEOUT = 5.0
"""Seconds a decoded transaction may take to become visible before rowsync reads regardless
(and announces a gap: the rows read may be older than the changes)."""


def _await_visible(conn: psycopg.Connection[TupleRow], xid: int) -> bool:
    """Wait until transaction ``xid`` (and so every earlier one of the stream) is visible to
    new snapshots; False if it was not within :data:`VISIBLE_TIMEOUT`."""
    deadline = time.monotonic() + VISIBLE_TIMEOUT
    while True:
        row = conn.execute(_VISIBLE, {"xid": xid}).fetchone()
        if row is not None and row[0]:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)  # the commit is being made visible: a matter of microseconds


FLUSH_PREFIX = "rowsync.flush:"
"""Prefix of the logical messages that carry flush barriers, followed by the channel."""
ORIGIN_PREFIX = "rowsync.origin:"
"""Prefix of the transactional logical messages that carry a writer's origin (``rs.origin``),
followed by the channel."""

_TAG = (
    "SELECT CASE WHEN pg_current_xact_id_if_assigned() IS NOT NULL"
    " THEN pg_logical_emit_message(true, %(prefix)s, %(origin)s) END"
)


def tag(conn: sa.Connection, channel: str, origin: str) -> None:
    """Tag the transaction ``conn`` is about to commit with ``origin``: a transactional message,
    decoded within the transaction, before its commit (the trigger's setting has no WAL
    counterpart). Only when the transaction wrote (it has an id): a read-only one stays free
    of WAL, and works on a standby; not in a failed one, whose COMMIT only rolls back."""
    info = getattr(conn.connection.driver_connection, "info", None)  # psycopg's, sync or async
    if info is not None and info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
        return
    conn.exec_driver_sql(_TAG, {"prefix": ORIGIN_PREFIX + channel, "origin": origin})


Identity = Literal["default", "full"]


def identity(table: sa.Table, columns: Sequence[str]) -> Identity:
    """The replica identity that logs the identifying ``columns`` of an old row: the primary
    key when it is all of them (DEFAULT), else every column (FULL)."""
    key = {c.name for c in table.primary_key.columns}
    return "default" if key and set(columns) <= key else "full"


def check_server(connect: Connect) -> None:
    """Raise :class:`ConfigurationError` unless the server can decode its WAL logically."""
    with connect(autocommit=True) as conn:
        row = conn.execute("SHOW wal_level").fetchone()
    level = row[0] if row else None
    if level != "logical":
        raise ConfigurationError(
            f"capture='wal' needs wal_level = logical, and the server runs with {level!r}: run "
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
        )


def install(
    conn: psycopg.Connection[TupleRow],
    watchers: Sequence[Watcher],
    tables: Mapping[tuple[str, str], sa.Table],
    policy: ColumnPolicy,
    publication: str,
) -> None:
    """Set each watched table's replica identity and (re)create the publication of exactly
    the watched tables and readable columns, in one transaction."""
    columns: dict[tuple[str, str], list[str]] = {}
    for w in watchers:
        columns.setdefault((w.schema, w.table), []).extend(w.columns)
    entries: list[sql.Composable] = []
    with conn.transaction():
        for name, identifying in sorted(columns.items()):
            table = tables[name]
            wanted = identity(table, identifying)
            withheld = policy.withheld(table)
            if wanted == "full" and withheld:
                raise ConfigurationError(
                    f"capture='wal' cannot withhold {sorted(withheld)} of {name[0]}.{name[1]}: "
                    "its identifying columns go beyond its primary key, so it needs REPLICA "
                    "IDENTITY FULL, which publishes every column"
                )
            target = sql.Identifier(*name)
            row = conn.execute(
                "SELECT relreplident FROM pg_class WHERE oid = %s::regclass",
                (target.as_string(conn),),
            ).fetchone()
            if row is None or row[0] != wanted[0]:
                logger.info("setting REPLICA IDENTITY %s on %s.%s", wanted.upper(), *name)
                conn.execute(
                    sql.SQL("ALTER TABLE {} REPLICA IDENTITY {}").format(
                        target, sql.SQL(wanted.upper())
                    )
                )
            entry: sql.Composable = target
            if withheld:
                readable = [c.name for c in table.columns if c.name not in withheld]
                entry = sql.SQL("{} ({})").format(
                    target, sql.SQL(", ").join(map(sql.Identifier, readable))
                )
            entries.append(entry)
        name_ = sql.Identifier(publication)
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(name_))
        conn.execute(
            sql.SQL(
                "CREATE PUBLICATION {} FOR TABLE {}"
                " WITH (publish = 'insert, update, delete, truncate')"
            ).format(name_, sql.SQL(", ").join(entries))
        )


def uninstall(conn: psycopg.Connection[TupleRow], publication: str) -> None:
    conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(publication)))


_EVENTS: dict[type, Event] = {
    pgoutput.Insert: "inserted",
    pgoutput.Update: "updated",
    pgoutput.Delete: "deleted",
}


class Decoder:
    """pgoutput messages in, :class:`Notice` and :class:`Flush` values out, a whole
    transaction at a time. Knows the relations the stream announced and what rowsync
    watches of each."""

    def __init__(self, watchers: Sequence[Watcher], channel: str) -> None:
        self._watched = {(w.schema, w.table, w.event): w for w in watchers}
        self._prefix = FLUSH_PREFIX + channel
        self._origin_prefix = ORIGIN_PREFIX + channel
        self._origin: str | None = None
        self._relations: dict[int, tuple[pgoutput.Relation, list[Callable[[bytes], Any]]]] = {}
        self._xid: int | None = None
        self._commit_lsn = 0
        self._changes: list[Notice] = []
        self.ref = 0
        """The last ref given."""

    def feed(self, message: pgoutput.Decoded) -> list[Notice | Flush]:
        """What ``message`` completes: a committed transaction's changes, or a barrier."""
        if isinstance(message, pgoutput.Begin):
            self._xid, self._commit_lsn, self._changes = message.xid, message.final_lsn, []
            self._origin = None
        elif isinstance(message, pgoutput.Relation):
            self._relations[message.oid] = (message, [_loader(c.type_oid) for c in message.columns])
        elif isinstance(message, pgoutput.Insert | pgoutput.Update | pgoutput.Delete):
            if (notice := self._notice(message)) is not None:
                self._changes.append(notice)
        elif isinstance(message, pgoutput.Commit):
            done: list[Notice | Flush] = list(self._changes)
            if self._origin is not None:  # the writer's message, decoded before its commit
                done = [replace(n, origin=self._origin) for n in self._changes]
            self._xid, self._changes = None, []
            return done
        elif isinstance(message, pgoutput.Message) and message.prefix == self._prefix:
            return [Flush(message.content.decode())]
        elif isinstance(message, pgoutput.Message) and message.prefix == self._origin_prefix:
            self._origin = message.content.decode() or None  # "" is no origin, as in triggers
        return []

    def _notice(
        self, message: pgoutput.Insert | pgoutput.Update | pgoutput.Delete
    ) -> Notice | None:
        relation, loaders = self._relations[message.relation]
        event = _EVENTS[type(message)]
        watcher = self._watched.get((relation.schema, relation.table, event))
        if watcher is None:
            return None
        names = [c.name for c in relation.columns]
        current = message.old if isinstance(message, pgoutput.Delete) else message.new
        before = message.old if isinstance(message, pgoutput.Update) else None
        new = _values(names, loaders, current, watcher.columns, before)
        old = None
        if before is not None:
            old = _values(names, loaders, before, watcher.columns, None)
            if old == new:
                old = None
        self.ref = max(self.ref + 1, self._commit_lsn)
        return Notice(
            self.ref,
            relation.schema,
            relation.table,
            event,
            new,
            old,
            watcher.label,
            None,
            self._xid,
        )


def _values(
    names: list[str],
    loaders: list[Callable[[bytes], Any]],
    values: tuple[pgoutput.Value, ...],
    wanted: Sequence[str],
    fallback: tuple[pgoutput.Value, ...] | None,
) -> dict[str, Any]:
    """The ``wanted`` columns of a tuple as Python values. An unchanged TOASTed value was
    not sent: it is the old row's, when that was."""
    result: dict[str, Any] = {}
    for name in wanted:
        if name not in names:
            continue  # not published
        i = names.index(name)
        value = values[i]
        if value is pgoutput.UNCHANGED and fallback is not None:
            value = fallback[i]
        if isinstance(value, bytes):
            result[name] = loaders[i](value)
        elif value is None:
            result[name] = None
    return result


def _loader(oid: int) -> Callable[[bytes], Any]:
    """psycopg's text loader of a type, as a query's result would use; a type it does not
    know (an enum, a domain of one) stays text, which :func:`rowsync.fetch.coerce` reads."""
    cls = psycopg.adapters.get_loader(oid, Format.TEXT)
    if cls is None:
        return lambda data: data.decode()
    load = cls(oid).load
    return lambda data: load(data)


class WalSource(Listener):
    """The listener of ``capture="wal"``: same thread, lifecycle and callbacks, fed by a
    replication connection instead of NOTIFY payloads."""

    def __init__(
        self,
        connect: Connect,
        *,
        channel: str,
        schema: str,
        watchers: Sequence[Watcher],
        on_batch: Callable[[Sequence[Notice | Flush]], None],
        on_gap: Callable[[str], None],
        probe_interval: float = 5.0,
    ) -> None:
        super().__init__(
            connect,
            channel=channel,
            schema=schema,
            on_batch=on_batch,
            on_gap=on_gap,
            probe_interval=probe_interval,
        )
        self.watchers = watchers
        self.publication = channel
        self._errors: tuple[type[Exception], ...] = (psycopg.Error,)
        """What a lost connection raises (psycopg2's errors too, once it is imported)."""

    def start(self) -> None:
        check_server(self.connect)
        try:
            import psycopg2
        except ImportError:
            raise ConfigurationError(
                "capture='wal' needs psycopg2: pip install 'rowsync[wal]'"
            ) from None
        self._errors = (psycopg.Error, psycopg2.Error)
        super().start()

    def _run(self) -> None:
        delay = self.backoff[0]
        while not self._stopping.is_set():
            try:
                self._connect()
                delay = self.backoff[0]
            except _Stopped:
                break
            except self._errors as exc:
                self.stats["connection_errors"] += 1
                if not self._stopping.is_set():
                    logger.warning("WAL connection lost (%s); retrying in %.2f s", exc, delay)
            except Exception:
                # never let the thread die: start over on a new slot (a gap is announced)
                self.stats["listener_errors"] += 1
                logger.exception("WAL listener failed; reconnecting in %.2f s", delay)
            finally:
                self.connected.clear()
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, self.backoff[1])

    def _connect(self) -> None:
        import psycopg2.extras  # the optional extra, checked by start()

        with self.connect(autocommit=True, name=APPLICATION_NAME) as notes:
            notes.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            repl = psycopg2.connect(  # as the engine connected notes, credentials included
                conninfo_of(notes, application_name=APPLICATION_NAME),
                connection_factory=psycopg2.extras.LogicalReplicationConnection,
            )
            try:
                cursor = repl.cursor()
                # generated, [a-z0-9_]: a valid identifier as it is
                slot = f"rowsync_{os.getpid()}_{uuid.uuid4().hex[:12]}"
                cursor.execute(f"CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput")
                cursor.start_replication(
                    slot,
                    decode=False,
                    options={
                        "proto_version": "1",
                        "publication_names": sql.Identifier(self.publication).as_string(notes),
                        "messages": "true",
                    },
                )
                self.connected.set()
                if self._connected_before:
                    self.stats["reconnects"] += 1
                    self._gap("reconnect: a new replication slot starts at the present")
                self._connected_before = True
                self._stream(notes, cursor)
            finally:
                repl.close()

    def _stream(self, notes: psycopg.Connection[TupleRow], cursor: Any) -> None:
        decoder = Decoder(self.watchers, self.channel)
        with selectors.DefaultSelector() as selector:
            selector.register(notes.fileno(), selectors.EVENT_READ)
            selector.register(cursor.connection.fileno(), selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            busy = True  # look again before sleeping, as the listener does
            while not self._stopping.is_set():
                ready = selector.select(0 if busy else self.probe_interval)
                self._drain_wake()
                if self._stopping.is_set():
                    return
                batch: list[Notice | Flush] = []
                end_lsn = 0
                while len(batch) < self.max_batch and (message := cursor.read_message()):
                    self.stats["received"] += 1
                    try:
                        decoded = pgoutput.decode(message.payload)
                    except pgoutput.DecodeError as exc:
                        self.stats["malformed"] += 1
                        logger.warning("undecodable WAL message (%s): %.200r", exc, message.payload)
                        self._gap("a WAL message could not be decoded")
                        continue
                    batch += decoder.feed(decoded)
                    if isinstance(decoded, pgoutput.Commit):
                        end_lsn = decoded.end_lsn
                xids = [n.xid for n in batch if isinstance(n, Notice) and n.xid is not None]
                if xids and not _await_visible(notes, max(xids)):
                    self._gap("a decoded transaction did not become visible to reads")
                self._dispatch(batch)
                if end_lsn:
                    cursor.send_feedback(flush_lsn=end_lsn)
                barriers = [p for p in self._receive(notes) if p]
                for payload in barriers:
                    try:
                        item = parse(payload)
                    except ValueError:
                        continue  # only barriers matter here
                    if isinstance(item, Flush):
                        notes.execute(
                            "SELECT pg_logical_emit_message(true, %s, %s)",
                            (FLUSH_PREFIX + self.channel, item.token),
                        )
                busy = bool(batch or barriers or end_lsn)
                if not ready and not busy:
                    notes.execute("SELECT 1")  # liveness probe: raises if the server is gone
