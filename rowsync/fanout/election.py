"""Which node captures: the one whose dedicated connection holds a session advisory lock.

Postgres releases a session lock when the session ends (the process crashed, its backend
was terminated, its connection broke), so the holder is, by construction, a live node.
The others try to take the lock every ``interval`` seconds and the holder probes its
connection as often: it steps down as soon as a probe fails, and the server ends its
session (releasing the lock) after ``LEASE`` probe intervals without one, so a holder cut
off from the server does not keep the lock for as long as TCP takes to notice.

A node must also be ``eligible``: one that reaches Postgres but not the broker would capture
for nobody. It does not campaign, and a holder that stops being eligible steps down and
releases the lock, so a node that can publish takes over.

Each new holder gets a *term*: the cluster's next transaction id, larger than any term
before it. Nodes ignore what an older capture node still publishes once a newer one has
started (a fencing token). A term is not taken on the word of a message: the holder shows
its term in its session's ``application_name``, and a node that reads a new term checks it
against the session that holds the lock (:func:`current_term`: ``pg_locks`` and
``pg_stat_activity`` are readable by every role, and only the holder holds the lock), so a
message claiming a huge term cannot fence out the real capture node.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, LiteralString

import psycopg
from psycopg.rows import TupleRow

from rowsync import advisory
from rowsync.connect import Connect

logger = logging.getLogger(__name__)

APPLICATION_NAME = "rowsync-election"
"""``application_name`` of the election's connection, to find it in ``pg_stat_activity``."""

LEASE = 10
"""Probe intervals without a probe after which the server ends a node's session."""

SET_NAME: LiteralString = "SELECT set_config('application_name', %s, false)"


def _holder(connect: Connect, key: int) -> tuple[str, int, str] | None:
    with connect(autocommit=True) as conn:
        row = conn.execute(advisory.holder(key)).fetchone()
    return None if row is None else (str(row[0] or ""), int(row[1]), str(row[2] or ""))


def _term(name: str) -> int | None:
    term = name.removeprefix(f"{APPLICATION_NAME} ")
    return int(term) if term != name and term.isdigit() else None


def current_term(connect: Connect, key: int) -> int | None:
    """The term of the node that holds the lock ``key`` now; None if nobody holds it (or its
    holder has not shown a term yet). Raises psycopg.Error if Postgres cannot be asked."""
    found = _holder(connect, key)
    return None if found is None else _term(found[0])


def squatter(connect: Connect, key: int) -> str | None:
    """Who holds the lock ``key`` without being a capture node (no term shown), described for
    an error message; None if nobody does. Any role may take any advisory lock: a session that
    holds the election's keeps every node from capturing, and this names it."""
    found = _holder(connect, key)
    if found is None or _term(found[0]) is not None:
        return None
    name, pid, role = found
    return f"pid {pid} (role {role!r}, application_name {name!r})"


class Election:
    """Campaigns for ``key`` in a thread of its own; calls ``on_elected(term)`` when this node
    takes the lock and ``on_deposed()`` when it no longer holds it (or is stopping)."""

    def __init__(
        self,
        connect: Connect,
        key: int,
        *,
        on_elected: Callable[[int], None],
        on_deposed: Callable[[], None],
        eligible: Callable[[], bool] = lambda: True,
        interval: float = 1.0,
    ) -> None:
        self.connect = connect
        self.eligible = eligible
        self.key = key
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.interval = interval
        self.term: int | None = None
        """This node's term while it holds the lock."""
        self.stats: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="rowsync-election", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Step down (if elected) and release the lock."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("election thread did not stop within %s s", timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                with self.connect(autocommit=True, name=APPLICATION_NAME) as conn:
                    try:
                        self._campaign(conn)
                    finally:
                        self._step_down()  # before the lock goes with the connection
            except psycopg.Error as exc:
                self.stats["connection_errors"] += 1
                if not self._stopping.is_set():
                    logger.warning("election connection lost (%s); retrying", exc)
            self._stopping.wait(self.interval)

    def _campaign(self, conn: psycopg.Connection[TupleRow]) -> None:
        if conn.info.server_version >= 140000:
            lease = f"{int(self.interval * LEASE * 1000)}ms"
            conn.execute("SELECT set_config('idle_session_timeout', %s, false)", (lease,))
        while not self._stopping.is_set():
            if self.term is None:
                if self.eligible() and _one(conn, "SELECT pg_try_advisory_lock(%s)", self.key):
                    term = int(_one(conn, "SELECT pg_current_xact_id()::text::bigint"))
                    _one(conn, SET_NAME, f"{APPLICATION_NAME} {term}")  # before it publishes
                    self.term = term
                    self.stats["elected"] += 1
                    logger.info("elected capture node (term %d)", self.term)
                    self.on_elected(self.term)
            elif not self.eligible():
                self.stats["resigned"] += 1
                self._step_down()
                _one(conn, "SELECT pg_advisory_unlock(%s)", self.key)
                _one(conn, SET_NAME, APPLICATION_NAME)
            else:
                conn.execute("SELECT 1")  # raises once the session, and so the lock, is gone
            self._stopping.wait(self.interval)

    def _step_down(self) -> None:
        if self.term is not None:
            logger.info("capture node stepping down (term %d)", self.term)
            self.term = None
            self.on_deposed()


def _one(conn: psycopg.Connection[TupleRow], query: LiteralString, *params: Any) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]
