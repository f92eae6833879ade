"""Resync after a reconnect, 10,000 held rows (issue 6, row 9).

The tree: 1,000 persons x 10 posts (11,000 objects, ``selectinload(Person.posts)``), held by
a subscription of a started ``RowSync``. Each round kills the listener's connection
(``pg_terminate_backend``); the listener reconnects and every subscription gets
``(Resync, info)``. Once it has arrived, ``tree = rs.resync(tree)`` is timed. Baseline, in the
same round: re-running the tree's query (a new Session, same loader options).

Reported: resync time (goal <= 500 ms) and its ratio to the tree query, both medians over
rounds; as context, the time from the kill to the Resync message, and whether the resynced
tree holds the rows a fresh query returns.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from harness import Context, Goal, Result, median

import rowsync
from models import populate, schema
from rowsync.listener import APPLICATION_NAME
from rowsync.messages import Resync

ROW = 9
"""This benchmark's row in issue 6's table."""

PERSONS = 1000
POSTS_PER_PERSON = 10


def run(ctx: Context) -> list[Result]:
    rounds = ctx.rounds(5, 2)
    with ctx.database("resync") as url:
        engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
        try:
            return _run(engine, rounds)
        finally:
            engine.dispose()


def _kill_listener(engine: sa.Engine) -> int:
    with engine.begin() as conn:
        return len(
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = :name AND datname = current_database()"
                ),
                {"name": APPLICATION_NAME},
            ).all()
        )


def _run(engine: sa.Engine, rounds: int) -> list[Result]:
    s = schema()
    populate(engine, s, PERSONS, POSTS_PER_PERSON)
    rs = rowsync.RowSync(engine, rowsync.watchers(s.person, ["posts"]))
    rs.install()
    resyncs: list[float] = []
    queries: list[float] = []
    delays: list[float] = []
    same = 0
    with rs:
        tree = s.load_tree(engine)
        objects = len(tree) + sum(len(p.posts) for p in tree)
        sub = rs.subscribe(tree, assocs=["posts"])
        for r in range(rounds):
            sub.drain()
            with engine.begin() as conn:  # something to catch up on
                conn.execute(
                    sa.update(s.posts).where(s.posts.c.id % 100 == r).values(title=f"round {r}")
                )
            killed_at = time.perf_counter()
            if not _kill_listener(engine):
                raise RuntimeError("no listener connection to kill")
            while True:
                message = sub.get(timeout=30)
                if message[0] is Resync:
                    break
            delays.append(time.perf_counter() - killed_at)
            start = time.perf_counter()
            tree = rs.resync(tree)
            resyncs.append(time.perf_counter() - start)
            start = time.perf_counter()
            fresh = s.load_tree(engine)
            queries.append(time.perf_counter() - start)
            same += [(p.id, [(q.id, q.title) for q in p.posts]) for p in tree] == [
                (p.id, [(q.id, q.title) for q in p.posts]) for p in fresh
            ]
        sub.close()
    value = median(resyncs)
    return [
        Result(
            "resync",
            f"rs.resync(tree), {objects:,} objects",
            value,
            baseline=median(queries),
            baseline_label="re-running the tree's query (new Session, same loader options)",
            ratio=median([r / q for r, q in zip(resyncs, queries, strict=True)]),
            goal=Goal.at_most("<= 500 ms", value, 0.5),
            notes=(
                f"after pg_terminate_backend of the listener; {rounds} rounds; "
                f"{same} of {rounds} resynced trees equal a fresh query"
            ),
        ),
        Result(
            "resync",
            "listener killed -> Resync received (context)",
            median(delays),
            notes="reconnect back-off starts at 50 ms",
        ),
    ]
