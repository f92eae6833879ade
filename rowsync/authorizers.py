"""Authorizers run off the listener thread: each subscription's in order, on a few workers.

An authorizer is the application's code: it may query, call a service, or block. Run in the
listener thread it would hold up every subscriber, since the listener delivers one batch to
all of them at a time. A time budget cannot help there: a running Python call cannot be
stopped, so the listener would still wait out the budget on each slow call (or cut a slow
authorizer's subscriber off into resyncs it must pay for again and again).

So each subscription with an authorizer has a lane: the listener appends the message and
the fetched row, and goes on. A worker takes a lane's next message, asks the authorizer and
queues the message if it is allowed, then the next lane's: a lane's messages keep their
order, and a slow authorizer makes only its own subscription lag. Workers are few; one busy
in a single call for longer than ``patience`` no longer counts, and another is started, so a
blocking authorizer holds its own lane (and one thread), never the others. Idle workers end.

A lane is bounded like the queue it feeds: at its subscription's ``maxsize`` its pending
messages are replaced by one ``(Resync, ResyncInfo("overflow"))``. Flush barriers wait for
the lanes (:meth:`Authorizers.after`): a flush returns once every subscriber has what was
committed before it, so a blocking authorizer makes ``rs.flush()`` time out, not others lag.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rowsync.messages import Change, Message, Resync, ResyncInfo
from rowsync.subscription import Subscription

logger = logging.getLogger(__name__)


class _Barrier:
    """Runs ``callback`` once each of ``count`` lanes has reached it."""

    def __init__(self, count: int, callback: Callable[[], None]) -> None:
        self._count = count
        self._callback = callback
        self._lock = threading.Lock()

    def reached(self) -> None:
        with self._lock:
            self._count -= 1
            done = self._count == 0
        if done:
            self._callback()


@dataclass(eq=False)
class _Lane:
    sub: Subscription
    items: deque[tuple[Message, Mapping[str, Any] | None] | _Barrier] = field(default_factory=deque)
    messages: int = 0
    """Items that are messages (not barriers)."""


class Authorizers:
    """The lanes of the subscriptions that have an authorizer, and the workers serving them."""

    def __init__(
        self,
        stats: Counter[str],
        *,
        workers: int = 4,
        patience: float = 0.1,
        linger: float = 5.0,
    ) -> None:
        self.stats = stats
        self.workers = workers
        self.patience = patience
        """Seconds a worker may spend in one call and still be counted on."""
        self.linger = linger
        """Seconds an idle worker waits for work before it ends."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._watch = threading.Condition(self._lock)
        self._lanes: dict[int, _Lane] = {}
        """Lanes with something to do or being served, by subscription id."""
        self._ready: deque[_Lane] = deque()
        """Lanes waiting for a worker (a lane being served is not here: one call at a time)."""
        self._threads = 0
        self._idle = 0
        self._calls: dict[int, float] = {}
        """When each worker's current call began, by thread id."""
        self._watching = False

    def submit(self, sub: Subscription, message: Message, row: Mapping[str, Any] | None) -> None:
        """Queue ``message`` for ``sub`` once its authorizer allows it (a Resync always)."""
        with self._lock:
            lane = self._lanes.get(sub.id)
            if lane is None:
                lane = self._lanes[sub.id] = _Lane(sub)
                self._ready.append(lane)
                self._serve()
            if lane.messages >= sub.maxsize:
                sub.overflows += 1
                logger.warning(
                    "subscription #%d's authorizer is %d messages behind: replaced by a resync",
                    sub.id,
                    lane.messages,
                )
                lane.items = deque(item for item in lane.items if isinstance(item, _Barrier))
                lane.messages = 0
                message, row = (Resync, ResyncInfo("overflow", time.monotonic())), None
            lane.items.append((message, row))
            lane.messages += 1

    def after(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once everything submitted so far has been ruled on (at once, in
        this thread, when nothing is pending; else in a worker's)."""
        with self._lock:
            lanes = list(self._lanes.values())
            if lanes:
                barrier = _Barrier(len(lanes), callback)
                for lane in lanes:
                    lane.items.append(barrier)
                return
        callback()

    def wait(self, timeout: float) -> bool:
        """Whether everything submitted so far was ruled on within ``timeout`` seconds."""
        done = threading.Event()
        self.after(done.set)
        return done.wait(timeout)

    # -- workers (under the lock unless said) -------------------------------------------

    def _serve(self) -> None:
        """See that a ready lane gets a worker: an idle one, a new one while there are
        fewer than ``workers`` or all are stuck in a call, or soon (the watcher)."""
        if self._idle:
            self._work.notify()
        elif self._threads < self.workers or self._stuck():
            self._threads += 1
            threading.Thread(target=self._worker, name="rowsync-authorizer", daemon=True).start()
        elif not self._watching:
            self._watching = True
            threading.Thread(target=self._watcher, name="rowsync-authorizers", daemon=True).start()

    def _stuck(self) -> bool:
        """Whether every worker is in a call that began more than ``patience`` ago."""
        now = time.monotonic()
        return len(self._calls) == self._threads and all(
            now - began > self.patience for began in self._calls.values()
        )

    def _watcher(self) -> None:
        """While lanes wait and no worker is free, look again every ``patience``."""
        with self._lock:
            while self._ready and not self._idle:
                self._watch.wait(self.patience)
                if self._ready and not self._idle and self._stuck():
                    self._serve()
            self._watching = False

    def _worker(self) -> None:
        me = threading.get_ident()
        with self._lock:
            while True:
                while not self._ready:
                    self._idle += 1
                    woken = self._work.wait(self.linger)
                    self._idle -= 1
                    if not woken and not self._ready:
                        self._threads -= 1
                        return
                lane = self._ready.popleft()
                while lane.items:
                    item = lane.items.popleft()
                    if isinstance(item, _Barrier):
                        self._unlocked(item.reached)
                        continue
                    lane.messages -= 1
                    self._calls[me] = time.monotonic()
                    try:
                        self._unlocked(self._rule, lane.sub, *item)
                    finally:
                        del self._calls[me]
                    if lane.items and self._ready:
                        self._ready.append(lane)  # the next lane's turn
                        break
                else:
                    del self._lanes[lane.sub.id]

    def _unlocked(self, call: Callable[..., None], *args: Any) -> None:
        self._lock.release()
        try:
            call(*args)
        finally:
            self._lock.acquire()

    def _rule(self, sub: Subscription, message: Message, row: Mapping[str, Any] | None) -> None:
        """Queue ``message`` if ``sub``'s authorizer allows it (outside the lock)."""
        change = message[1]
        if isinstance(change, Change) and sub.authorize is not None:
            try:
                allowed = bool(sub.authorize(sub.context, change, row))
            except Exception:
                logger.exception("authorizer of subscription #%d failed: change withheld", sub.id)
                self._count("authorizer_errors")
                return
            if not allowed:
                self._count("denied")
                return
        sub.put(message)

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1
