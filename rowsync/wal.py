"""``capture="wal"``: changes read from Postgres' logical decoding, no trigger in the writer.

A publication (named after the channel) lists the watched tables; a replication connection
(psycopg2's ``LogicalReplicationConnection``: psycopg 3 has no replication protocol) streams
its changes through the built-in ``pgoutput`` plugin from a temporary slot, which the server
drops with the connection. The messages (:mod:`rowsync.pgoutput`) become the same
:class:`~rowsync.listener.Notice` values the triggers' events do, and take the same path.

- Whole transactions, in commit order: pgoutput sends a transaction once it committed. A
  change's ``ref`` grows with commit order: it is the commit's LSN, or one past the previous
  change's ref when a transaction holds more changes than its commit record has bytes.
- ``xid`` comes from the transaction's Begin, widened to 64 bits, so positions
  (:mod:`rowsync.position`) work across the 32-bit counter's wraparounds.
- Each change carries its row (:class:`~rowsync.listener.Carried`): the dispatcher builds the
  row a read right after that commit would find, with no query, and reads only what the WAL
  left out (:meth:`rowsync.dispatch.Dispatcher.resolve`).
- A transaction is decoded as soon as its commit record is written, which can be before other
  sessions see it committed: a batch is handed over only once its transactions are visible
  to new snapshots (:class:`Visibility`). Not only for the rows still read: a subscriber's
  ``sync`` reads too (a new object's relationships, association links), and a position
  (``rs.position()``) taken after a change was handed over must have seen it.
- A TRUNCATE of a watched table deletes rows the WAL does not name: it is a gap, announced
  as ``(Resync, info)`` naming the tables, after the changes before it, to the subscriptions
  rows of these tables concern.
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
- Slots (:mod:`rowsync.slots`): without a consumer, a temporary slot per connection, which
  starts at the present: after a reconnect the subscribers get ``(Resync, info)``. With
  ``consumer="name"``, the consumer's persistent slot: a reconnect or a restarted process
  reads on from the last position confirmed, and a position is confirmed only once its batch
  was dispatched: at least once. A reconnect starts after what this process dispatched, so
  only a new process can get a transaction again. A slot
  that is gone (dropped, invalidated by ``max_slot_wal_keep_size``) is created again,
  announced as ``(Resync, info)``. A slot still in use (another process of the consumer, or
  one whose death the server has not noticed: ``wal_sender_timeout``) is tried again as a
  lost connection is, backing off.
- Origins (``rs.origin``): no trigger reads the writer's setting, so a tagged transaction
  that wrote carries its origin as a transactional logical message, sent at its commit
  (:func:`tag`): one small WAL record, and only for transactions tagged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import selectors
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
import sqlalchemy as sa
from psycopg import sql
from psycopg.pq import Format
from psycopg.rows import TupleRow

from rowsync import pgoutput, slots
from rowsync.columns import ColumnPolicy
from rowsync.connect import Connect, conninfo_of
from rowsync.errors import ConfigurationError, NotRunningError
from rowsync.fetch import SNAPSHOT
from rowsync.listener import (
    APPLICATION_NAME,
    Carried,
    Flush,
    Layout,
    Listener,
    Notice,
    OnGap,
    parse,
)
from rowsync.messages import Event
from rowsync.pgoutput import UNCHANGED
from rowsync.position import Position, widen
from rowsync.watchers import Watcher

logger = logging.getLogger(__name__)

VISIBLE_TIMEOUT = 5.0
"""Seconds a decoded transaction may take to become visible before rowsync hands it over
regardless (and announces a gap: what is read of it may be older than the changes)."""


class Visibility:
    """Waits until decoded transactions are visible to new snapshots, on a connection of its
    own (autocommit: each query takes a new snapshot).

    Each query takes a snapshot (:data:`rowsync.fetch.SNAPSHOT`) and tells visibility as
    ``pg_visible_in_snapshot`` does (:meth:`rowsync.position.Position.saw`), here rather than
    in the server: the statement has no parameter to send, and the server no array to unnest.
    A committed transaction (every decoded one is) that a snapshot saw is visible to every
    snapshot taken since, so transactions the last snapshot saw need no query: under a
    steady stream, those that committed before the previous batch's query ran, though
    decoded after it. Its xmin says the same of every transaction below it (they had all
    ended), and the highest one seen is kept for that."""

    def __init__(self, conn: psycopg.Connection[TupleRow], stats: Counter[str]) -> None:
        self.conn = conn
        self.stats = stats
        self.horizon = 0
        """The highest xmin seen (64-bit)."""
        self._last: Position | None = None
        """The latest snapshot taken."""

    def wait(self, xids: Sequence[int]) -> bool:
        """Wait until transactions ``xids`` are visible to new snapshots; False if they were
        not within :data:`VISIBLE_TIMEOUT`. Each is waited for: transactions may become
        visible in another order than they committed in."""
        if self._seen(xids):
            return True
        deadline = time.monotonic() + VISIBLE_TIMEOUT
        while True:
            self.stats["visibility_queries"] += 1
            row = self.conn.execute(SNAPSHOT).fetchone()
            if row is not None:
                self._last = Position.of(row[0])
                self.horizon = max(self.horizon, self._last.xmin)
                if self._seen(xids):
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0002)  # the commit is being made visible: a matter of microseconds

    def _seen(self, xids: Sequence[int]) -> bool:
        """Whether a snapshot already taken saw every transaction of ``xids``."""
        last = self._last
        return all(x < self.horizon or (last is not None and last.saw(x)) for x in xids)


FLUSH_PREFIX = "rowsync.flush:"
"""Prefix of the logical messages that carry flush barriers, followed by the channel."""
ANNOUNCE_PREFIX = "rowsync.announce:"
"""Prefix of the logical messages ``rs.announce()`` emits, followed by the channel: each one
an event in the triggers' format (:func:`rowsync.triggers.payload`)."""


def emit(channel: str) -> sql.Composed:
    """The statement handing an announced event (``payload``) over in this mode: a
    transactional logical message, decoded with its transaction's changes at its commit."""
    return sql.SQL("PERFORM pg_logical_emit_message(true, {}, payload);").format(
        sql.Literal(ANNOUNCE_PREFIX + channel)
    )


ORIGIN_PREFIX = "rowsync.origin:"
"""Prefix of the transactional logical messages that carry a writer's origin (``rs.origin``),
followed by the channel."""

_TAG = sa.text(
    "SELECT CASE WHEN pg_current_xact_id_if_assigned() IS NOT NULL"
    " THEN pg_logical_emit_message(true, :prefix, :origin) END"
)
"""A SQLAlchemy text clause, so that each driver gets its own parameter style (asyncpg's
is not psycopg's)."""


def tag(conn: sa.Connection, channel: str, origin: str) -> None:
    """Tag the transaction ``conn`` is about to commit with ``origin``: a transactional message,
    decoded within the transaction, before its commit (the trigger's setting has no WAL
    counterpart). Only when the transaction wrote (it has an id): a read-only one stays free
    of WAL, and works on a standby; not in a failed one, whose COMMIT only rolls back."""
    info = getattr(conn.connection.driver_connection, "info", None)  # psycopg's, sync or async
    if info is not None and info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
        return
    conn.execute(_TAG, {"prefix": ORIGIN_PREFIX + channel, "origin": origin})


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


_EVENTS: tuple[Event, ...] = ("inserted", "updated", "deleted")

_NOTHING_UNCHANGED: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Truncated:
    """A committed TRUNCATE of watched tables. The WAL does not say which rows it deleted:
    their subscribers can only load again (a gap, announced as ``(Resync, info)``)."""

    tables: tuple[tuple[str, str], ...]
    xid: int


_Watched = tuple[Watcher, tuple[tuple[str, int], ...], Callable[[Any], Any]]


@dataclass(frozen=True, slots=True)
class _Table:
    """What the decoder works out once per relation the stream describes (every change of
    it needs the same): how its rows are laid out, each column's loader, and for each event
    watched, the watcher and the index of each of its identifying columns."""

    schema: str
    table: str
    layout: Layout
    loaders: tuple[Callable[[bytes], Any], ...]
    watched: dict[Event, _Watched]
    """Per event watched: the watcher, the (name, index) of each identifying column
    published, and a function picking those columns' values out of a tuple (to tell
    whether an update changed them, at the cost of one call)."""
    followed: bool


class Decoder:
    """pgoutput messages in, :class:`Notice`, :class:`Flush` and :class:`Truncated` values
    out, a whole transaction at a time. Knows the relations the stream announced and what
    rowsync watches of each.

    A transaction's 32-bit id is widened to the 64-bit one positions compare with
    (:func:`rowsync.position.widen`), near the previous transaction's, starting ``near`` a
    64-bit id the server gave when the stream started.

    ``loaders`` make each column's text the value a read of its table gives (the engine's,
    :meth:`rowsync.fetch.RowSource.loaders`); without them, psycopg's global loaders."""

    def __init__(
        self,
        watchers: Sequence[Watcher],
        channel: str,
        near: int = 0,
        loaders: Loaders | None = None,
    ) -> None:
        self._loaders = loaders or _psycopg_loaders
        self._watched = {(w.schema, w.table, w.event): w for w in watchers}
        events: dict[tuple[str, str], set[Event]] = {}
        for w in watchers:
            events.setdefault((w.schema, w.table), set()).add(w.event)
        self._followed = {name for name, seen in events.items() if seen >= set(_EVENTS)}
        self._prefix = FLUSH_PREFIX + channel
        self._announced = ANNOUNCE_PREFIX + channel
        self._origin_prefix = ORIGIN_PREFIX + channel
        self._origin: str | None = None
        self._relations: dict[int, _Table] = {}
        self._near = near
        self._xid: int | None = None
        self._commit_lsn = 0
        self._changes: list[Notice | Truncated] = []
        self.ref = 0
        """The last ref given."""

    def feed(self, message: pgoutput.Decoded) -> list[Notice | Flush | Truncated]:
        """What ``message`` completes: a committed transaction's changes, or a barrier."""
        if isinstance(message, pgoutput.Update | pgoutput.Insert | pgoutput.Delete):
            if (notice := self._notice(message)) is not None:
                self._changes.append(notice)
        elif isinstance(message, pgoutput.Begin):
            self._near = widen(message.xid, self._near)
            self._xid, self._commit_lsn, self._changes = self._near, message.final_lsn, []
            self._origin = None
        elif isinstance(message, pgoutput.Commit):
            done: list[Notice | Flush | Truncated] = list(self._changes)
            if self._origin is not None:  # the writer's message, decoded before its commit
                done = [
                    dataclasses.replace(n, origin=self._origin) if isinstance(n, Notice) else n
                    for n in done
                ]
            self._xid, self._changes = None, []
            return done
        elif isinstance(message, pgoutput.Relation):
            self._relations[message.oid] = self._table(message)
        elif isinstance(message, pgoutput.Truncate):
            names = [
                (relation.schema, relation.table)
                for relation in map(self._relations.__getitem__, message.relations)
            ]
            if watched := tuple(n for n in names if any(k[:2] == n for k in self._watched)):
                self._changes.append(Truncated(watched, self._xid or 0))
        elif isinstance(message, pgoutput.Message) and message.prefix == self._prefix:
            return [Flush(message.content.decode())]
        elif isinstance(message, pgoutput.Message) and message.prefix == self._announced:
            self._changes.extend(self._announcement(message))
        elif isinstance(message, pgoutput.Message) and message.prefix == self._origin_prefix:
            self._origin = message.content.decode() or None  # "" is no origin, as in triggers
        return []

    def _table(self, relation: pgoutput.Relation) -> _Table:
        names = tuple(c.name for c in relation.columns)
        index = {name: i for i, name in enumerate(names)}
        watched: dict[Event, _Watched] = {}
        for event in _EVENTS:
            watcher = self._watched.get((relation.schema, relation.table, event))
            if watcher is not None:  # an identifying column not published is left out
                wanted = tuple((n, index[n]) for n in watcher.columns if n in index)
                pick: Callable[[Any], Any] = (
                    operator.itemgetter(*(i for _, i in wanted)) if wanted else _nothing
                )
                watched[event] = (watcher, wanted, pick)
        layout = Layout(names, tuple(c.type_oid for c in relation.columns))
        return _Table(
            relation.schema,
            relation.table,
            layout,
            self._loaders(relation.schema, relation.table, layout),
            watched,
            (relation.schema, relation.table) in self._followed,
        )

    def _announcement(self, message: pgoutput.Message) -> list[Notice]:
        """The event ``rs.announce()`` emitted, placed among its transaction's changes (a
        message outside a transaction is none of its). It carries no row: its row is read,
        and checked, as an event of the trigger modes is (whoever may emit logical messages
        can send one)."""
        if not message.transactional:
            return []
        try:
            notice = parse(message.content.decode())
        except ValueError as exc:  # UnicodeDecodeError too
            logger.warning("ignoring a malformed announced event (%s)", exc)
            return []
        if not isinstance(notice, Notice):
            return []
        self.ref = max(self.ref + 1, self._commit_lsn)
        return [dataclasses.replace(notice, ref=self.ref, xid=self._xid)]

    def _notice(
        self, message: pgoutput.Insert | pgoutput.Update | pgoutput.Delete
    ) -> Notice | None:
        table = self._relations[message.relation]
        old: dict[str, Any] | None = None
        if isinstance(message, pgoutput.Update):
            event: Event = "updated"
            current = message.new
            if message.old is not None and not message.key_only and UNCHANGED in current:
                # the whole old row (REPLICA IDENTITY FULL) holds what the new one left out
                current = tuple(
                    b if v is UNCHANGED else v for v, b in zip(current, message.old, strict=True)
                )
        elif isinstance(message, pgoutput.Insert):
            event, current = "inserted", message.new
        else:
            event, current = "deleted", message.old
        found = table.watched.get(event)
        if found is None:
            return None
        watcher, wanted, pick = found
        new = _values(table.loaders, current, wanted)
        before = message.old if isinstance(message, pgoutput.Update) else None
        # values before the update only when they differ: most updates leave them be
        if before is not None and pick(before) != pick(current):
            old = _values(table.loaders, before, wanted)
            if old == new:
                old = None
        unchanged = _NOTHING_UNCHANGED
        if UNCHANGED in current:
            names = table.layout.names
            unchanged = frozenset(names[i] for i, v in enumerate(current) if v is UNCHANGED)
        self.ref = max(self.ref + 1, self._commit_lsn)
        return Notice(
            self.ref,
            table.schema,
            table.table,
            event,
            new,
            old,
            watcher.label,
            None,
            self._xid,
            Carried(table.layout, current, unchanged, table.followed),
        )


def _nothing(values: tuple[pgoutput.Value, ...]) -> tuple[()]:
    """What an event none of whose identifying columns is published identifies by."""
    return ()


def _values(
    loaders: tuple[Callable[[bytes], Any], ...],
    values: tuple[pgoutput.Value, ...],
    wanted: tuple[tuple[str, int], ...],
) -> dict[str, Any]:
    """The ``wanted`` columns (name, index) of a tuple as Python values; an unchanged
    TOASTed value, which was not sent, is left out."""
    result: dict[str, Any] = {}
    for name, i in wanted:
        value = values[i]
        if value is None:
            result[name] = None
        elif value is not UNCHANGED:
            result[name] = loaders[i](value)  # type: ignore[arg-type]
    return result


Loaders = Callable[[str, str, Layout], tuple[Callable[[bytes], Any], ...]]
"""Given a table (schema, name) and the layout of its rows in the stream, a loader per column
making its text a Python value."""


def _psycopg_loaders(schema: str, table: str, layout: Layout) -> tuple[Callable[[bytes], Any], ...]:
    """psycopg's global text loader of each column's type; a type it does not know (an
    enum, a domain of one) stays text, which :func:`rowsync.fetch.coerce` reads."""
    return tuple(map(_loader, layout.oids))


def _loader(oid: int) -> Callable[[bytes], Any]:
    cls = psycopg.adapters.get_loader(oid, Format.TEXT)
    if cls is None:
        return bytes.decode
    load: Callable[[bytes], Any] = cls(oid).load
    return load


class WalSource(Listener):
    """The listener of ``capture="wal"``: same thread, lifecycle and callbacks, fed by a
    replication connection instead of NOTIFY payloads."""

    _kind = "WAL listener"

    def __init__(
        self,
        connect: Connect,
        *,
        channel: str,
        schema: str,
        watchers: Sequence[Watcher],
        on_batch: Callable[[Sequence[Notice | Flush]], None],
        on_gap: OnGap,
        probe_interval: float = 5.0,
        consumer: str | None = None,
        slot_timeout: float = 10.0,
        loaders: Loaders,
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
        self.consumer = consumer
        """Name of the persistent slot's reader (:func:`rowsync.slots.name`); None: a
        temporary slot per connection."""
        self.slot_timeout = slot_timeout
        """Seconds a slot's creation may wait for running transactions before it fails."""
        self.loaders = loaders
        """How the decoder loads identifying values (:class:`Decoder`)."""
        self.ref = 0
        """The last ref given, kept across connections, so refs never go back."""
        self.dispatched = 0
        """End LSN of the last transaction dispatched: a reconnect asks the slot to start
        there, so what this process already dispatched is not sent again (the slot's own
        position may lag: it is confirmed lazily)."""

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

    def _session(self) -> None:
        import psycopg2.extras  # the optional extra, checked by start()

        with self.connect(autocommit=True, name=APPLICATION_NAME) as notes:
            notes.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            if not notes.execute(
                "SELECT 1 FROM pg_publication WHERE pubname = %s", (self.publication,)
            ).fetchone():
                # checked before any slot is made: after an uninstall, none comes back
                raise ConfigurationError(
                    f"publication {self.publication!r} does not exist: run rs.install() "
                    "(or `rowsync install --capture wal`)"
                )
            repl = psycopg2.connect(  # as the engine connected notes, credentials included
                conninfo_of(notes, application_name=APPLICATION_NAME),
                connection_factory=psycopg2.extras.LogicalReplicationConnection,
            )
            walsender = repl.get_backend_pid()
            cursor: Any = repl.cursor()  # a ReplicationCursor, untyped in the stubs
            try:
                gap = None
                if self.consumer is None:
                    slot = slots.temporary_name(self.channel)
                    slots.create(cursor, notes, slot, temporary=True, timeout=self.slot_timeout)
                    if self._connected_before:
                        gap = "reconnect on a new temporary replication slot"
                else:
                    slot = slots.name(self.channel, self.consumer)
                    found = slots.find(notes, self.channel, slot)
                    if found is not None and found.active_pid is not None:
                        raise NotRunningError(
                            f"replication slot {slot} is active for PID {found.active_pid}: "
                            f"another process of consumer {self.consumer!r} streams from it, "
                            "or one that died and the server has not noticed yet (it frees "
                            "the slot after wal_sender_timeout)"
                        )
                    if found is not None and found.wal_status == "lost":
                        slots.discard(notes, slot)
                        found = None
                        gap = f"replication slot {slot} was invalidated (max_slot_wal_keep_size)"
                    if found is None:
                        slots.create(
                            cursor, notes, slot, temporary=False, timeout=self.slot_timeout
                        )
                        if self._connected_before:
                            gap = gap or f"replication slot {slot} was dropped"
                cursor.start_replication(
                    slot,
                    start_lsn=self.dispatched,
                    decode=False,
                    options={
                        "proto_version": "1",
                        "publication_names": sql.Identifier(self.publication).as_string(notes),
                        "messages": "true",
                    },
                )
                if gap is not None:
                    logger.warning("%s: changes may have been missed", gap)
                    gap = f"{gap}: the new slot starts at the present"
                self._now_connected(gap)
                self._stream(notes, cursor)
            finally:
                if self.consumer is not None:  # what was dispatched, confirmed before leaving
                    with contextlib.suppress(*self._errors):
                        cursor.send_feedback(force=True)
                repl.close()
                with contextlib.suppress(psycopg.Error):
                    slots.release(notes, walsender)

    def _stream(self, notes: psycopg.Connection[TupleRow], cursor: Any) -> None:
        row = notes.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        near = (row.fetchone() or (0,))[0]
        decoder = Decoder(self.watchers, self.channel, near, self.loaders)
        decoder.ref = self.ref
        visible = Visibility(notes, self.stats)
        with selectors.DefaultSelector() as selector:
            selector.register(notes.fileno(), selectors.EVENT_READ)
            selector.register(cursor.connection.fileno(), selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            busy = True  # look again before sleeping, as the listener does
            # A query on ``notes`` (visibility, a barrier's message, the probe) can take in
            # notifications that then wait in psycopg's backlog, not in the socket: they are
            # looked for after one, and when the socket has something; not on every turn
            # (psycopg's ``notifies()`` costs more than the rest of an idle turn).
            listen = True
            while not self._stopping.is_set():
                waited = not busy  # a whole wait going by without a word is what probes
                ready = {key.fd for key, _ in selector.select(0 if busy else self.probe_interval)}
                if self._wake_r in ready:
                    self._drain_wake()
                if self._stopping.is_set():
                    return
                queries = self.stats["visibility_queries"]
                batch: list[Notice | Flush] = []
                end_lsn = 0
                received = False
                while len(batch) < self.max_batch and (message := cursor.read_message()):
                    received = True
                    self.stats["received"] += 1
                    try:
                        decoded = pgoutput.decode(message.payload)
                    except pgoutput.DecodeError as exc:
                        self.stats["malformed"] += 1
                        logger.warning("undecodable WAL message (%s): %.200r", exc, message.payload)
                        self._gap("a WAL message could not be decoded")
                        continue
                    for done in decoder.feed(decoded):
                        if isinstance(done, Truncated):
                            self._hand_over(visible, batch)
                            batch = []
                            self._truncated(visible, done)
                        else:
                            batch.append(done)
                    if isinstance(decoded, pgoutput.Commit):
                        end_lsn = decoded.end_lsn
                if batch:
                    self._hand_over(visible, batch)
                self.ref = decoder.ref
                if end_lsn:  # only once dispatched: the slot resends what it was not told
                    self.dispatched = end_lsn
                    cursor.send_feedback(flush_lsn=end_lsn)
                listen = listen or notes.fileno() in ready
                listen |= self.stats["visibility_queries"] != queries
                payloads = self._receive(notes) if listen else []
                # more may wait in the backlog (past the budget), or come with a barrier's query
                listen = bool(payloads)
                barriers = [p for p in payloads if p]
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
                busy = bool(received or barriers or end_lsn)
                if not ready and waited and not busy:
                    notes.execute("SELECT 1")  # liveness probe: raises if the server is gone
                    listen = True

    def _hand_over(self, visible: Visibility, batch: list[Notice | Flush]) -> None:
        """Dispatch ``batch`` once its transactions are visible to new snapshots."""
        xids = sorted({n.xid for n in batch if isinstance(n, Notice) and n.xid is not None})
        if xids and not visible.wait(xids):
            self._gap("a decoded transaction did not become visible to reads")
        self._dispatch(batch)

    def _truncated(self, visible: Visibility, truncate: Truncated) -> None:
        """A TRUNCATE of watched tables, once visible (the snapshot the gap takes must have
        seen it): their rows are gone, and which ones the WAL does not say. A gap for the
        subscriptions their rows concern only."""
        self.stats["truncates"] += 1
        visible.wait([truncate.xid])
        names = ", ".join(f"{schema}.{table}" for schema, table in truncate.tables)
        self._gap(f"TRUNCATE of {names}: the rows it deleted are not in the WAL", truncate.tables)
