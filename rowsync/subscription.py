"""A subscription: a bounded queue of messages, read from threads or from asyncio.

The listener thread puts; the subscriber gets. ``put`` never blocks: when the queue is
full, its pending messages are dropped and replaced by one ``(Resync, ResyncInfo("overflow"))``
message, so a subscriber that stops reading costs a bounded amount of memory, never delays
the listener or other subscribers, and learns that it must call ``rs.resync(tree)``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rowsync.messages import Change, Message, Resync, ResyncInfo

if TYPE_CHECKING:
    from rowsync.position import Position
    from rowsync.router import Interest, Reason

logger = logging.getLogger(__name__)

Authorizer = Callable[[Any, Change, Mapping[str, Any] | None], bool]
"""Decides whether a subscriber may receive a change: sees the subscription's ``context``,
the change, and the row as fetched (None for a delete). Runs on a worker thread, one change
at a time per subscription (:mod:`rowsync.authorizers`): a slow one delays only its own."""

_ids = itertools.count(1)


class Subscription:
    """Messages for one subscriber. Create with ``rs.subscribe(...)``; extend with ``add``."""

    def __init__(
        self,
        subscribe: Callable[..., None],
        unsubscribe: Callable[[Subscription], None],
        maxsize: int,
        ignore_origins: frozenset[str] = frozenset(),
        authorize: Authorizer | None = None,
        context: Any = None,
    ) -> None:
        self.id = next(_ids)
        self.maxsize = maxsize
        self.ignore_origins = ignore_origins
        """Origins whose writes this subscriber made itself and does not want echoed."""
        self.authorize = authorize
        """``authorize(context, change, row) -> bool``, asked before each change is queued."""
        self.context = context
        self.overflows = 0
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self._queue: deque[Message] = deque()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._blocked = 0
        """Threads waiting in ``get``: ``put`` notifies only when there are some."""
        self._closed = False
        # Routing state, owned by the router (under its lock).
        self.interests: dict[Interest, Counter[Reason]] = {}
        self.models: list[tuple[Any, str | None, dict[str, Any], Any, Any]] = []
        self.below: dict[Any, dict[tuple[Any, ...], Any]] = {}
        self.trees: list[tuple[Any, Any]] = []
        """The trees subscribed to (a list of roots or one object) with their ``assocs``: a
        resync registers them again, ``follow=True`` model interests say how lists grow."""
        self.seen: Position | None = None
        """What everything subscribed to was loaded after (:meth:`placed`); None until
        something is."""

    def __repr__(self) -> str:
        interests = len(self.interests) + len(self.models)
        return f"<Subscription #{self.id} queued={len(self._queue)} interests={interests}>"

    # -- what to receive ---------------------------------------------------------------

    def placed(self, position: Position) -> None:
        """Something was subscribed to as loaded after ``position``
        (:data:`~rowsync.position.NOWHERE` when unknown): changes the positions of all saw
        are in what was loaded, and are not queued (:meth:`saw`)."""
        self.seen = position if self.seen is None else self.seen.meet(position)

    def saw(self, xid: int | None) -> bool:
        """Whether what this subscription follows was loaded after transaction ``xid``."""
        return self.seen is not None and self.seen.saw(xid)

    def add(
        self,
        target: Any,
        event: str | None = None,
        /,
        *,
        assocs: Any = (),
        follow: bool = False,
        since: Position | None = None,
        **filters: Any,
    ) -> Subscription:
        """Receive more on this same queue; overlapping interests still deliver each change once.

        Same arguments as ``rs.subscribe``.
        """
        self._subscribe(self, target, event, assocs=assocs, follow=follow, since=since, **filters)
        return self

    def close(self) -> None:
        """Stop receiving; messages already queued can still be drained."""
        if not self._closed:
            self._closed = True
            self._unsubscribe(self)
            self._wake()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- the listener's side -----------------------------------------------------------

    def put(self, message: Message) -> None:
        self.put_all((message,))

    def put_all(self, messages: Sequence[Message]) -> None:
        """Queue ``messages`` in order, waking the reader once for all of them."""
        with self._lock:  # the condition's lock, without Condition's Python-level __enter__
            if self._closed:
                return
            for message in messages:
                if len(self._queue) >= self.maxsize:
                    self.overflows += 1
                    logger.warning(
                        "subscription #%d overflowed (%d queued): replaced by a resync",
                        self.id,
                        len(self._queue),
                    )
                    self._queue.clear()
                    self._queue.append((Resync, ResyncInfo("overflow", time.monotonic())))
                self._queue.append(message)
            if self._blocked:
                self._cond.notify_all()
            if not self._waiters:
                return
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)

    def _wake(self) -> None:
        with self._cond:
            waiters, self._waiters = self._waiters, []
            if self._closed:
                self._cond.notify_all()
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)

    # -- the subscriber's side ---------------------------------------------------------

    def __len__(self) -> int:
        return len(self._queue)

    def get(self, timeout: float | None = None) -> Message:
        """The next message; raises :class:`TimeoutError` when none arrives in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._queue:
                if self._closed:
                    raise TimeoutError("subscription closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no message within {timeout} s")
                self._blocked += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._blocked -= 1
            return self._queue.popleft()

    def drain(self) -> list[Message]:
        """Every message already queued, without waiting."""
        with self._cond:
            messages = list(self._queue)
            self._queue.clear()
            return messages

    async def aget(self, timeout: float | None = None) -> Message:
        """``get`` for asyncio: waits without blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._cond:
                if self._queue:
                    return self._queue.popleft()
                if self._closed:
                    raise TimeoutError("subscription closed")
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, future))
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"no message within {timeout} s")
            try:
                await asyncio.wait_for(future, remaining)
            except TimeoutError:
                raise TimeoutError(f"no message within {timeout} s") from None

    def __iter__(self) -> Iterator[Message]:
        """Blocking iteration; ends when the subscription is closed."""
        while True:
            try:
                yield self.get()
            except TimeoutError:
                return

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.aget()
            except TimeoutError:
                return


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
