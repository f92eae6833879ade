"""Dispatch: from a batch of notices (the listener's) to messages in subscription queues.

For each batch: the changed rows are fetched, one query per table (:mod:`rowsync.fetch`),
and cached under the change that produced them (:mod:`rowsync.cache`); each change is then
routed (:mod:`rowsync.router`) and queued, in notification order, for every subscription it
concerns that neither ignores its origin nor is denied it by its authorizer. Runs in the
listener thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from rowsync.cache import GONE, CachedRow, RowCache
from rowsync.fetch import RowSource, coerce, key_of, usable_key
from rowsync.listener import Flush, Notice
from rowsync.messages import Change, Message, Resync, ResyncInfo, Sync
from rowsync.router import Router
from rowsync.subscription import Subscription

logger = logging.getLogger(__name__)


class Dispatcher:
    """The listener's ``on_batch`` and ``on_gap``."""

    def __init__(
        self,
        tables: dict[tuple[str, str], tuple[sa.Table, Any]],
        rows: RowSource,
        cache: RowCache,
        router: Router,
        stats: Counter[str],
    ) -> None:
        self._tables = tables
        self.rows = rows
        self.cache = cache
        self.router = router
        self.stats = stats
        self.flushes: dict[str, threading.Event] = {}
        """Flush barriers waited for, by token."""

    def batch(self, batch: Sequence[Notice | Flush]) -> None:
        """Fetch the batch's rows (one query per table), cache them, route and queue each
        change in order; release flush barriers once what came before them is queued."""
        wanted: dict[sa.Table, list[tuple[Any, ...]]] = defaultdict(list)
        # In batch order, so a flush barrier is released after the changes sent before it.
        notices: list[
            Flush | tuple[Notice, sa.Table, Any, dict[str, Any], dict[str, Any] | None]
        ] = []
        for item in batch:
            if isinstance(item, Flush):
                notices.append(item)
                continue
            entry = self._tables.get((item.schema, item.table))
            if entry is None:
                self.stats["unwatched"] += 1
                logger.warning("skipping event for unwatched table %s.%s", item.schema, item.table)
                continue
            table, model = entry
            new = coerce(table, item.new)
            old = coerce(table, item.old) if item.old is not None else None
            if not usable_key(table, new) or (old is not None and not usable_key(table, old)):
                self.stats["malformed"] += 1
                logger.warning(
                    "skipping event for %s without a usable primary key: %.200r",
                    table.name,
                    item.new,
                )
                continue
            if (
                item.event == "updated"
                and old is not None
                and key_of(table, old) != key_of(table, new)
            ):
                # A primary key changed: for every tree it is another row. The old one goes,
                # the new one comes (the same ref: they are two rows, each changed once).
                notices.append(
                    (dataclasses.replace(item, event="deleted"), table, model, old, None)
                )
                item = dataclasses.replace(item, event="inserted")
                old = None
            notices.append((item, table, model, new, old))
            if item.event != "deleted":
                wanted[table].append(key_of(table, new))
        fetched: dict[sa.Table, dict[tuple[Any, ...], CachedRow] | None] = {}
        for table, keys in wanted.items():
            try:
                fetched[table] = self.rows.fetch(table, keys)
            except (sa.exc.ProgrammingError, sa.exc.DataError) as exc:
                # The table no longer matches its mapper (a column dropped, renamed, retyped):
                # the changes cannot be followed, so their subscribers are told to resync.
                self.stats["fetch_errors"] += 1
                logger.error("cannot read changed rows of %s: %s", table.name, exc.orig or exc)
                fetched[table] = None
        for notice in notices:
            if isinstance(notice, Flush):
                if (event := self.flushes.pop(notice.token, None)) is not None:
                    event.set()
                continue
            item, table, model, new, old = notice
            key = key_of(table, new)
            rows = fetched.get(table, {})
            row = None
            if item.event != "deleted" and rows is not None:
                row = rows.get(key)
                self.cache.put(
                    (table, key, item.ref),
                    GONE if row is None else CachedRow(row.values, row.matches, old),
                )
            route_new: dict[str, Any] | None
            route_old: dict[str, Any] | None
            if item.event == "deleted":
                route_new, route_old = None, new
            else:
                route_new, route_old = (
                    new,
                    (old if old is not None else (new if item.event == "updated" else None)),
                )
            subs = self.router.route(table, item.event, route_new, route_old)
            self.stats["dispatched"] += 1
            message: Message = (
                (Sync, Change(model, item.event, new, item.ref))
                if rows is not None
                else (
                    Resync,
                    ResyncInfo(f"rows of {table.name} could not be read", time.monotonic()),
                )
            )
            for sub in subs:
                if item.origin is not None and item.origin in sub.ignore_origins:
                    continue
                if sub.authorize is not None and not self._authorized(sub, message, row):
                    continue
                sub.put(message)

    def _authorized(self, sub: Subscription, message: Message, row: CachedRow | None) -> bool:
        change = message[1]
        if not isinstance(change, Change):
            return True  # a Resync carries no row: everyone may know they must resync
        assert sub.authorize is not None
        try:
            allowed = bool(sub.authorize(sub.context, change, None if row is None else row.values))
        except Exception:
            self.stats["authorizer_errors"] += 1
            logger.exception("authorizer of subscription #%d failed: change withheld", sub.id)
            return False
        if not allowed:
            self.stats["denied"] += 1
        return allowed

    def gap(self, reason: str) -> None:
        """Changes may have been missed: every subscription is told to resync."""
        info = ResyncInfo(reason, time.monotonic())
        for sub in self.router.subscriptions():
            sub.put((Resync, info))
