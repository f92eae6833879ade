"""Dispatch: from a batch of notices (the listener's) to messages in subscription queues.

Two stages. ``resolve``: the changed rows are fetched, one query per table
(:mod:`rowsync.fetch`), or built from the row a change from the WAL carried. ``deliver``: each
row is cached under the change that produced it (:mod:`rowsync.cache`); each change is then
routed (:mod:`rowsync.router`) and queued, in notification order, for every subscription it
concerns that does not ignore its origin (one with an authorizer gets it once that allows it,
:mod:`rowsync.authorizers`). Both run in the listener thread; with a fan-out backend the
capture process resolves and every node delivers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from rowsync.authorizers import Authorizers
from rowsync.cache import GONE, CachedRow, RowCache
from rowsync.fetch import JSON_TYPES, RowSource, coerce, key_of, qualified_name, usable_key
from rowsync.listener import Carried, Flush, Notice
from rowsync.messages import Change, Event, Message, Resync, ResyncInfo, Sync
from rowsync.position import Journal, Position
from rowsync.router import Router
from rowsync.subscription import Subscription

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resolved:
    """One change with its row fetched: everything needed to cache, route and deliver it."""

    ref: int
    table: tuple[str, str]
    """``(schema, table)`` of the changed row."""
    event: Event
    new: dict[str, Any]
    """Identifying values after the change (before it, for a delete)."""
    old: dict[str, Any] | None
    """Identifying values before an update that changed them."""
    origin: str | None
    row: CachedRow | None = None
    """The row as fetched; None for a delete, or for a row gone before its fetch."""
    readable: bool = True
    """False when the table could not be read (schema drift): subscribers must resync."""
    xid: int | None = None
    """The writer's transaction id, when the trigger sent it."""


_Read = tuple[dict[tuple[Any, ...], CachedRow], set[tuple[Any, ...]]]
"""One table's rows read for a batch, by key, and the keys no query could bind."""


def _agrees(claimed: dict[str, Any], actual: Mapping[str, Any]) -> bool:
    """Whether the identifying values an event claims are the row's own. A value is compared
    when the row's is of a type JSON carries (:func:`rowsync.fetch.coerce` makes the claim one);
    of another (an enum member, a custom type's value) it cannot be told from the claim."""
    for name, value in claimed.items():
        if name not in actual:
            return False  # no column the listener reads: no trigger sends it
        real = actual[name]
        if value != real and (real is None or type(real) in JSON_TYPES):
            return False
    return True


class Held:
    """The flush barriers a held dispatcher has received (and not handed over)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._arrived = threading.Condition()

    def saw(self, batch: Sequence[Notice | Flush]) -> None:
        with self._arrived:
            self._seen.update(item.token for item in batch if isinstance(item, Flush))
            self._arrived.notify_all()

    def wait(self, token: str, timeout: float) -> bool:
        """Whether the barrier ``token`` arrived within ``timeout`` seconds: everything
        committed before it was sent is then held."""
        with self._arrived:
            return self._arrived.wait_for(lambda: token in self._seen, timeout)


class Dispatcher:
    """The listener's ``on_batch`` and ``on_gap``."""

    def __init__(
        self,
        tables: dict[tuple[str, str], tuple[sa.Table, Any]],
        rows: RowSource,
        cache: RowCache,
        router: Router,
        stats: Counter[str],
        journal_size: int = 10_000,
    ) -> None:
        self._tables = tables
        self.rows = rows
        self.cache = cache
        self.router = router
        self.stats = stats
        self.flushes: dict[str, threading.Event] = {}
        """Flush barriers waited for, by token."""
        self.authorizers = Authorizers(stats)
        """Where subscriptions with an authorizer get their messages: off this thread."""
        self.journal: Journal[Resolved] = Journal(journal_size, lambda change: change.xid)
        """What was delivered lately, for subscriptions that start from a position."""
        self._delivering = threading.RLock()
        """Held while changes are routed and queued: a subscription registered and replayed
        under it has nothing delivered in between."""
        self._hold_lock = threading.Lock()
        self._held: Held | None = None
        self._pending: list[Notice | Flush] = []
        """What arrived while held, handed over with the next batch."""
        self._generation = 0
        """Gaps so far: the rows the WAL's changes left before one are no longer known."""

    def batch(self, batch: Sequence[Notice | Flush]) -> None:
        """The listener's ``on_batch``: resolve the batch, then deliver it."""
        with self._hold_lock:
            if self._held is not None:
                self._pending.extend(batch)
                self._held.saw(batch)
                return
            if self._pending:
                batch, self._pending = [*self._pending, *batch], []
        self.deliver(self.resolve(batch))

    @contextlib.contextmanager
    def holding(self) -> Iterator[Held]:
        """Hand nothing over while the block runs: whatever the listener receives meanwhile
        waits, and goes out with the first batch after the block, as part of it.

        Whether back-to-back commits reach :meth:`resolve` in one batch (their rows fetched
        after the last of them) or one by one is otherwise a matter of timing; tests use this
        (through :func:`rowsync.testing.one_batch`) to choose the path they exercise."""
        held = Held()
        with self._hold_lock:
            if self._held is not None:
                raise RuntimeError("the dispatcher is already held")
            self._held = held
        try:
            yield held
        finally:
            with self._hold_lock:
                self._held = None

    def resolve(self, batch: Sequence[Notice | Flush]) -> list[Resolved | Flush]:
        """Validate the batch's notices and read their rows, one query per table.

        A change from the WAL carries its row (:class:`~rowsync.listener.Carried`): the row
        is the one a read right after that change's commit would find, built with no query
        (:meth:`RowSource.built`), and the change is true (the database logged it, nobody
        forged it), so a delete is not read either. Only a row that cannot be built
        completely is read, as in the other modes (``stats["wal_fetches"]``).

        The result holds everything delivery needs, so it can also travel: a fan-out
        backend carries it from the capture process to the other nodes.
        """
        pending: list[tuple[Resolved | Flush, bool, bool]] = []
        """Each item, whether its row must be read (and checked), and whether the row it
        leaves is kept as its key's newest (a change from the WAL, of a followed table)."""
        wanted: dict[sa.Table, list[tuple[Any, ...]]] = defaultdict(list)
        latest: dict[tuple[sa.Table, tuple[Any, ...]], CachedRow | None] = {}
        """Rows the WAL's changes of this batch left, by key; None: not known without a read."""
        judging: dict[sa.Table, list[tuple[int, Carried]]] = defaultdict(list)
        """Built rows whose criteria are still to evaluate: their place in ``pending``."""
        for item in batch:
            if isinstance(item, Flush):
                pending.append((item, False, False))
                continue
            entry = self._tables.get((item.schema, item.table))
            if entry is None:
                self.stats["unwatched"] += 1
                logger.warning("skipping event for unwatched table %s.%s", item.schema, item.table)
                continue
            table = entry[0]
            if item.row is not None:  # from the WAL: loaded as a read loads them, and true
                new, old = item.new, item.old
            else:  # from a payload anyone may send
                new = coerce(table, item.new)
                old = coerce(table, item.old) if item.old is not None else None
                if not usable_key(table, new) or (old is not None and not usable_key(table, old)):
                    self.stats["malformed"] += 1
                    logger.warning(
                        "skipping event for %s without a usable key: %.200r",
                        table.name,
                        item.new,
                    )
                    continue
            change = Resolved(
                item.ref, (item.schema, item.table), item.event, new, old, item.origin, xid=item.xid
            )
            changes = [change]
            if (
                item.event == "updated"
                and old is not None
                and key_of(table, old) != key_of(table, new)
            ):
                # A primary key changed: for every tree it is another row. The old one goes,
                # the new one comes (the same ref: they are two rows, each changed once).
                changes = [
                    dataclasses.replace(change, event="deleted", new=old, old=None),
                    dataclasses.replace(change, event="inserted", old=None),
                ]
            for change in changes:
                if item.row is not None:
                    change = self._carried(table, change, item.row, latest)
                    if change.row is not None or change.event == "deleted":
                        if change.row is not None and self.rows.has_criteria(table):
                            judging[table].append((len(pending), item.row))
                        pending.append((change, False, item.row.followed))
                        continue
                    self.stats["wal_fetches"] += 1
                pending.append((change, True, item.row is not None and item.row.followed))
                # a delete is read too: it is believed once its row is gone (:meth:`_checked`)
                if change.event != "deleted" or table.primary_key.columns:
                    wanted[table].append(key_of(table, change.new))
        for table, rows in judging.items():
            self._judge(table, rows, pending, wanted)
        fetched = {qualified_name(table): self._read(table, keys) for table, keys in wanted.items()}
        inserts = {
            (self._tables[item.table][0], key_of(self._tables[item.table][0], item.new)): item.ref
            for item, _, _ in pending
            if isinstance(item, Resolved) and item.event == "inserted"
        }
        resolved: list[Resolved | Flush] = []
        for candidate, read, kept_newest in pending:
            done = candidate
            if isinstance(done, Resolved) and read:
                if (checked := self._checked(done, fetched, inserts)) is None:
                    continue
                done = checked
            if isinstance(done, Resolved) and kept_newest:
                table = self._tables[done.table][0]
                kept = done.row if done.row is not None and done.readable else GONE
                self.cache.put_newer(self._newest(table, key_of(table, done.new)), done.ref, kept)
            resolved.append(done)
        return resolved

    def _carried(
        self,
        table: sa.Table,
        change: Resolved,
        carried: Carried,
        latest: dict[tuple[sa.Table, tuple[Any, ...]], CachedRow | None],
    ) -> Resolved:
        """``change`` with the row the WAL carried, when it can be built completely.

        An unchanged TOASTed value is not in the WAL (nor in the old row, unless REPLICA
        IDENTITY FULL sent it, and then the decoder took it): it is the one of the row this
        change started from, when that is known: left by an earlier change of this batch,
        else by the latest one handed over (:meth:`RowCache.newest`), and only if every
        change of the table becomes a notice (else one that did not may have changed it)."""
        key = key_of(table, change.new)
        if change.event == "deleted":
            latest[(table, key)] = None
            return change
        earlier: dict[str, Any] | None = None
        if carried.unchanged and carried.followed:
            if (table, key) in latest:
                prior = latest[(table, key)]
            else:
                found = self.cache.newest(self._newest(table, key))
                prior = found[1] if found is not None else None
            if isinstance(prior, CachedRow):
                earlier = {n: v for n, v in prior.values.items() if n in carried.unchanged}
        row = self.rows.built(table, carried, earlier)
        if row is None:
            latest[(table, key)] = None
            return change
        ids = {name: row.values[name] for name in change.new if name in row.values}
        latest[(table, key_of(table, ids))] = row
        # every field named: dataclasses.replace costs more than the rest of this, per change
        return Resolved(
            change.ref,
            change.table,
            change.event,
            ids,
            change.old,
            change.origin,
            row if change.old is None else CachedRow(row.values, row.matches, change.old),
            change.readable,
            change.xid,
        )

    def _judge(
        self,
        table: sa.Table,
        rows: list[tuple[int, Carried]],
        pending: list[tuple[Resolved | Flush, bool, bool]],
        wanted: dict[sa.Table, list[tuple[Any, ...]]],
    ) -> None:
        """Give the built rows of ``table`` at ``rows``' places in ``pending`` the criteria
        they meet, in one query for all of them (:meth:`RowSource.judge`); when Postgres
        cannot evaluate them there, the rows are read instead."""
        verdicts = self.rows.judge(table, [carried for _, carried in rows])
        for n, (i, _) in enumerate(rows):
            change, _, kept_newest = pending[i]
            assert isinstance(change, Resolved) and change.row is not None
            if verdicts is None:
                self.stats["wal_fetches"] += 1
                pending[i] = (dataclasses.replace(change, row=None), True, kept_newest)
                wanted[table].append(key_of(table, change.new))
                continue
            row = CachedRow(change.row.values, verdicts[n], change.row.old)
            pending[i] = (dataclasses.replace(change, row=row), False, kept_newest)

    def _newest(self, table: sa.Table, key: tuple[Any, ...]) -> tuple[Any, ...]:
        """The cache's key of the latest row the WAL's changes left for ``key``; a gap starts
        a new generation of them (changes were missed: what they left is unknown)."""
        return ("newest", self._generation, table, key)

    def _read(self, table: sa.Table, keys: list[tuple[Any, ...]]) -> _Read | None:
        """The rows of ``keys``, in one query; None when the table cannot be read at all.

        A read that fails is tried again without keys: if that works, some key could not be
        bound (a value a query refuses), and halving the keys finds which, so one bad key
        never spoils the rows of the others."""
        try:
            return self.rows.fetch(table, keys, hold=True), set()
        except (sa.exc.ProgrammingError, sa.exc.DataError) as exc:
            if self.rows.readable(table):
                return self._isolate(table, keys)
            # The table no longer matches its mapper (a column dropped, renamed, retyped):
            # the changes cannot be followed, so their subscribers are told to resync.
            self.stats["fetch_errors"] += 1
            logger.error("cannot read changed rows of %s: %s", table.name, exc.orig or exc)
            return None

    def _isolate(self, table: sa.Table, keys: list[tuple[Any, ...]]) -> _Read:
        try:
            return self.rows.fetch(table, keys, hold=True), set()
        except (sa.exc.ProgrammingError, sa.exc.DataError) as exc:
            if len(keys) == 1:
                logger.warning("cannot read %s with key %.200r: %s", table.name, keys[0], exc)
                return {}, set(keys)
        half = len(keys) // 2
        rows, bad = self._isolate(table, keys[:half])
        more, worse = self._isolate(table, keys[half:])
        return {**rows, **more}, bad | worse

    def _checked(
        self,
        change: Resolved,
        fetched: dict[tuple[str, str], _Read | None],
        inserts: dict[tuple[sa.Table, tuple[Any, ...]], int],
    ) -> Resolved | None:
        """``change`` with its row, told with the row's own identifying values; None for a
        key no query could bind.

        Anyone may NOTIFY: an event is a hint of where to look, its claims are not believed.
        Who is told of an insert or an update, and with which values, is what the row read
        says (the values an event claims are its own only if no later change raced the read,
        and a forged claim would take a row to another tenant). The values before an update
        cannot be checked (the row has changed since): they only widen who is told. A delete
        is believed once its row is gone, or inserted again later in the batch (``inserts``:
        the last ref inserting each key); else it is told as an update with the row read."""
        table = self._tables[change.table][0]
        read = fetched.get(change.table, ({}, set()))
        if read is None:
            if change.event == "deleted":
                return change
            return dataclasses.replace(change, readable=False)
        rows, bad = read
        key = key_of(table, change.new)
        if key in bad:
            self.stats["malformed"] += 1
            return None
        row = rows.get(key)
        if change.event == "deleted":
            if row is None or inserts.get((table, key), 0) > change.ref:
                return change
            # Its row exists: inserted again since (in a later batch), or the event is forged.
            # Either way what is true now is that row: it is told as an update with its values.
            self.stats["contradicted"] += 1
            logger.info(
                "delete event %d of %s: its row exists; told as an update with its values",
                change.ref,
                table.name,
            )
            change = dataclasses.replace(change, event="updated", old=change.new)
        if row is None:
            return change  # gone since: sync takes it for deleted, whatever the event said
        if not _agrees(change.new, row.values):
            self.stats["contradicted"] += 1
            logger.info(
                "%s event %d of %s claims %.200r; told with the row's values (a later change "
                "raced its read, or the event was forged)",
                change.event,
                change.ref,
                table.name,
                change.new,
            )
        ids = {name: row.values[name] for name in change.new if name in row.values}
        return dataclasses.replace(
            change, new=ids, row=CachedRow(row.values, row.matches, change.old)
        )

    def deliver(self, resolved: Sequence[Resolved | Flush]) -> None:
        """Cache each change's row, route it and queue it, in order; release flush barriers
        once what came before them is queued."""
        queued: dict[Subscription, list[Message]] = {}
        """What each subscription without an authorizer gets, queued at once (one wake-up of
        its reader per batch, not per change), before any barrier and at the end."""

        def send(sub: Subscription, message: Message, row: Mapping[str, Any] | None) -> None:
            if sub.authorize is None:
                queued.setdefault(sub, []).append(message)
            else:
                self.authorizers.submit(sub, message, row)

        with self._delivering:
            for change in resolved:
                if isinstance(change, Flush):
                    _put_all(queued)
                    if (event := self.flushes.pop(change.token, None)) is not None:
                        self.authorizers.after(event.set)  # once authorizers ruled on the rest
                    continue
                table = self._tables[change.table][0]
                if change.event != "deleted" and change.readable:
                    self.cache.put(
                        (table, key_of(table, change.new), change.ref),
                        GONE if change.row is None else change.row,
                    )
                self._route(change, send)
                self.journal.add(change)
                self.stats["dispatched"] += 1
            _put_all(queued)

    def replay(self, sub: Subscription, position: Position, register: Callable[[], None]) -> None:
        """``register()`` ``sub``'s interests, then queue for it alone the changes after
        ``position`` already delivered, with nothing delivered in between; or, when they can
        no longer all be known, a ``(Resync, info)`` first."""
        with self._delivering:
            register()
            sub.placed(position)
            changes = self.journal.since(position)
            if changes is None:
                self.stats["replay_misses"] += 1
                self._send(
                    sub, (Resync, ResyncInfo("cannot replay from the position", time.monotonic()))
                )
                return
            for change in changes:
                self._route(change, self._send, sub)

    def _route(
        self,
        change: Resolved,
        send: Callable[[Subscription, Message, Mapping[str, Any] | None], None],
        only: Subscription | None = None,
    ) -> None:
        """``send`` ``change`` to the subscriptions it concerns (or to ``only``, if it does)."""
        table, model = self._tables[change.table]
        new = change.new
        route_new: dict[str, Any] | None
        route_old: dict[str, Any] | None
        if change.event == "deleted":
            route_new, route_old = None, new
        else:
            old = change.old
            route_new, route_old = (
                new,
                (old if old is not None else (new if change.event == "updated" else None)),
            )
        subs = self.router.route(table, change.event, route_new, route_old, only)
        message: Message = (
            (Sync, Change(model, change.event, new, change.ref))
            if change.readable
            else (
                Resync,
                ResyncInfo(f"rows of {table.name} could not be read", time.monotonic()),
            )
        )
        row = None if change.row is None else change.row.values
        for sub in subs:
            if change.origin is not None and change.origin in sub.ignore_origins:
                continue
            if change.readable and sub.saw(change.xid):
                continue  # loaded already: patching it in again would go back to its row
            send(sub, message, row)

    def _send(
        self, sub: Subscription, message: Message, row: Mapping[str, Any] | None = None
    ) -> None:
        """Queue ``message`` for ``sub``, through its authorizer's lane if it has one (a
        Resync too: it must not overtake the changes before it)."""
        if sub.authorize is None:
            sub.put(message)
        else:
            self.authorizers.submit(sub, message, row)

    def gap(self, reason: str, tables: Sequence[tuple[str, str]] | None = None) -> None:
        """Changes may have been missed: every subscription is told to resync, or with
        ``tables`` (schema, name), each one that rows of these tables concern
        (:meth:`Router.concerned`). First: the snapshot that lets later positions replay
        again costs a round trip. A position from before the gap cannot replay across it,
        whatever it follows."""
        self.journal.interrupt()
        self._generation += 1
        info = ResyncInfo(reason, time.monotonic())
        if tables is None:
            subs = self.router.subscriptions()
        else:
            subs = self.router.concerned([self._tables[t][0] for t in tables if t in self._tables])
        for sub in subs:
            self._send(sub, (Resync, info))
        self.journal.resume(self.rows.snapshot())


def _put_all(queued: dict[Subscription, list[Message]]) -> None:
    """Queue what :meth:`Dispatcher.deliver` gathered for each subscription, and forget it."""
    for sub, messages in queued.items():
        sub.put_all(messages)
    queued.clear()
