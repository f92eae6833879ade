"""One app node of a fan-out group: it campaigns, captures while elected, and always delivers.

Three threads. The election's (:mod:`.election`). The listener's, only while this node is
the capture node: each batch is resolved (rows fetched once, for the whole group) and
published, with the node's term and a message number. The node's event loop: it reads the
broker's stream and hands each batch to this process's dispatcher, exactly as the listener
does without a broker; barriers (``rs.flush``) travel the same way, so ``flush`` works on
every node.

Trust. What a node reads from the broker counts only if it carries the group's seal
(:mod:`.seal`); anything else is dropped, logged and counted (``forged``), and announces
nothing: a stranger who can publish cannot make every subscriber resync either. A new
capture term is checked against the election in Postgres before it replaces the current one
(``unverified``), and a message number of the current term that was already read is a
replay (``replayed``). Decoded rows keep only the columns this node may read.

Gaps. A node tells its subscriptions to resync (``Dispatcher.gap``) when: the capture node
announces one (its listener reconnected, a batch failed); a new capture node starts, unless
it resumes where the previous one stopped; the node reconnects to the broker and the backend
could not resume; a message number is missing (a publish failed, or the broker dropped
one); a sealed message cannot be decoded; a term fails its check (it may have been a capture
node's that has been replaced since, whose messages are not delivered).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa

from rowsync import advisory
from rowsync.columns import ColumnPolicy
from rowsync.connect import Connect
from rowsync.dispatch import Dispatcher, Resolved
from rowsync.errors import NotRunningError
from rowsync.fanout import Backend, backend_for, check_url
from rowsync.fanout.codec import Codec, Gap, Item, Started
from rowsync.fanout.election import Election, current_term, squatter
from rowsync.fanout.seal import OVERHEAD, Seal, group_key
from rowsync.listener import Flush, Listener, Notice

logger = logging.getLogger(__name__)

T = TypeVar("T")

PUBLISH_TIMEOUT = 5.0
"""Seconds the listener waits for one batch to be published before counting it lost."""
BACKOFF = (0.05, 5.0)
"""First and longest wait between attempts to reconnect to the broker (doubling)."""
RETRY = 1.0
"""Seconds after a failed publish before the capture node publishes the gap it left, if no
change has carried it meanwhile."""
REJECTED = 16
"""Terms that failed their check remembered (not checked again), the newest ones."""


class Node:
    """Joins the fan-out group at ``url`` for one RowSync.

    The node takes over the ``listener``'s callbacks: while elected, its batches are
    published instead of delivered; every node delivers what it reads from the broker.
    ``resumes``: a new capture node's listener reads on from where the previous one stopped
    (durable capture), so a change of capture node is not a gap. ``key`` seals the group's
    messages (:func:`.seal.group_key`); ``columns``: what this node may read of each table,
    applied to every row it decodes.
    """

    def __init__(
        self,
        url: str,
        connect: Connect,
        *,
        channel: str,
        schema: str,
        listener: Listener,
        dispatcher: Dispatcher,
        tables: Mapping[tuple[str, str], tuple[sa.Table, Any]],
        key: str | bytes | None,
        columns: ColumnPolicy,
        resumes: bool = False,
        interval: float = 1.0,
    ) -> None:
        check_url(url)
        self._key = group_key(url, key)
        self.url = url
        self.connect = connect
        self.channel = channel
        self.schema = schema
        self.listener = listener
        self.dispatcher = dispatcher
        self.resumes = resumes
        self.stats: Counter[str] = Counter()
        """``gaps`` announced here, ``captures`` (capture nodes seen starting), ``received``,
        ``published``, ``publish_errors``, ``reconnects``, ``stale``, ``malformed``,
        ``forged``, ``unverified``, ``replayed``, ``withheld``…"""
        self.codec = Codec(
            {name: table for name, (table, _) in tables.items()},
            self.stats,
            {
                edge.criteria: f"{_path(edge.parent.class_)}.{edge.key}"
                for edge in dispatcher.rows.graph.edges
                if edge.criteria is not None
            },
            columns,
        )
        self.connected = threading.Event()
        """Set while this node reads the broker's stream."""
        self.backend: Backend | None = None
        self.seal: Seal | None = None
        self.election = Election(
            connect,
            _lock_key(schema, channel),
            on_elected=self._elected,
            on_deposed=self._deposed,
            eligible=self.connected.is_set,  # cut off from the broker: capture for nobody
            interval=interval,
        )
        listener.on_batch = self._capture
        listener.on_gap = self._capture_gap
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Reading: the newest capture node's term, the message number expected next (a
        # higher one is a gap, unless ``_excused``: a gap announced already covers it), and
        # terms that failed their check.
        self._term = 0
        self._expect = 0
        self._excused = False
        self._rejected: dict[int, None] = {}
        # Publishing (while elected): one message at a time, numbered from 0 in each term.
        self._publishing: asyncio.Lock | None = None
        self._seq = 0
        self._unsent: str | None = None
        self._retries: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        role = "capture" if self.capturing else "node"
        return f"<fanout.Node {self.url!r} {role} connected={self.connected.is_set()}>"

    @property
    def capturing(self) -> bool:
        """Whether this node is the group's capture node."""
        return self.election.term is not None

    # -- lifecycle --------------------------------------------------------------------

    def squatter(self) -> str | None:
        """Who holds the election's lock without being a node of this group, if anyone (to
        say why no node captures); None when Postgres cannot be asked either."""
        try:
            return squatter(self.connect, self.election.key)
        except psycopg.Error:
            return None

    def start(self, timeout: float) -> None:
        """Connect to the broker and join the election; NotRunningError if the broker
        cannot be reached within ``timeout`` seconds."""
        if self._loop is not None:
            return
        namespace = self._namespace()
        self.backend = backend_for(self.url, namespace)
        self.seal = Seal(self._key, namespace)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="rowsync-fanout", daemon=True
        )
        self._thread.start()
        self._publishing = asyncio.Lock()
        try:
            self._call(self.backend.connect(), timeout)
        except (ConnectionError, TimeoutError) as exc:
            self.stop()
            raise NotRunningError(f"cannot reach the fan-out broker at {self.url}: {exc}") from exc
        self.connected.set()
        asyncio.run_coroutine_threadsafe(self._read(), self._loop)
        self.election.start()

    def stop(self) -> None:
        self.election.stop()  # steps down first: nothing is published after this
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(5.0)
        except (ConnectionError, concurrent.futures.TimeoutError) as exc:
            logger.warning("closing the broker connection: %r", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        if not thread.is_alive():
            loop.close()
        self.connected.clear()

    async def _close(self) -> None:
        """Disconnect, then end every task left on the loop (the reader, the client's own)."""
        if self.backend is not None:
            await self.backend.disconnect()
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _namespace(self) -> str:
        """The group's stream name: this database (of this cluster) and channel, so groups of
        several databases can share a broker."""
        with self.connect(autocommit=True) as conn:
            row = conn.execute(
                "SELECT system_identifier, (SELECT oid FROM pg_database"
                " WHERE datname = current_database()) FROM pg_control_system()"
            ).fetchone()
        assert row is not None
        name = f"{row[0]}/{row[1]}/{self.schema}/{self.channel}"
        return hashlib.sha256(name.encode()).hexdigest()[:32]

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer within {timeout} s") from None

    # -- every node: read the stream, deliver ------------------------------------------

    async def _read(self) -> None:
        assert self.backend is not None
        while True:
            try:
                data = await self.backend.next_published()
            except ConnectionError as exc:
                self.connected.clear()
                logger.warning("lost the fan-out broker (%s); reconnecting", exc)
                resumed = await self._reconnect()
                self.stats["reconnects"] += 1
                if not resumed:  # announced before "connected": a subscriber after it is current
                    self._excused = True
                    self._gap("the connection to the fan-out broker was lost")
                self.connected.set()
                continue
            try:
                await self._receive(data)
            except Exception:
                # Whatever it held was not delivered: nobody may go on believing they are current.
                self.stats["batch_errors"] += 1
                logger.exception("error while handling a message from the fan-out broker")
                self._gap("a message from the fan-out broker could not be handled")

    async def _reconnect(self) -> bool:
        assert self.backend is not None
        delay = BACKOFF[0]
        while True:
            await asyncio.sleep(delay)
            try:
                return await self.backend.connect()
            except ConnectionError as exc:
                self.stats["broker_errors"] += 1
                logger.warning("fan-out broker unreachable (%s); retrying in %.2f s", exc, delay)
                delay = min(delay * 2, BACKOFF[1])

    async def _receive(self, data: bytes) -> None:
        assert self.seal is not None
        self.stats["received"] += 1
        body = self.seal.open(data)
        if body is None:
            self.stats["forged"] += 1
            logger.error(
                "dropped a message from the fan-out broker without a valid seal (forged, or "
                "published by a node with another fanout_key): %.100r",
                data,
            )
            return
        try:
            envelope = self.codec.decode(body)
        except ValueError as exc:
            self.stats["malformed"] += 1
            logger.error("unreadable message from the fan-out broker (%s): %.200r", exc, body)
            self._gap("a message from the fan-out broker could not be read")
            return
        if envelope.term < self._term:
            self.stats["stale"] += 1  # from a capture node that has been replaced
            return
        if envelope.term > self._term:
            if not await self._verified(envelope.term):
                return
            self._term, self._expect = envelope.term, envelope.seq
        if envelope.seq < self._expect:
            self.stats["replayed"] += 1  # the broker never sends one twice: someone did
            logger.warning("dropped message %d of term %d: read already", envelope.seq, self._term)
            return
        if envelope.seq > self._expect and not self._excused:
            self._gap(f"message {self._expect} of the capture node went missing")
        self._expect, self._excused = envelope.seq + 1, False
        self._deliver(envelope.items)

    async def _verified(self, term: int) -> bool:
        """Whether ``term``, newer than the current one, is the term of the node that holds
        the election's lock now: asked of Postgres once per new term (a term that failed is
        remembered, and its further messages are dropped without asking)."""
        if term == self.election.term:
            return True
        if term in self._rejected:
            self.stats["unverified"] += 1
            return False
        try:
            elected = await asyncio.to_thread(current_term, self.connect, self.election.key)
        except psycopg.Error as exc:  # not remembered: the next message asks again
            self.stats["term_check_errors"] += 1
            logger.error("cannot check capture term %d against the election: %s", term, exc)
            self._gap(f"capture term {term} could not be checked against the election")
            return False
        if elected == term:
            return True
        self.stats["unverified"] += 1
        logger.error(
            "dropping messages of capture term %d: the elected node's is %s", term, elected
        )
        self._rejected[term] = None
        if len(self._rejected) > REJECTED:
            del self._rejected[next(iter(self._rejected))]
        # Sealed, so perhaps a genuine capture node's, replaced since: what it published is
        # not delivered.
        self._gap(f"messages of capture term {term} are not the elected node's")
        return False

    def _deliver(self, items: Sequence[Item]) -> None:
        run: list[Resolved | Flush] = []
        for item in [*items, None]:
            if isinstance(item, Resolved | Flush):
                run.append(item)
                continue
            if run:
                try:
                    self.dispatcher.deliver(run)
                except Exception:
                    self.stats["batch_errors"] += 1
                    logger.exception("error while delivering a batch of %d changes", len(run))
                    self._gap("a batch of changes could not be delivered")
                run = []
            if isinstance(item, Gap):
                self._gap(item.reason, item.tables)
            elif isinstance(item, Started):
                self.stats["captures"] += 1
                if not item.resumed:
                    self._gap("a new capture node started: changes may have been missed")

    def _gap(self, reason: str, tables: Sequence[tuple[str, str]] | None = None) -> None:
        self.stats["gaps"] += 1
        logger.info("resync: %s", reason)
        self.dispatcher.gap(reason, tables)

    # -- the capture node: resolve, publish --------------------------------------------

    def _elected(self, term: int) -> None:
        """In the election's thread: start listening, and announce it once it listens."""
        assert self._loop is not None
        self._seq = 0
        self.listener.start()
        asyncio.run_coroutine_threadsafe(self._announce(term), self._loop)

    async def _announce(self, term: int) -> None:
        # Once the listener listens (what was committed before may have been missed, and the
        # gap this announces covers it), unless its first batch has announced it already.
        while not await asyncio.to_thread(self.listener.connected.wait, 0.5):
            if self.election.term != term:
                return
        await self._publish(term, [])

    def _deposed(self) -> None:
        self.listener.stop()

    def _capture(self, batch: Sequence[Notice | Flush]) -> None:
        """The listener's ``on_batch`` while elected."""
        if (term := self.election.term) is not None:
            self._publish_from_listener(term, self.dispatcher.resolve(batch))
        else:  # only a listener started by hand can get here
            self.stats["unpublished"] += len(batch)
            logger.warning("%d event(s) received while not the capture node: dropped", len(batch))

    def _capture_gap(self, reason: str, tables: Sequence[tuple[str, str]] | None = None) -> None:
        """The listener's ``on_gap`` while elected."""
        if (term := self.election.term) is not None:
            gap = Gap(reason, None if tables is None else tuple(tables))
            self._publish_from_listener(term, [gap])

    def _publish_from_listener(self, term: int, items: Sequence[Item]) -> None:
        try:
            self._call(self._publish(term, items), PUBLISH_TIMEOUT)
        except TimeoutError:
            logger.warning("publishing a batch took over %s s: counted lost", PUBLISH_TIMEOUT)

    async def _publish(self, term: int, items: Sequence[Item]) -> None:
        assert self.backend is not None and self._publishing is not None
        try:
            async with self._publishing:
                if self._unsent is not None:
                    items = [Gap(self._unsent), *items]
                if self._seq == 0:
                    items = [Started(self.resumes), *items]  # the term's first message says so
                if not items:
                    return
                assert self.seal is not None
                room = self.backend.max_message - OVERHEAD
                messages = self.codec.encode(term, self._seq, items, room)
                self._seq += len(messages)  # numbered even if lost: the nodes see the hole
                for message in messages:
                    await self.backend.publish(self.seal.seal(message))
                self._unsent = None
                self.stats["published"] += len(messages)
        except (ConnectionError, asyncio.CancelledError) as exc:
            self.stats["publish_errors"] += 1
            self._unsent = "the capture node could not publish to the fan-out broker"
            logger.warning("cannot publish to the fan-out broker: %r", exc)
            asyncio.get_running_loop().call_later(RETRY, self._retry, term)
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _retry(self, term: int) -> None:
        """Publish the gap that a failed publish left, even if no change comes to carry it."""
        if self._unsent is not None and self.election.term == term:
            task = asyncio.get_running_loop().create_task(self._publish(term, []))
            self._retries.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self._retries.discard)


def _lock_key(schema: str, channel: str) -> int:
    """The advisory lock the nodes of one group (per database, schema and channel) elect with."""
    return advisory.key(f"rowsync capture {schema}.{channel}")


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
