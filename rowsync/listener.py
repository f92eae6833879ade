"""Where events enter: one dedicated connection that LISTENs, in a thread of its own.

The connection is autocommit. The thread waits on the socket and on a wake-up pipe (so
``stop`` is immediate), drains notifications in batches, parses them into :class:`Notice`
values and hands each batch to ``on_batch``. Where the events come from depends on the mode:

- NOTIFY payloads (the default). Oversized events are read back from the overflow table.
  A broken connection is reopened with exponential backoff, and ``on_gap`` is called once
  it is back: notifications sent meanwhile are lost to NOTIFY, the subscribers must know.
- The change log (:mod:`rowsync.changelog`), read from the listener's position whenever a
  notification wakes it up (durable mode) or every ``poll_interval`` (``capture="stream"``).
  After a reconnect the reading simply goes on from the position: nothing is lost.

Flush barriers always come as notifications. A quiet connection is probed with ``SELECT 1``.

Bad input never stops the thread, and never spoils the rest of its batch: anyone may NOTIFY
on the channel, so a payload too large or too deeply nested, malformed, or naming a ref or a
transaction no trigger could have written yet (:class:`Issued`) is skipped, logged and counted;
values before an update without the trigger's seal are not routed by (:meth:`Listener._unsealed`),
nor those of a sealed update sent again (:mod:`rowsync.replay`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import selectors
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from rowsync.changelog import ChangeLog
from rowsync.connect import Connect, run
from rowsync.errors import RowsyncError
from rowsync.messages import Event
from rowsync.pgoutput import Value
from rowsync.position import Position
from rowsync.replay import Replays

logger = logging.getLogger(__name__)

APPLICATION_NAME = "rowsync-listener"
"""``application_name`` of the listener's connection, to find it in ``pg_stat_activity``."""

_EVENTS: dict[str, Event] = {"i": "inserted", "u": "updated", "d": "deleted"}

MAX_PAYLOAD = 1 << 20
"""Bytes (as characters) of the largest event read: identifying columns, not rows, travel."""
MAX_DEPTH = 32
"""Nesting of the deepest event read: an event is an object of objects of column values, a
value of a json column may nest a little further; a parser recursing through thousands of
levels would raise, or take the stack."""
MAX_BATCH_BYTES = 1 << 20
"""Payload bytes the listener takes in before handing a batch over: what it holds at once
stays bounded however fast the channel is flooded."""
_BIGINT = 1 << 63
_PARKED_CHUNK = 16
"""Parked events read back per query: at most this many times ``max_parked`` bytes at once."""


class OnGap(Protocol):
    """What a listener calls when changes may have been missed: every subscription must
    resync, or with ``tables`` (schema, name), only those rows of these tables concern
    (their rows changed in a way the stream does not name, as a TRUNCATE deletes)."""

    def __call__(self, reason: str, tables: Sequence[tuple[str, str]] | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class Notice:
    """One parsed row event, as the trigger sent it."""

    ref: int
    schema: str
    table: str
    event: Event
    new: dict[str, Any]
    old: dict[str, Any] | None
    label: str | None
    origin: str | None = None
    """The writer's ``rowsync.origin`` setting, if it tagged its transaction."""
    xid: int | None = None
    """The writer's transaction id: whether a snapshot saw the change (:mod:`rowsync.position`)."""
    row: Carried | None = None
    """The whole row as the change carried it, when it came from the WAL: a change known from
    the log of the database itself, not from a payload anyone may send."""
    sealed: tuple[str, str] | None = None
    """``(message, seal)`` of an update that carries values before, as the trigger sealed it
    (:func:`unseal`)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """The columns of a table's rows as a replication stream sends them, in order: one per
    table the stream describes, shared by its changes, so what depends on the columns alone
    is worked out once per table, not per change (:meth:`rowsync.fetch.RowSource.built`)."""

    names: tuple[str, ...]
    oids: tuple[int, ...]
    """Each column's type oid."""


@dataclass(frozen=True, slots=True)
class Carried:
    """A row as logical decoding carries it (``capture="wal"``): after an insert or an update,
    before a delete (its replica identity)."""

    layout: Layout
    values: tuple[Value, ...]
    """Each column of ``layout``: its value in Postgres' text form, None (NULL), or
    :data:`~rowsync.pgoutput.UNCHANGED` (not sent: an unchanged TOASTed value)."""
    unchanged: frozenset[str]
    """The columns ``values`` holds as unchanged."""
    followed: bool
    """Every change of the table's rows becomes a notice (every event is watched): an earlier
    row of the same key, as the dispatcher last handed it over, is then the version this
    change started from."""


@dataclass(frozen=True, slots=True)
class Flush:
    """A barrier: everything committed before it has been handed over once it is seen."""

    token: str


def parse(payload: str) -> Notice | Flush | dict[str, Any]:
    """A notice, a flush barrier, or (for an oversized event) ``{"r": ref, "x": True}``.

    Raises ``ValueError`` for anything else.
    """
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload larger than {MAX_PAYLOAD} characters")
    try:
        data = json.loads(payload)
    except RecursionError:
        raise ValueError("payload nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("payload is not an object")
    if _depth(data) > MAX_DEPTH:
        raise ValueError(f"payload nested deeper than {MAX_DEPTH} levels")
    if set(data) == {"f"} and isinstance(data["f"], str):
        return Flush(data["f"])
    ref = data.get("r")
    if not isinstance(ref, int) or isinstance(ref, bool) or not 0 < ref < _BIGINT:
        raise ValueError("missing ref, or not a bigint")
    if data.get("x") is True:
        return data
    schema, table, event, new, old, label, origin, xid = (
        data.get(k) for k in ("s", "t", "e", "n", "o", "l", "g", "v")
    )
    if not (
        isinstance(schema, str)
        and isinstance(table, str)
        and isinstance(event, str)
        and event in _EVENTS
        and isinstance(new, dict)
    ):
        raise ValueError("not a rowsync row event")
    if old is not None and not isinstance(old, dict):
        raise ValueError("old values are not an object")
    if label is not None and not isinstance(label, str):
        raise ValueError("label is not a string")
    if origin is not None and not isinstance(origin, str):
        raise ValueError("origin is not a string")
    if xid is not None and (
        not isinstance(xid, int) or isinstance(xid, bool) or not 0 <= xid < _BIGINT
    ):
        raise ValueError("xid is not a bigint")
    sealed = unseal(payload) if old is not None else None
    return Notice(ref, schema, table, _EVENTS[event], new, old, label, origin, xid, sealed=sealed)


SEALED = ', "k": "'
"""What a sealed payload's seal follows: the payload is the event's JSON object with a last
member ``"k"``, the seal of the object's text without it (:func:`rowsync.triggers.seal`)."""
_SEAL_LENGTH = 64
"""Hex digits of a seal (SHA-256)."""


def unseal(payload: str) -> tuple[str, str] | None:
    """``(message, seal)`` of a payload that ends as a sealed one does (``…, "k": "SEAL"}``):
    the message is the payload without that last member, byte for byte as the trigger sealed
    it (:func:`rowsync.triggers.seal`). None for any other payload."""
    start = len(payload) - len(SEALED) - _SEAL_LENGTH - 2
    if start < 1 or not payload.endswith('"}') or not payload.startswith(SEALED, start):
        return None
    return payload[:start] + "}", payload[start + len(SEALED) : -2]


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts, counted without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


class Issued:
    """How far rowsync's ref sequence and the database's transaction ids have gone.

    Every trigger takes its event's ref from the sequence and sends its transaction's id,
    and its event is read only once committed: an event beyond either bound was written by
    no trigger. Such a ref would make ``sync`` ignore every genuine change of its row until
    the sequence caught up (it keeps the newest ref it applied), such an xid would have the
    event replayed after any position; so they are skipped. The bounds are read at most
    once per batch, and only when an event exceeds the last ones read (both only grow).
    """

    def __init__(self, schema: str) -> None:
        self.sequence = sql.Identifier(schema, "ref_seq").as_string()
        self.ref = 0
        self.xid = 0
        """The sequence's last value and the next xid, as last read."""
        self.checked = True
        """False while the listener's role may not read the sequence (refs go unchecked)."""
        self._query = sql.SQL(
            "SELECT CASE WHEN has_sequence_privilege(s, 'SELECT, USAGE')"
            " THEN coalesce(pg_sequence_last_value(s), 0) END,"
            " pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
            " FROM (SELECT to_regclass({}) AS s) AS seq"
        ).format(sql.Literal(self.sequence))

    def beyond(self, item: Notice | dict[str, Any]) -> bool:
        ref = item.ref if isinstance(item, Notice) else item["r"]
        xid = item.xid if isinstance(item, Notice) else None
        return (self.checked and ref > self.ref) or (xid is not None and xid >= self.xid)

    def read(self, conn: psycopg.Connection[TupleRow]) -> None:
        row = conn.execute(self._query).fetchone()
        assert row is not None
        ref, self.xid = row
        if ref is None:
            if self.checked:
                logger.error(
                    "the listener's role cannot read rowsync's ref sequence %s: events with "
                    "forged refs cannot be told apart (grant it SELECT on the sequence)",
                    self.sequence,
                )
            self.checked = False
        else:
            self.checked, self.ref = True, ref


class Listener:
    """The LISTEN loop. ``on_batch`` runs in the listener thread, in notification order."""

    def __init__(
        self,
        connect: Connect,
        *,
        channel: str,
        schema: str,
        on_batch: Callable[[Sequence[Notice | Flush]], None],
        on_gap: OnGap,
        probe_interval: float = 5.0,
        max_batch: int = 5000,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        backoff: tuple[float, float] = (0.05, 5.0),
        log: ChangeLog | None = None,
        poll_interval: float | None = None,
        max_parked: int = 1 << 20,
    ) -> None:
        self.connect = connect
        self.channel = channel
        self.schema = schema
        self.on_batch = on_batch
        self.on_gap = on_gap
        self.probe_interval = probe_interval
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.backoff = backoff
        self.log = log
        """Read events from the change log instead of NOTIFY payloads."""
        self.poll_interval = poll_interval
        """Read the log this often even when no notification wakes the listener up."""
        self.max_parked = max_parked
        """Bytes above which a parked event is not read back (announced as a gap instead)."""
        self.seals_expected = True
        """Whether the triggers seal the updates that carry values before. Until an upgrade
        installs them (:meth:`rowsync.RowSync.start` finds them outdated), an update without a
        seal may be genuine: it is announced as a gap rather than taken as forged."""
        self.stats: Counter[str] = Counter()
        self.issued = Issued(schema)
        self.replays = Replays()
        self.connected = threading.Event()
        self.failure: str | None = None
        """Why the last connection attempt failed, until one succeeds (start() tells it)."""
        self._connected_before = False
        """Any later connection, after a reconnect or a stop and start, may have missed events."""
        self._errors: tuple[type[Exception], ...] = (psycopg.Error,)
        """What a lost connection raises: the thread counts it and connects again."""
        self._retry = self.backoff[0]
        """Seconds to wait before the next connection attempt: back to the least once one
        succeeds, doubled after each failure."""
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)

    def start(self) -> None:
        if self._thread is not None:
            if not self._stopping.is_set():
                return  # running
            self._thread.join()  # a stop that outlasted its timeout: never two threads
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"rowsync-listener[{self.channel}]", daemon=True
        )
        self._thread.start()

    def is_alive(self) -> bool:
        """Whether the listener thread runs (it reconnects by itself; only ``stop`` ends it)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        os.write(self._wake_w, b"x")
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("listener thread did not stop within %s s", timeout)
        else:
            self._thread = None

    def close(self) -> None:
        self.stop()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- the thread --------------------------------------------------------------------

    _kind = "listener"
    """How the thread's log lines name it."""

    def _run(self) -> None:
        """Connection after connection until stopped: a failure is counted and logged, never
        the end of the thread."""
        self._retry = self.backoff[0]
        while not self._stopping.is_set():
            try:
                self._session()
            except _Stopped:
                break
            except self._errors as exc:
                self.stats["connection_errors"] += 1
                self.failure = str(exc).strip()
                if not self._stopping.is_set():
                    logger.warning(
                        "%s connection lost (%s); retrying in %.2f s", self._kind, exc, self._retry
                    )
            except RowsyncError as exc:  # a setup the session cannot work with, said as it is
                self.stats["connection_errors"] += 1
                self.failure = str(exc)
                logger.error("%s; retrying in %.2f s", exc, self._retry)
            except Exception:
                # Never let the thread die: start over on a new connection (a gap is
                # announced, or the log or the slot is read again from the position).
                self.stats["listener_errors"] += 1
                logger.exception("%s failed; reconnecting in %.2f s", self._kind, self._retry)
            finally:
                self.connected.clear()
            if self._stopping.wait(self._retry):
                break
            self._retry = min(self._retry * 2, self.backoff[1])

    def _now_connected(self, gap: str | None) -> None:
        """The session is up: a reconnect counted, ``gap`` announced (before ``connected``
        is set: ``start()`` resumes positions after it), the retry delay back to the least."""
        if self._connected_before:
            self.stats["reconnects"] += 1
            logger.info("%s reconnected on channel %r", self._kind, self.channel)
        if gap is not None:
            self._gap(gap)
        self.connected.set()
        self.failure = None
        self._connected_before = True
        self._retry = self.backoff[0]

    def _session(self) -> None:
        """One connection's life: LISTEN, resume the log, serve until stopped or lost."""
        with self.connect(autocommit=True, name=APPLICATION_NAME) as conn:
            if self.log is None:  # a new session: what was committed before is not owed to it
                self.replays.begin(self._snapshot(conn))
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            if self.log is None:
                self._renew(conn)  # a snapshot that sees what committed before the LISTEN
            else:
                self.log.resume(conn)  # its first read says if rows were pruned
            self._now_connected(
                "reconnect" if self._connected_before and self.log is None else None
            )
            self._serve(conn)
            if self.log is not None:
                self.log.upkeep(conn, final=True)

    def _serve(self, conn: psycopg.Connection[TupleRow]) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(conn.fileno(), selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            # A query on this connection (overflow or log read, probe) can take in
            # notifications that then wait in psycopg's backlog, not in the socket: look
            # again before sleeping.
            queried = False
            catch_up = self.log is not None  # read the log at once after (re)connecting
            wait = self.poll_interval or self.probe_interval
            while not self._stopping.is_set():
                ready = selector.select(0 if queried or catch_up else wait)
                self._drain_wake()
                if self._stopping.is_set():
                    return
                payloads = self._receive(conn)
                idle = not ready and not queried  # a whole wait went by without a word
                if self.log is not None and (payloads or idle or catch_up):
                    # In log mode a read of the log is also the liveness probe.
                    self._read_log(conn, payloads)
                    catch_up = False
                    queried = True
                elif payloads:
                    self._handle(conn, payloads)
                    queried = True
                elif idle:
                    conn.execute("SELECT 1")  # liveness probe: raises if the server is gone
                    queried = True
                else:
                    queried = False

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass

    def _receive(self, conn: psycopg.Connection[TupleRow]) -> list[str]:
        """What has arrived, up to ``max_batch`` notifications and about ``max_batch_bytes``
        (the rest waits in the socket and the server's queue for the next batch)."""
        payloads: list[str] = []
        size = 0
        while len(payloads) < self.max_batch and size < self.max_batch_bytes:
            # a notification carries at most 8000 bytes: ask for no more than fit the budget
            room = max(1, (self.max_batch_bytes - size) // 8000)
            got = [
                n.payload
                for n in conn.notifies(
                    timeout=0, stop_after=min(self.max_batch - len(payloads), room)
                )
            ]
            if not got:
                break
            payloads += got
            size += sum(len(p) for p in got)
        return payloads

    def _parse(self, payloads: list[str]) -> list[Notice | Flush | dict[str, Any]]:
        self.stats["received"] += len(payloads)
        parsed: list[Notice | Flush | dict[str, Any]] = []
        for payload in payloads:
            try:
                parsed.append(parse(payload))
            except ValueError as exc:
                self.stats["malformed"] += 1
                logger.warning(
                    "skipping malformed event on %r (%s): %.200r", self.channel, exc, payload
                )
        return parsed

    def _issued(
        self, conn: psycopg.Connection[TupleRow], parsed: list[Notice | Flush | dict[str, Any]]
    ) -> list[Notice | Flush | dict[str, Any]]:
        """``parsed`` without the events no trigger could have written (see :class:`Issued`)."""
        events = [item for item in parsed if not isinstance(item, Flush)]
        if not any(self.issued.beyond(item) for item in events):
            return parsed
        self.issued.read(conn)
        kept: list[Notice | Flush | dict[str, Any]] = []
        for item in parsed:
            if not isinstance(item, Flush) and self.issued.beyond(item):
                self.stats["unissued"] += 1
                logger.warning(
                    "skipping an event on %r with a ref or transaction id not issued yet: %.200r",
                    self.channel,
                    item,
                )
                continue
            kept.append(item)
        return kept

    def _read_log(self, conn: psycopg.Connection[TupleRow], payloads: list[str]) -> None:
        """Deliver what the log holds past the position, then the flush barriers that came
        as notifications (the read began after they arrived, so it holds all before them).
        Other notifications only woke the listener up."""
        assert self.log is not None
        parsed = self._parse([p for p in payloads if p])
        flushes: list[Notice | Flush] = [item for item in parsed if isinstance(item, Flush)]
        if misrouted := sum(isinstance(item, Notice) for item in parsed):
            # Events sent as NOTIFY payloads are not in the log: these triggers were installed
            # for the notify mode, and their events are lost to this listener unless told.
            self.stats["misrouted"] += misrouted
            logger.warning(
                "%d event(s) arrived as NOTIFY payloads, not through the change log: the "
                "triggers were installed for another capture mode; run rs.install()",
                misrouted,
            )
            self._gap("the triggers send events for another capture mode")
        self.log.read(
            conn,
            lambda chunk: self._dispatch(
                [
                    item
                    for item in self._issued(conn, self._parse(chunk))
                    if isinstance(item, (Notice, Flush))
                ]
            ),
            self._gap,
        )
        if flushes:
            self._dispatch(flushes)
        self.log.upkeep(conn)

    def _handle(self, conn: psycopg.Connection[TupleRow], payloads: list[str]) -> None:
        # Only payloads sent on the channel: parked events are read back under their own seal.
        parsed = self._unsealed(conn, self._issued(conn, self._parse(payloads)))
        stubs = [p for p in parsed if isinstance(p, dict)]
        found, lost = self._overflow(conn, stubs) if stubs else ({}, 0)
        batch: list[Notice | Flush] = []
        for item in parsed:
            if isinstance(item, dict):
                if (resolved := found.get(item["r"])) is None:
                    continue  # counted by _overflow
                item = resolved
            batch.append(item)
        if lost:
            self._gap(f"{lost} oversized event(s) could not be read back")
        self._dispatch(self._once(conn, batch))

    def _once(
        self, conn: psycopg.Connection[TupleRow], batch: list[Notice | Flush]
    ) -> list[Notice | Flush]:
        """``batch``, where an update keeps its values before only the first time this session
        gets it (:mod:`rowsync.replay`): a sealed one sent again by whoever copied it is
        delivered as a forged one is (:meth:`_unsealed`), with no values before. Its change is
        genuine and its row is read anyway; only the parent it left is not told again.
        A renewal barrier is taken out, and another is sent when the memory asks for it."""
        kept: list[Notice | Flush] = []
        for item in batch:  # in order: a renewal applies to what arrives after it
            if isinstance(item, Flush):
                if self.replays.arrived(item.token):
                    continue
            elif item.old is not None and self.replays.replayed(item.ref, item.xid):
                self.stats["replayed"] += 1
                logger.warning(
                    "not routing by the values before of a sealed update on %r sent again: %.200r",
                    self.channel,
                    item,
                )
                item = dataclasses.replace(item, old=None, sealed=None)
            kept.append(item)
        self._renew(conn)
        return kept

    def _renew(self, conn: psycopg.Connection[TupleRow]) -> None:
        """Take a snapshot and send a barrier after it, if the memory of sealed updates taken
        asks for one (:class:`rowsync.replay.Replays`)."""
        if (token := self.replays.due()) is not None:
            self.replays.renewing(self._snapshot(conn, barrier=token), token)

    def _snapshot(self, conn: psycopg.Connection[TupleRow], barrier: str | None = None) -> Position:
        """A snapshot taken on the listener's connection, and the flush barrier ``barrier``
        sent through the channel after it (its statement commits once the snapshot is taken)."""
        if barrier is None:
            row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
        else:
            row = conn.execute(
                "SELECT pg_current_snapshot()::text, pg_notify(%s, %s)",
                (self.channel, json.dumps({"f": barrier})),
            ).fetchone()
        assert row is not None
        return Position.of(row[0])

    def _unsealed(
        self, conn: psycopg.Connection[TupleRow], parsed: list[Notice | Flush | dict[str, Any]]
    ) -> list[Notice | Flush | dict[str, Any]]:
        """``parsed``, where an event keeps its values before only under a genuine seal.

        An update is routed by its values before too (the subscriptions its row leaves learn
        that it left), and no read of the row can confirm them: only the trigger's seal does.
        An event without one, or with a wrong one, is delivered as an update whose values
        before are unknown (to whom the row itself concerns), counted and logged: anyone may
        NOTIFY, and a forged one must reach nobody else, nor make everyone resync. When seals
        cannot be checked at all (schema not upgraded, privilege missing), or the triggers are
        older than seals (:attr:`seals_expected`) and an update comes unsealed, a gap is
        announced: the genuine moves of the batch do not reach the subscriptions their rows
        left.
        """
        moves = [item for item in parsed if isinstance(item, Notice) and item.old is not None]
        if not moves:
            return parsed
        sealed = list({item.sealed: None for item in moves if item.sealed is not None})
        verdicts: dict[tuple[str, str], bool] | None = {}
        if sealed:
            check = sql.SQL("SELECT {}($1, $2)").format(sql.Identifier(self.schema, "sealed"))
            try:
                row = run(conn, check, ([m for m, _ in sealed], [k for _, k in sealed])).fetchone()
            except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedFunction) as exc:
                logger.warning("cannot check sealed updates (%s): see `rowsync status`", exc)
                self.stats["seals_unchecked"] += len(sealed)
                self._gap("the values before an update could not be checked")
                verdicts = None
            else:
                assert row is not None
                verdicts = dict(zip(sealed, row[0], strict=True))
        kept: list[Notice | Flush | dict[str, Any]] = []
        legacy = False
        for item in parsed:
            if isinstance(item, Notice) and item.old is not None:
                # False: forged (no seal, or a wrong one); None: not checked
                verdict = (
                    False
                    if item.sealed is None
                    else None
                    if verdicts is None
                    else verdicts[item.sealed]
                )
                if verdict is False:
                    self.stats["unsealed"] += 1
                    logger.warning(
                        "not routing by the values before of an update on %r without a valid "
                        "seal: %.200r",
                        self.channel,
                        item,
                    )
                    legacy = legacy or (item.sealed is None and not self.seals_expected)
                if not verdict:
                    item = dataclasses.replace(item, old=None, sealed=None)
            kept.append(item)
        if legacy:
            self._gap("an update's values before came unsealed, from outdated triggers")
        return kept

    def _dispatch(self, batch: list[Notice | Flush]) -> None:
        if self._stopping.is_set():
            raise _Stopped  # a long catch-up read is cut short; the log keeps the rest
        if not batch:
            return
        try:
            self.on_batch(batch)
        except psycopg.Error:
            raise
        except Exception as exc:
            if isinstance(getattr(exc, "orig", None), psycopg.OperationalError):
                # A row fetch lost its connection (the server restarting?): handled as the
                # loss of our own, so the batch is read again from the log, or announced.
                raise psycopg.OperationalError(f"row fetch failed: {exc}") from exc
            # The batch's changes were not delivered: nobody may go on believing they are current.
            self.stats["batch_errors"] += 1
            logger.exception("error while dispatching a batch of %d events", len(batch))
            self._gap("a batch of changes could not be dispatched")

    def _gap(self, reason: str, tables: Sequence[tuple[str, str]] | None = None) -> None:
        """Changes may have been missed (of ``tables`` only, if given): count it and let
        ``on_gap`` tell the subscribers."""
        self.stats["gaps"] += 1
        self.on_gap(reason, tables)

    def _overflow(
        self, conn: psycopg.Connection[TupleRow], stubs: list[dict[str, Any]]
    ) -> tuple[dict[int, Notice], int]:
        """Oversized events, read back from the overflow table where the trigger parked them,
        and how many genuine ones could not be (pruned, or larger than ``max_parked``).

        Only a stub whose seal matches its ref was sent by a trigger: any other is counted
        and dropped (anyone may NOTIFY; a forged stub must not make every subscriber
        resync). Parked payloads are read a few at a time, none larger than ``max_parked``.
        """
        self.stats["overflow"] += len(stubs)
        sealed: list[tuple[int, str]] = []
        for stub in stubs:
            if isinstance(stub.get("k"), str) and -(2**63) <= stub["r"] < 2**63:
                sealed.append((stub["r"], stub["k"]))
            else:
                self._forged(stub["r"])
        parked = sql.SQL("SELECT ref, sealed, bytes, payload FROM {}($1, $2, $3)").format(
            sql.Identifier(self.schema, "parked")
        )
        result: dict[int, Notice] = {}
        lost = 0
        for start in range(0, len(sealed), _PARKED_CHUNK):
            chunk = sealed[start : start + _PARKED_CHUNK]
            try:
                rows = run(
                    conn, parked, ([r for r, _ in chunk], [k for _, k in chunk], self.max_parked)
                ).fetchall()
            except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedFunction) as exc:
                logger.warning("cannot read oversized events back (%s): see `rowsync status`", exc)
                self.stats["overflow_missing"] += len(sealed) - start
                return result, lost + len(sealed) - start
            for ref, genuine, size, payload in rows:
                if not genuine:
                    self._forged(ref)
                    continue
                try:
                    notice = parse(payload) if payload is not None else None
                except ValueError:
                    notice = None
                if isinstance(notice, Notice):
                    result[ref] = notice
                    continue
                lost += 1
                problem = "missing" if size is None else "too_large" if payload is None else None
                self.stats[f"overflow_{problem}" if problem else "malformed"] += 1
                logger.warning(
                    "oversized event %s could not be read back (%s bytes parked, at most %d read)",
                    ref,
                    size,
                    self.max_parked,
                )
        return result, lost

    def _forged(self, ref: object) -> None:
        self.stats["overflow_forged"] += 1
        logger.warning("dropping an overflow reference without a valid seal (ref %.30r)", ref)


class _Stopped(Exception):
    """Raised inside the thread to leave a read when ``stop`` was asked for."""


def send_flush(connect: Connect, channel: str, token: str) -> None:
    """Commit a flush barrier on ``channel`` from a connection of its own."""
    with connect(autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (channel, json.dumps({"f": token})))
