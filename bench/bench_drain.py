"""Listener drain: a backlog of 100,000 changes through parse, routing, batched row fetch and
one subscriber (issue 6, row 2).

NOTIFY reaches only connections that LISTEN when the writer commits, so the backlog is built
while the receiver listens but does not read:

* baseline: a psycopg connection LISTENs on the hand-written ``pg_notify(id)`` trigger's
  channel and reads nothing while the backlog commits; then the clock starts and a minimal
  loop reads every notification and ``json.loads`` its payload;
* rowsync, in each capture mode it offers: a started ``RowSync`` whose listener thread is
  held inside a gate - the authorizer of a subscription to ``Person`` blocks until released -
  after a person update, so posts' changes pile up unread (in the NOTIFY queue, or in the
  change log). The clock starts when the gate opens; it stops when one subscriber, a thread
  blocked in ``sub.get()`` on a model-level subscription to ``Post``, has taken every change.

The backlog is 100 transactions of ``UPDATE posts SET score = score + 1 WHERE id BETWEEN ...``
over 1,000 rows each (20 with --quick), 100,000 distinct posts. Figures: changes a second,
median over rounds; the ratio is the median of per-round ratios to the baseline.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import psycopg
import sqlalchemy as sa
from captures import MINIMAL, Capture, setup, vacuum
from harness import Context, Goal, Result, median
from psycopg import sql

from rowsync.messages import Change, Sync

logger = logging.getLogger(__name__)

ROW = 2
"""This benchmark's row in issue 6's table."""

PER_TRANSACTION = 1000
POSTS_PER_PERSON = 10


def backlog(engine: sa.Engine, capture: Capture, changes: int) -> None:
    """Commit one update of each of the first ``changes`` posts, 1,000 a transaction."""
    posts = capture.schema.posts
    with engine.connect() as conn:
        for start in range(1, changes + 1, PER_TRANSACTION):
            end = min(start + PER_TRANSACTION, changes + 1) - 1
            conn.execute(
                sa.update(posts)
                .where(posts.c.id.between(start, end))
                .values(score=posts.c.score + 1)
            )
            conn.commit()


def _baseline(url: str, engine: sa.Engine, capture: Capture, changes: int) -> float:
    """Seconds the minimal loop takes to read and parse the backlog."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(capture.channel)))
        backlog(engine, capture, changes)
        seen = 0
        start = time.perf_counter()
        while seen < changes:
            for note in conn.notifies(timeout=10, stop_after=changes - seen):
                json.loads(note.payload)
                seen += 1
            if time.perf_counter() - start > 300:
                raise RuntimeError(f"baseline drained {seen} of {changes}")
        return time.perf_counter() - start


class _Gate:
    """An authorizer that holds the listener thread until opened."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.opened = threading.Event()

    def __call__(self, context: Any, change: Change, row: Any) -> bool:
        self.holding.set()
        self.opened.wait(600)
        return False


def drain_rowsync(
    engine: sa.Engine, capture: Capture, changes: int
) -> tuple[float, dict[str, Any]]:
    """Seconds rowsync takes from the gate opening to the subscriber's last message."""
    rs = capture.rowsync(engine)
    gate = _Gate()
    done = threading.Event()
    got = 0
    end = 0.0
    with rs:
        rs.subscribe(capture.schema.person, authorize=gate)
        sub = rs.subscribe(capture.schema.post, maxsize=changes + 10_000)

        def consume() -> None:
            nonlocal got, end
            while got < changes:
                try:
                    message = sub.get(timeout=60)
                except TimeoutError:
                    break
                if message[0] is Sync:
                    got += 1
            end = time.perf_counter()
            done.set()

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        persons = capture.schema.persons
        with engine.begin() as conn:
            conn.execute(sa.update(persons).where(persons.c.id == 1).values(name="gate"))
        if not gate.holding.wait(30):
            raise RuntimeError("the listener never reached the gate")
        try:
            backlog(engine, capture, changes)
        finally:
            queries = rs.rows.queries["rows"]
            start = time.perf_counter()
            gate.opened.set()
        if not done.wait(600):
            raise RuntimeError(f"rowsync drained {got} of {changes}")
        consumer.join()
        if got < changes:
            raise RuntimeError(f"rowsync delivered {got} of {changes}")
        stats = {
            "row_queries": rs.rows.queries["rows"] - queries,
            "overflows": sub.overflows,
        }
        sub.close()
    return end - start, stats


def run(ctx: Context) -> list[Result]:
    rounds = ctx.rounds(3, 1)
    changes = ctx.rounds(100_000, 20_000)
    with ctx.database("drain") as url:
        engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
        try:
            return _run(url, engine, rounds, changes)
        finally:
            engine.dispose()


def _run(url: str, engine: sa.Engine, rounds: int, changes: int) -> list[Result]:
    captures = setup(engine, changes // POSTS_PER_PERSON, POSTS_PER_PERSON, baselines=(MINIMAL,))
    baseline, modes = captures[0], captures[1:]
    times: dict[str, list[float]] = {c.name: [] for c in captures}
    stats: dict[str, list[dict[str, Any]]] = {c.name: [] for c in modes}
    for r in range(rounds):
        vacuum(engine, captures)
        shift = r % len(captures)
        for capture in captures[shift:] + captures[:shift]:
            if capture.options is None:
                seconds = _baseline(url, engine, capture, changes)
            else:
                seconds, more = drain_rowsync(engine, capture, changes)
                stats[capture.name].append(more)
            times[capture.name].append(seconds)
            logger.info(
                "round %d %s: %d changes in %.2f s (%.0f/s)",
                r,
                capture.label,
                changes,
                seconds,
                changes / seconds,
            )

    base_rate = median([changes / s for s in times[baseline.name]])
    label = f"minimal LISTEN loop, json.loads of each {baseline.label} payload, same backlog"
    results = [
        Result(
            "drain",
            "baseline rate (context)",
            base_rate,
            unit="/s",
            notes=f"{label}; {changes:,} changes, median of {rounds} rounds",
        )
    ]
    for capture in modes:
        rates = [changes / s for s in times[capture.name]]
        ratios = [
            (changes / s) / (changes / b)
            for s, b in zip(times[capture.name], times[baseline.name], strict=True)
        ]
        rate, ratio = median(rates), median(ratios)
        queries = median([s["row_queries"] for s in stats[capture.name]])
        results += [
            Result(
                "drain",
                f"{capture.label}: changes/s vs baseline",
                rate,
                unit="/s",
                baseline=base_rate,
                baseline_label=label,
                ratio=ratio,
                goal=Goal.at_least(">= 0.5x baseline", ratio, 0.5, "x"),
                notes=(
                    f"{changes:,} changes through parse, routing, batched row fetch "
                    f"({queries:.0f} row queries) and one subscriber; {rounds} rounds"
                ),
            ),
            Result(
                "drain",
                f"{capture.label}: changes/s",
                rate,
                unit="/s",
                goal=Goal.at_least(">= 20,000/s", rate, 20_000, "/s"),
            ),
        ]
    return results
