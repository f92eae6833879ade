"""``RowSync``: the one object an application holds. It wires the pieces together:

watchers -> :mod:`~rowsync.triggers` (install) ; :mod:`~rowsync.listener` (events enter)
-> :mod:`~rowsync.dispatch` (per batch: :mod:`~rowsync.fetch` reads the rows once,
:mod:`~rowsync.cache` keeps them bounded, :mod:`~rowsync.router` says who gets what)
-> :mod:`~rowsync.subscription` (queues) -> :mod:`~rowsync.sync` (trees patched), over the
:mod:`~rowsync.graph` of relationships.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import logging
import threading
import time
import uuid
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, Literal, ParamSpec, TypeVar

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

from rowsync import slots, tree, triggers, wal
from rowsync.announce import BATCH, announce_table, announced
from rowsync.cache import RowCache
from rowsync.changelog import ChangeLog
from rowsync.columns import ColumnPolicy, ColumnsArg
from rowsync.connect import Database, connector, engine_for, writer_of
from rowsync.dispatch import Dispatcher
from rowsync.errors import ConfigurationError, NotRunningError
from rowsync.fanout.node import Node
from rowsync.fetch import SNAPSHOT, RowSource, qualified_name, table_of
from rowsync.graph import Graph
from rowsync.listener import Layout, Listener, send_flush
from rowsync.messages import EVENTS, Change, Message
from rowsync.position import NOWHERE, Position
from rowsync.roots import Filters, Statement
from rowsync.router import Router
from rowsync.subscription import Authorizer, Subscription
from rowsync.sync import Preloads, Syncer
from rowsync.watchers import Assocs, Watcher, assocs_spec, merge, spec_assocs

logger = logging.getLogger(__name__)

_started: weakref.WeakSet[RowSync] = weakref.WeakSet()

_SET_ORIGIN = sa.text("SELECT set_config('rowsync.origin', :name, true)")
"""``rs.origin``'s tag for the triggers; a text clause, so each driver gets its own parameter
style (asyncpg's is not psycopg's)."""

Capture = Literal["notify", "durable", "stream", "wal"]
"""How changes travel from the writer's transaction to the listener (see :class:`RowSync`)."""
CAPTURES: tuple[Capture, ...] = ("notify", "durable", "stream", "wal")

P = ParamSpec("P")
T = TypeVar("T")


def _in_thread(method: Callable[P, T]) -> Callable[P, Coroutine[Any, Any, T]]:
    """``method`` for asyncio: awaited, it runs in a worker thread and the event loop goes on."""

    @functools.wraps(method)
    async def in_thread(*args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(method, *args, **kwargs)

    in_thread.__name__ = f"{method.__name__}_async"
    in_thread.__qualname__ = f"{method.__qualname__}_async"
    return in_thread


class RowSync:
    """Capture, listen, cache, route and sync for one database and one set of watchers.

    ``dsn_or_engine``: a libpq conninfo (``postgresql://...`` or ``host=... dbname=...``), a
    psycopg :class:`~sqlalchemy.Engine` (its pool serves row fetches) or an
    :class:`~sqlalchemy.ext.asyncio.AsyncEngine`. rowsync's own connections (the listener's,
    install's, flush's) are made the way the engine makes its own (:mod:`rowsync.connect`).

    How changes travel (``install()`` installs triggers to match; see README "Guarantees"):

    - ``capture="notify"`` (default): each change is a NOTIFY payload. At-most-once: after a
      reconnect every subscriber gets ``(Resync, info)``.
    - ``capture="durable"``: each change is also a row of rowsync's change log, and NOTIFY only
      wakes the listener, which reads the log from its position after any reconnect:
      at-least-once. With ``consumer="name"`` the position is saved in the database, so a
      restarted process resumes from it; ``retention`` (seconds) bounds the log.
    - ``capture="stream"``: the change log only, read every ``poll_interval`` seconds. No
      NOTIFY in the writer's transaction (it takes a cluster-wide lock at commit), so many
      concurrent writers keep their throughput. Durable, as above.
    - ``capture="wal"``: no trigger; changes come from logical decoding (:mod:`rowsync.wal`).
      Needs ``wal_level = logical`` and ``rowsync[wal]``. With ``consumer="name"``, a
      replication slot of its own (:mod:`rowsync.slots`): a reconnect or a restarted process
      reads on from it, at-least-once; without, after a reconnect, ``(Resync, info)``.
    """

    def __init__(
        self,
        dsn_or_engine: Database,
        watchers: Iterable[Watcher],
        *,
        channel: str = triggers.DEFAULT_CHANNEL,
        schema: str = triggers.DEFAULT_SCHEMA,
        cache_size: int = 10_000,
        cache_ttl: float = 300.0,
        queue_size: int = 10_000,
        replay_size: int = 10_000,
        probe_interval: float = 5.0,
        start_timeout: float = 10.0,
        origin: str | None = None,
        exclude: ColumnsArg | None = None,
        allow: ColumnsArg | None = None,
        capture: Capture = "notify",
        consumer: str | None = None,
        retention: float = 3600.0,
        poll_interval: float = 0.02,
        fanout: str | None = None,
        fanout_key: str | bytes | None = None,
    ) -> None:
        self.engine = engine_for(dsn_or_engine)
        self.connect = connector(self.engine)
        """Opens a dedicated psycopg connection the way the engine opens its own (rowsync's
        install, listener, flush and election use these)."""
        for option, name in (("channel", channel), ("schema", schema)):
            if not 0 < len(name.encode()) <= triggers.MAX_IDENTIFIER:
                raise ConfigurationError(
                    f"{option} {name!r} must be 1 to {triggers.MAX_IDENTIFIER} bytes: "
                    "Postgres would truncate it, and triggers would notify a channel no one hears"
                )
        self.channel = channel
        self.schema = schema
        self.retention = retention
        self.queue_size = queue_size
        self.start_timeout = start_timeout
        self.default_origin = origin
        self._origin: contextvars.ContextVar[str | None] = contextvars.ContextVar(
            f"rowsync_origin_{id(self)}", default=origin
        )
        self.watchers = merge(watchers)
        if not self.watchers:
            raise ConfigurationError(
                "RowSync needs at least one watcher (rowsync.watchers(Model, ...))"
            )
        _reject_label_clashes(self.watchers)
        if capture not in CAPTURES:
            raise ConfigurationError(
                f"capture must be one of {', '.join(map(repr, CAPTURES))}, not {capture!r}"
            )
        self.capture: Capture = capture
        writer = writer_of(dsn_or_engine, self.engine)
        sa.event.listen(writer, "begin", self._tag_transaction)
        if capture == "wal":
            sa.event.listen(writer, "commit", self._tag_commit)
        self.triggers = (
            []
            if capture == "wal"
            else triggers.triggers(self.watchers, schema=schema, channel=channel, mode=capture)
        )
        self._tables: dict[tuple[str, str], tuple[sa.Table, Any]] = {
            (w.schema, w.table): (table_of(w.model), w.model) for w in self.watchers
        }
        self.graph = Graph.for_models(w.model for w in self.watchers)
        self.cache = RowCache(cache_size, cache_ttl)
        self.columns = ColumnPolicy(exclude, allow)
        for w in self.watchers:
            self.columns.check(self._tables[(w.schema, w.table)][0], w.columns)
        self.rows = RowSource(self.engine, self.graph, self.cache, self.columns)
        self.router = Router(self.graph, self.rows)
        self.syncer = Syncer(self.graph, self.rows)
        self.stats: Counter[str] = Counter()
        self.dispatcher = Dispatcher(
            self._tables, self.rows, self.cache, self.router, self.stats, replay_size
        )
        self.listener = (
            wal.WalSource(
                self.connect,
                channel=channel,
                schema=schema,
                watchers=self.watchers,
                on_batch=self.dispatcher.batch,
                on_gap=self.dispatcher.gap,
                probe_interval=probe_interval,
                consumer=consumer,
                slot_timeout=start_timeout,
                loaders=self._wal_loaders,
            )
            if capture == "wal"
            else Listener(
                self.connect,
                channel=channel,
                schema=schema,
                on_batch=self.dispatcher.batch,
                on_gap=self.dispatcher.gap,
                probe_interval=probe_interval,
                log=None
                if capture == "notify"
                else ChangeLog(schema, consumer=consumer, retention=retention),
                poll_interval=poll_interval if capture == "stream" else None,
            )
        )
        self.fanout = (
            None
            if fanout is None
            else Node(
                fanout,
                self.connect,
                channel=channel,
                schema=schema,
                listener=self.listener,
                dispatcher=self.dispatcher,
                tables=self._tables,
                key=fanout_key,
                columns=self.columns,
                resumes=capture != "notify" and consumer is not None,
            )
        )
        """``fanout=URL``: this process's node of a group that shares one elected capture
        node through a broker (:mod:`rowsync.fanout`); ``fanout_key``, the same secret on
        every node (16 bytes or more), seals what they publish (:mod:`rowsync.fanout.seal`).
        Required for a broker: only ``memory://`` does without."""

    def __repr__(self) -> str:
        return f"<RowSync channel={self.channel!r} tables={len(self._tables)}>"

    # -- migration --------------------------------------------------------------------

    def sql(self, *, listener_roles: Sequence[str] = ()) -> str:
        """The complete install DDL, for review, ``rowsync sql`` or an Alembic revision."""
        return triggers.install_sql(
            self.triggers,
            schema=self.schema,
            channel=self.channel,
            listener_roles=listener_roles,
            retention=self.retention,
        ).as_string()

    def install(
        self,
        *,
        prune: bool = False,
        progress: triggers.Progress | None = None,
        listener_roles: Sequence[str] = (),
        lock_timeout: float = triggers.LOCK_TIMEOUT,
    ) -> triggers.Status:
        """Create or upgrade rowsync's schema and triggers; returns the status found before.

        Run it as the watched tables' owner. ``listener_roles`` are granted what a listener
        needs of rowsync's (:mod:`rowsync.privileges`); writers need nothing. The log's
        ``retention`` becomes the least any prune keeps. Installs take turns: one waits at
        most ``lock_timeout`` seconds for another, then raises
        ``psycopg.errors.LockNotAvailable`` naming the session that holds the lock.
        """
        with self.connect() as conn:
            before = triggers.install(
                conn,
                self.triggers,
                schema=self.schema,
                channel=self.channel,
                prune=prune,
                progress=progress,
                listener_roles=listener_roles,
                retention=self.retention,
                lock_timeout=lock_timeout,
            )
            if self.capture == "wal":
                tables = {name: table for name, (table, _) in self._tables.items()}
                wal.install(conn, self.watchers, tables, self.columns, self.channel)
            return before

    def announce(
        self,
        tables: Iterable[str] | None = None,
        *,
        batch: int = BATCH,
        progress: triggers.Progress | None = None,
    ) -> dict[str, int]:
        """Emit an update event for every row of the watched ``tables`` (default: all; names
        as ``schema.table`` or ``table``), for writes the triggers did not see (``pg_restore``,
        triggers disabled); see :mod:`rowsync.announce`. Returns rows announced per table.
        """
        chosen = announced(self.watchers)
        if tables is not None:
            wanted = set(tables)
            known = {n for w in chosen for n in (w.table, f"{w.schema}.{w.table}")}
            if unknown := wanted - known:
                raise ConfigurationError(
                    f"not watched for updates or inserts: {', '.join(sorted(unknown))}"
                )
            chosen = [w for w in chosen if {w.table, f"{w.schema}.{w.table}"} & wanted]
        counts: dict[str, int] = {}
        with self.connect() as conn:
            for w in chosen:
                name = f"{w.schema}.{w.table}"
                counts[name] = counts.get(name, 0) + announce_table(
                    conn,
                    w,
                    schema=self.schema,
                    channel=self.channel,
                    mode=self.capture,
                    batch=batch,
                    progress=progress,
                )
        return counts

    def uninstall(
        self, *, drop_schema: bool = False, lock_timeout: float = triggers.LOCK_TIMEOUT
    ) -> int:
        """Drop the triggers (or, with ``capture="wal"``, the publication and the channel's
        replication slots: refused while a listener streams from one); returns the number
        of triggers dropped."""
        with self.connect() as conn:
            if self.capture == "wal":
                slots.drop(conn, self.channel)
                wal.uninstall(conn, self.channel)
            return triggers.uninstall(
                conn,
                schema=self.schema,
                channel=self.channel,
                drop_schema=drop_schema,
                lock_timeout=lock_timeout,
            )

    def status(self, *, listener_roles: Sequence[str] | None = None) -> triggers.Status:
        """What ``install`` would change, and what is wrong with the privileges: checked for
        ``listener_roles`` (default: the role this RowSync connects as). With
        ``capture="wal"``, also the server's ``wal_level`` and the channel's slots."""
        with self.connect(autocommit=True) as conn:
            if listener_roles is None:
                row = conn.execute("SELECT current_user").fetchone()
                listener_roles = [str(row[0])] if row else []
            found = triggers.status(
                conn,
                self.triggers,
                schema=self.schema,
                channel=self.channel,
                listener_roles=listener_roles,
            )
            if self.capture != "wal":
                return found
            row = conn.execute("SHOW wal_level").fetchone()
            return dataclasses.replace(
                found,
                wal_level=str(row[0]) if row else None,
                slots=slots.of_channel(conn, self.channel),
            )

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> RowSync:
        """Start the listener; returns once it LISTENs, so no change after this call is missed."""
        self._check_triggers()
        if self.fanout is not None:
            self.fanout.start(self.start_timeout)
            self.dispatcher.journal.resume(self.rows.snapshot())
            _started.add(self)
            try:  # a barrier back through the broker: some node captures, and reaches us
                self.flush(self.start_timeout)
            except TimeoutError as exc:
                squatter = self.fanout.squatter()
                self.stop()
                raise NotRunningError(
                    f"no capture node answered within {self.start_timeout} s"
                    + (
                        f": the election's lock is held by {squatter}, which is not a rowsync "
                        "node (end that session, or give this group another channel)"
                        if squatter
                        else ""
                    )
                ) from exc
            return self
        self.listener.start()
        if not self.listener.connected.wait(self.start_timeout):
            self.listener.stop()
            failure = self.listener.failure
            raise NotRunningError(
                f"the listener could not connect within {self.start_timeout} s"
                + (f": {failure}" if failure else "")
            )
        self.dispatcher.journal.resume(self.rows.snapshot())
        _started.add(self)
        return self

    def _check_triggers(self) -> None:
        """Warn when the database's triggers do not match the watchers and mode: events
        would be missing (a table not captured) or sent where this listener does not look."""
        try:
            status = self.status()
        except psycopg.errors.InsufficientPrivilege as exc:
            logger.warning(
                "this role may not read rowsync's schema (%s): run `rowsync install "
                "--listener-role ROLE` as the owner, or see `rowsync status`",
                exc,
            )
            return
        except psycopg.Error as exc:
            logger.debug("could not check the triggers: %s", exc)
            return
        # Outdated triggers send moves unsealed: they may be genuine (see Listener._unsealed).
        self.listener.seals_expected = status.schema_ready and not status.outdated
        if status.missing or status.outdated or not status.schema_ready:
            logger.warning(
                "rowsync's triggers do not match the watchers (%d missing, %d outdated%s): "
                "some changes will not arrive; run rs.install() or `rowsync install`",
                len(status.missing),
                len(status.outdated),
                "" if status.schema_ready else ", schema not up to date",
            )
        for problem in status.privileges:
            logger.warning("rowsync's privileges: %s (see `rowsync status`)", problem)

    def stop(self) -> None:
        _started.discard(self)
        self.dispatcher.journal.interrupt()  # what commits while stopped is never seen
        if self.fanout is not None:
            self.fanout.stop()
        self.listener.stop()
        self.rows.release()

    @property
    def running(self) -> bool:
        return self in _started

    def __enter__(self) -> RowSync:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> RowSync:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    # -- subscriptions ----------------------------------------------------------------

    def subscribe(
        self,
        target: Any,
        event: str | None = None,
        /,
        *,
        assocs: Assocs = (),
        follow: bool = False,
        maxsize: int | None = None,
        ignore_origin: str | Iterable[str] | None = None,
        authorize: Authorizer | None = None,
        context: Any = None,
        since: Position | None = None,
        **filters: Any,
    ) -> Subscription:
        """Subscribe to loaded objects (and what ``assocs`` follows below them), or to a model.

        ``rs.subscribe(person, assocs=["posts"])``: updates and deletes of ``person`` and its
        loaded posts, and every row entering or leaving its ``posts``.
        ``rs.subscribe(Post, "inserted", person_id=2)``: every matching change of the model;
        filters name identifying columns (primary key, foreign keys, ``extra_columns``).
        With ``follow=True`` each inserted row is followed from then on (with ``assocs``), as
        the objects of a root list that ``sync`` grows with inserts must be.
        ``ignore_origin``: skip changes written under that origin (see :meth:`origin`): the
        echo of the subscriber's own writes.
        ``authorize(context, change, row) -> bool`` decides, before delivery, whether this
        subscriber may receive a change (``row`` is the fetched row; None for a delete). A
        denial, or an exception (logged), withholds the change.
        ``since=rs.position()`` (taken before the tree was loaded): the changes committed
        after that position and already dispatched are queued first, so nothing committed
        between the load and this call is missed (see :mod:`rowsync.position`); if they can
        no longer all be known, the subscription starts with ``(Resync, info)``.
        """
        sub = self._subscription(maxsize, ignore_origin, authorize, context)
        self._add(sub, target, event, assocs=assocs, follow=follow, since=since, **filters)
        return sub

    def load(
        self,
        session: Session,
        statement: sa.Select[Any],
        *,
        maxsize: int | None = None,
        ignore_origin: str | Iterable[str] | None = None,
        authorize: Authorizer | None = None,
        context: Any = None,
    ) -> tuple[list[Any], Subscription]:
        """Run ``statement`` in ``session`` and subscribe to its result, in one step::

            people, sub = rs.load(session, select(Person).options(selectinload(Person.posts)))
            for message in sub:
                people = rs.sync(people, message)

        Nothing committed around the load is missed (the subscription starts from a position
        taken before it, :meth:`position`); what the loader options load is followed; and the
        list changes as the statement's result would: a row inserted or updated into the
        ``WHERE`` joins in ``ORDER BY`` place, one updated out of it leaves (the statement,
        restricted to the row, decides). The statement selects one mapped class and reads no
        other table (else :meth:`live`, which re-checks it when those change). The other
        arguments are :meth:`subscribe`'s.
        """
        rule = Statement.of(statement, self.engine)
        self._watched(rule.mapper.class_)
        tables = [self._watched(t) for t in tree.hierarchy_tables(rule.mapper)]
        position = self.position(session)
        roots = list(session.scalars(statement).unique())
        sub = self._subscription(maxsize, ignore_origin, authorize, context)

        def register() -> None:
            self.syncer.declare(roots, rule, sub)
            self._register(sub, roots, None)
            follow = self.router.spec(rule.mapper, spec_assocs(rule.spec or {}))
            for table in tables:  # a row of a joined subclass may change in any of its tables
                self.router.add_model(sub, table, None, {}, follow, rule.mapper)

        self.dispatcher.replay(sub, position, register)
        return roots, sub

    def _subscription(
        self,
        maxsize: int | None,
        ignore_origin: str | Iterable[str] | None,
        authorize: Authorizer | None,
        context: Any,
    ) -> Subscription:
        ignored = frozenset(
            ()
            if ignore_origin is None
            else [ignore_origin]
            if isinstance(ignore_origin, str)
            else ignore_origin
        )
        return Subscription(
            self._add, self._remove, maxsize or self.queue_size, ignored, authorize, context
        )

    def subscriptions(self) -> list[Subscription]:
        return self.router.subscriptions()

    def _remove(self, sub: Subscription) -> None:
        self.router.remove(sub)
        self.syncer.undeclare(sub)

    def _add(
        self,
        sub: Subscription,
        target: Any,
        event: str | None,
        *,
        assocs: Assocs = (),
        follow: bool = False,
        since: Position | None = None,
        **filters: Any,
    ) -> None:
        register = functools.partial(
            self._register, sub, target, event, assocs=assocs, follow=follow, **filters
        )
        if since is None:
            sub.placed(NOWHERE)  # before its interests: nothing may be skipped for them
            register()
        else:
            self.dispatcher.replay(sub, since, register)

    def _register(
        self,
        sub: Subscription,
        target: Any,
        event: str | None,
        *,
        assocs: Assocs = (),
        follow: bool = False,
        **filters: Any,
    ) -> None:
        if isinstance(target, (type, sa.Table)):
            table = self._watched(target)
            if event is not None and event not in EVENTS:
                raise ConfigurationError(f"unknown event {event!r}; use one of {EVENTS}")
            columns = {
                c
                for w in self.watchers
                if (w.schema, w.table) == qualified_name(table)
                for c in w.columns
            }
            if unknown := set(filters) - columns:
                raise ConfigurationError(
                    f"cannot filter {table.name!r} on {sorted(unknown)}: only identifying columns "
                    f"{sorted(columns)} are carried by events (add them with extra_columns)"
                )
            spec = None
            if follow:
                if isinstance(target, sa.Table):
                    raise ConfigurationError("follow needs a mapped model, not a table")
                spec = self.router.spec(sa.inspect(target), assocs)
                for roots, _ in sub.trees:
                    if isinstance(roots, list):
                        self.syncer.declare(
                            roots, Filters.of(sa.inspect(target), filters, roots), sub
                        )
            elif assocs:
                raise ConfigurationError("assocs on a model-level subscription go with follow=True")
            mapper = None if isinstance(target, sa.Table) else sa.inspect(target)
            self.router.add_model(sub, table, event, filters, spec, mapper)
            return
        if event is not None or follow or filters:
            raise ConfigurationError(
                "event, follow and filters go with a model, not with loaded objects"
            )
        sub.trees.append((target, assocs))
        if isinstance(target, list):
            for table, _event, wanted, follows, mapper in sub.models:
                if follows is not None:
                    model = self._tables[qualified_name(table)][1]
                    rule = Filters.of(mapper or sa.inspect(model), wanted, target)
                    self.syncer.declare(target, rule, sub)
        self._hold(sub, target, assocs)

    def _hold(self, sub: Subscription, target: Any, assocs: Assocs) -> None:
        """Register the interests of a tree (a list of roots or one object) and below."""
        objects = tree.as_list(target)
        by_mapper: dict[Any, list[Any]] = defaultdict(list)
        for obj in objects:
            if not tree.is_model(obj):
                raise ConfigurationError(
                    f"cannot subscribe to {obj!r}: not a mapped object or model"
                )
            by_mapper[sa.inspect(obj).mapper].append(obj)
        for mapper, objs in by_mapper.items():
            self._watched(mapper.class_)
            # What the loader loaded is followed too, named in assocs or not: a relationship
            # loaded by default (lazy="joined") and left unfollowed would silently go stale.
            loaded = tree.merge_specs(assocs_spec(mapper, assocs), tree.tree_spec(objs))
            self.router.add_tree(sub, objs, self.router.spec(mapper, spec_assocs(loaded)))

    def _watched(self, model: Any) -> sa.Table:
        try:
            table = table_of(model)
        except sa.exc.NoInspectionAvailable:
            raise ConfigurationError(f"{model!r} is not a mapped model or table") from None
        if qualified_name(table) not in self._tables:
            name = getattr(model, "__name__", table.name)
            raise ConfigurationError(f"{table.name!r} is not watched; add rowsync.watchers({name})")
        return table

    # -- positions --------------------------------------------------------------------

    def position(self, on: sa.Connection | Session | None = None) -> Position:
        """Where the stream of changes stands now: take it before loading a tree, then
        ``subscribe(tree, since=position)``. ``on``: the connection or session that will load
        it, when its transaction may already hold a snapshot (``REPEATABLE READ``): the
        position is then that snapshot, exactly what the load sees."""
        if not self.running:
            raise NotRunningError("a position needs a started RowSync (the stream it counts)")
        query = sa.text(SNAPSHOT)
        if on is not None and on.in_transaction():
            # its snapshot may be older than this call: placed by visibility alone
            return Position.of(on.execute(query).scalar_one())
        seq, epoch = self.dispatcher.journal.mark()
        if on is not None:
            return Position.of(on.execute(query).scalar_one(), seq, epoch)
        with self.engine.connect() as conn:
            return Position.of(conn.execute(query).scalar_one(), seq, epoch)

    # -- sync -------------------------------------------------------------------------

    def sync(self, value: Any, message: Message, preloads: Preloads | None = None) -> Any:
        """Apply one message to a loaded tree (see :func:`rowsync.sync`)."""
        return self.syncer.sync(value, message, preloads)

    def resync(self, value: Any) -> Any:
        """``value`` made consistent with the database after a ``(Resync, info)`` message:
        what it holds, re-read by primary key in batches, loaded as it was loaded. Every
        subscription made with this tree follows it again as it now is (rows the re-read
        brought in included), from a position taken before the re-read."""
        holders = [s for s in self.router.subscriptions() if any(t is value for t, _ in s.trees)]
        position = self.position() if holders and self.running else None
        result = self.syncer.resync(value)
        for sub in holders:
            sub.trees = [(result if t is value else t, a) for t, a in sub.trees]

            # Registered again on top of what it held: dropping first would also drop the
            # rows the router registered for messages still queued (a followed insert).
            def register(sub: Subscription = sub) -> None:
                for target, assocs in sub.trees:
                    self._hold(sub, target, assocs)

            if position is None:
                register()
            else:
                self.dispatcher.replay(sub, position, register)
        return result

    def live(
        self, session_factory: Any, statement: sa.Select[Any], *, idle_timeout: float | None = 300.0
    ) -> Any:
        """A :class:`rowsync.live.LiveQuery`: ``statement``'s result, kept current in the
        background, with the diffs a UI patches itself with (see :mod:`rowsync.live`)."""
        from rowsync.live import LiveQuery

        return LiveQuery(self, session_factory, statement, idle_timeout=idle_timeout)

    # -- self-write suppression -------------------------------------------------------

    @contextlib.contextmanager
    def origin(self, name: str | None) -> Iterator[None]:
        """Tag the writes made through this RowSync's engine in this block (thread or task)
        with ``name``: their events carry it, and ``subscribe(..., ignore_origin=name)``
        skips them. Deterministic: the tag is a transaction-local setting the trigger reads
        (``set_config('rowsync.origin', name, true)``), or with ``capture="wal"`` a message
        in the transaction's WAL, not a counter of expected echoes. The origin is the one in
        effect when the transaction begins.
        """
        token = self._origin.set(name)
        try:
            yield
        finally:
            self._origin.reset(token)

    def _tag_transaction(self, conn: sa.Connection) -> None:
        name = self._origin.get()
        if self.capture == "wal":  # tagged at commit (:func:`rowsync.wal.tag`)
            conn.info[self._origin] = name
        elif name is not None:
            conn.execute(_SET_ORIGIN, {"name": name})

    def _wal_loaders(
        self, schema: str, table: str, layout: Layout
    ) -> tuple[Callable[[bytes], Any], ...]:
        """The WAL decoder's loaders of a table's columns (:meth:`RowSource.loaders`); none
        for a table no watcher names, whose values it never loads."""
        entry = self._tables.get((schema, table))
        return () if entry is None else self.rows.loaders(entry[0], layout)

    def _tag_commit(self, conn: sa.Connection) -> None:
        if (name := conn.info.pop(self._origin, None)) is not None:
            wal.tag(conn, self.channel, name)

    # -- waiting for the listener -----------------------------------------------------

    def flush(self, timeout: float = 5.0) -> None:
        """Return once every change committed before this call has been dispatched."""
        if not self.running:
            raise NotRunningError("flush needs a started RowSync")
        deadline = time.monotonic() + timeout
        feed = self.fanout or self.listener  # where the barrier comes back from
        while True:
            if not feed.connected.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"listener not connected within {timeout} s")
            token = uuid.uuid4().hex
            done = self.dispatcher.flushes[token] = threading.Event()
            gaps = _disruptions(feed.stats)
            send_flush(self.connect, self.channel, token)
            while not done.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    self.dispatcher.flushes.pop(token, None)
                    raise TimeoutError(
                        f"listener did not reach the flush barrier within {timeout} s"
                    )
                if _disruptions(feed.stats) != gaps:
                    # the barrier may have fallen into a gap, or been received by a connection
                    # that broke before handing it over, or come before a new capture node
                    break
            else:
                return
            self.dispatcher.flushes.pop(token, None)

    # -- asyncio ----------------------------------------------------------------------
    # What may wait on the database or the listener, for an event loop: the same methods,
    # run in a worker thread while the loop goes on (``async with rs`` starts and stops).

    install_async = _in_thread(install)
    """``await rs.install_async(prune=False, progress=None)``: :meth:`install`, off the loop."""
    flush_async = _in_thread(flush)
    """``await rs.flush_async(timeout=5.0)``: :meth:`flush`, off the loop."""
    sync_async = _in_thread(sync)
    """``await rs.sync_async(value, message)``: :meth:`sync`, off the loop (it may read rows)."""
    resync_async = _in_thread(resync)
    """``await rs.resync_async(value)``: :meth:`resync`, off the loop."""


def _disruptions(stats: Counter[str]) -> int:
    """What may have lost a flush barrier in flight. A reconnect counts on its own: a barrier
    sent between a lost connection's count and the next LISTEN reaches nobody, and the only
    trace it leaves is the reconnect that follows."""
    return stats["gaps"] + stats["captures"] + stats["connection_errors"] + stats["reconnects"]


def _reject_label_clashes(watchers: Sequence[Watcher]) -> None:
    seen: dict[tuple[str, str, str], str | None] = {}
    for w in watchers:
        key = (w.schema, w.table, w.event)
        if key in seen and seen[key] != w.label:
            raise ConfigurationError(
                f"{w.schema}.{w.table} {w.event} is watched under two labels "
                f"({seen[key]!r}, {w.label!r}); one RowSync delivers each change once: "
                "use one label, or a second RowSync with its own channel"
            )
        seen[key] = w.label


def sync(value: Any, message: Message, preloads: Preloads | None = None) -> Any:
    """Apply ``message`` to ``value`` with the started :class:`RowSync` that watches its table."""
    if isinstance(message, tuple) and len(message) == 2 and isinstance(message[1], Change):
        table = table_of(message[1].model)
        for rs in list(_started):
            if qualified_name(table) in rs._tables:
                return rs.sync(value, message, preloads)
        raise NotRunningError("no started RowSync watches this message's table")
    return value
