"""Stampede: 100 subscribers holding the same tree, one change (issue 6, row 7).

100 threads each load the same tree (100 persons x 10 posts, each thread its own copy, as
100 web clients showing the same page would) and subscribe to it. One change is committed;
each thread takes its message and applies it with ``rs.sync``. Every statement the engine
runs from the commit until the last thread is done is counted (the listener's row fetch
included). Goal: one row query in total, however many subscribers.

Three changes, each its own round:

* an update of a post (every tree patches it);
* an insert of a post for person 1 (every tree builds the new object);
* the update again after the row left the cache (expired, evicted) before the subscribers
  apply it: all 100 miss at once, and single-flight must turn that into one more query.

The threads wait at a barrier once they hold the message, so the 100 syncs really start
together. Reported: queries, and the time from the barrier's release to the last sync's end.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import sqlalchemy as sa
from harness import Context, Goal, Result, median

import rowsync
from models import populate, schema

ROW = 7
"""This benchmark's row in issue 6's table."""

SUBSCRIBERS = 100
PERSONS = 100
POSTS_PER_PERSON = 10


class _Statements:
    def __init__(self, engine: sa.Engine) -> None:
        self.count = 0
        sa.event.listen(engine, "before_cursor_execute", self._hit)

    def _hit(self, *args: Any) -> None:
        self.count += 1


def _round(
    rs: rowsync.RowSync, subs: list[Any], trees: list[Any], write: Any, clear_cache: bool
) -> tuple[float, int]:
    """Commit the change and let every subscriber apply it; return (seconds from the
    barrier's release to the last sync's end, subscribers that applied it)."""
    holding = threading.Barrier(len(subs) + 1)
    go = threading.Event()
    ended: list[float] = []

    def subscriber(i: int) -> None:
        message = subs[i].get(timeout=30)
        holding.wait(60)
        go.wait(60)
        trees[i] = rs.sync(trees[i], message)
        ended.append(time.perf_counter())

    threads = [threading.Thread(target=subscriber, args=(i,)) for i in range(len(subs))]
    for t in threads:
        t.start()
    write()
    holding.wait(60)  # every subscriber holds the message: the listener is done with it
    if clear_cache:
        rs.cache.clear()
    start = time.perf_counter()
    go.set()
    for t in threads:
        t.join(60)
    return max(ended) - start, len(ended)


CASES = ("update", "insert", "update, row gone from the cache")


def run(ctx: Context) -> list[Result]:
    rounds = ctx.rounds(3, 1)
    with ctx.database("stampede") as url:
        engine = sa.create_engine(
            sa.make_url(url).set(drivername="postgresql+psycopg"), pool_size=5, max_overflow=20
        )
        writer = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
        try:
            return _run(engine, writer, rounds)
        finally:
            engine.dispose()
            writer.dispose()


def _run(engine: sa.Engine, writer: sa.Engine, rounds: int) -> list[Result]:
    """``engine`` is rowsync's, whose statements are counted; ``writer`` commits the changes."""
    s = schema()
    populate(engine, s, PERSONS, POSTS_PER_PERSON)
    rs = rowsync.RowSync(engine, rowsync.watchers(s.person, ["posts"]))
    rs.install()
    counter = _Statements(engine)
    figures: dict[str, list[tuple[int, float, int]]] = {case: [] for case in CASES}
    next_id = PERSONS * POSTS_PER_PERSON + 1
    with rs:
        trees = [s.load_tree(engine) for _ in range(SUBSCRIBERS)]
        subs = [rs.subscribe(tree, assocs=["posts"]) for tree in trees]
        for r in range(rounds):
            for case in CASES:
                if case == "insert":
                    change: Any = sa.insert(s.posts).values(
                        id=next_id, person_id=1, title="new", body="", score=0
                    )
                    next_id += 1
                else:
                    change = sa.update(s.posts).where(s.posts.c.id == 5).values(title=f"{r} {case}")

                def write(change: Any = change) -> None:
                    with writer.begin() as conn:
                        conn.execute(change)

                before = counter.count
                seconds, applied = _round(rs, subs, trees, write, clear_cache="cache" in case)
                figures[case].append((counter.count - before, seconds, applied))
        patched = sum(tree[0].posts[4].title == f"{rounds - 1} {CASES[-1]}" for tree in trees)
    results = []
    for case, got in figures.items():
        queries = max(q for q, _, _ in got)
        limit = 2 if "cache" in case else 1
        notes = (
            f"all {SUBSCRIBERS} syncs took {median([t for _, t, _ in got]) * 1e3:.1f} ms "
            f"(median of {len(got)} rounds; the worst round's queries shown); "
            f"{min(a for _, _, a in got)} of {SUBSCRIBERS} applied it"
        )
        if limit == 2:
            notes += (
                "; the listener's fetch plus one re-fetch shared by all (single-flight); "
                f"{patched} of {SUBSCRIBERS} trees carry the last title"
            )
        results.append(
            Result(
                "stampede",
                f"{SUBSCRIBERS} subscribers, one {case}: row queries",
                float(queries),
                unit="count",
                goal=Goal.at_most(f"<= {limit} in total", queries, limit, "count"),
                notes=notes,
            )
        )
    return results
