"""Routing and queueing one change for N in-process subscribers, N = 10, 100, 1,000 (issue 6,
row 6: "fan-out of one change to N in-process subscribers").

N subscriptions each hold the same post (``rs.subscribe(post)``). One sample hands one update
of that post to all of them the way the dispatcher does: ``Router.route`` finds the N
subscriptions, then each gets the message through ``Subscription.put`` (after the origin and
authorizer checks, as in delivery). No database: routing and queueing only (fetching the row
is once per change, whatever N; rows 2 and 7 cover it). Queues are drained between samples,
untimed.

Baseline, interleaved sample by sample: a bare loop calling N Python callbacks, each appending
the message to a list of its own. Figures: median sample / N, median over rounds.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from harness import Context, Goal, Result, median
from sqlalchemy.orm import make_transient_to_detached

import rowsync
from models import schema
from rowsync.messages import Change, Sync

ROW = 6
"""This benchmark's row in issue 6's table."""

SIZES = (10, 100, 1000)


def _callbacks(n: int) -> list[tuple[Any, list[Any]]]:
    """N callbacks, each appending to an inbox of its own."""

    def make() -> tuple[Any, list[Any]]:
        inbox: list[Any] = []

        def callback(message: Any) -> None:
            inbox.append(message)

        return callback, inbox

    return [make() for _ in range(n)]


def run(ctx: Context) -> list[Result]:
    rounds = ctx.rounds(5, 2)
    samples = ctx.rounds(300, 100)
    s = schema()
    engine = sa.create_engine(sa.make_url(ctx.dsn).set(drivername="postgresql+psycopg"))
    rs = rowsync.RowSync(engine, rowsync.watchers(s.person, ["posts"]))  # never started
    post = s.post(id=1, person_id=1, title="t", body="b", score=1)
    make_transient_to_detached(post)
    table = s.posts
    ids = {"id": 1, "person_id": 1}
    message = (Sync, Change(s.post, "updated", ids, 1))
    results = []
    for n in SIZES:
        subs = [rs.subscribe(post) for _ in range(n)]
        pairs = _callbacks(n)
        callbacks = [c for c, _ in pairs]
        per_round: list[tuple[float, float]] = []
        for _ in range(rounds):
            mine, bare = [], []
            for _ in range(samples):
                start = time.perf_counter()
                for sub in rs.router.route(table, "updated", ids, ids):
                    if sub.ignore_origins and None in sub.ignore_origins:
                        continue
                    if sub.authorize is not None:
                        continue
                    sub.put(message)
                mine.append(time.perf_counter() - start)
                start = time.perf_counter()
                for callback in callbacks:
                    callback(message)
                bare.append(time.perf_counter() - start)
                for sub in subs:
                    sub.drain()
                for _, inbox in pairs:
                    inbox.clear()
            per_round.append((median(mine) / n, median(bare) / n))
        for sub in subs:
            sub.close()
        value = median([m for m, _ in per_round])
        base = median([b for _, b in per_round])
        results.append(
            Result(
                "routing",
                f"route + queue, {n:,} subscribers: per subscriber",
                value,
                baseline=base,
                baseline_label=f"a bare loop of {n:,} Python callbacks appending to a list",
                ratio=median([m / b for m, b in per_round]),
                goal=Goal.at_most("<= 1 us", value, 1e-6),
                notes=(
                    f"whole fan-out {value * n * 1e6:,.1f} us; median of {samples} samples "
                    f"per round, {rounds} rounds"
                ),
            )
        )
    engine.dispose()
    return results
