"""Bulk writes: what capture adds to a 1,000-row UPDATE statement, per row (issue 6, row 4).

Each configuration of ``captures.py`` has its own copy of the posts table (10,000 rows). One
sample is one autocommitted ``UPDATE posts_N SET score = score + 1 WHERE id BETWEEN a AND
a + 999`` (the statement and its commit, timed from the client); a round takes a block of
rows, and runs the statement on it on every configuration in turn (order rotated), for each of
several blocks. Per-row capture cost = (time with the configuration - time with no trigger,
same block, same round) / 1,000, median over every pair.
"""

from __future__ import annotations

import logging
import time

import psycopg
import sqlalchemy as sa
from captures import NONE, Capture, setup, vacuum
from harness import Context, Goal, Result, median
from psycopg import sql

logger = logging.getLogger(__name__)

ROW = 4
"""This benchmark's row in issue 6's table."""

ROWS = 10_000
STATEMENT_ROWS = 1000


def run(ctx: Context) -> list[Result]:
    rounds = ctx.rounds(5, 1)
    blocks = ctx.rounds(10, 4)
    with ctx.database("bulk") as url:
        engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
        try:
            captures = setup(engine, ROWS // 10, 10)
            return measure(url, engine, captures, rounds, blocks)
        finally:
            engine.dispose()


def measure(
    url: str, engine: sa.Engine, captures: list[Capture], rounds: int, blocks: int
) -> list[Result]:
    """The statement on every configuration of ``captures`` (one named ``none``: the
    baseline) in turn, ``blocks`` blocks of rows a round; one row per configuration."""
    times: dict[str, list[float]] = {c.name: [] for c in captures}
    with psycopg.connect(url, autocommit=True) as conn:
        updates = {
            c.name: sql.SQL("UPDATE {} SET score = score + 1 WHERE id BETWEEN %s AND %s").format(
                sql.Identifier(c.schema.posts.name)
            )
            for c in captures
        }
        for r in range(rounds):
            vacuum(engine, captures)
            for b in range(blocks):
                first = (r * blocks + b) * STATEMENT_ROWS % ROWS + 1
                shift = (r * blocks + b) % len(captures)
                for capture in captures[shift:] + captures[:shift]:
                    start = time.perf_counter()
                    conn.execute(updates[capture.name], (first, first + STATEMENT_ROWS - 1))
                    times[capture.name].append(time.perf_counter() - start)
    none = times[NONE]
    how = (
        f"{len(none)} statements of {STATEMENT_ROWS:,} rows per configuration "
        f"({rounds} rounds x {blocks} blocks), each autocommitted, timed from the client"
    )
    results = [
        Result("bulk", "no trigger, 1,000-row UPDATE (context)", median(none), notes=how),
    ]
    for capture in captures:
        if capture.name == NONE:
            continue
        mine = times[capture.name]
        per_row = median([(t - n) / STATEMENT_ROWS for t, n in zip(mine, none, strict=True)])
        results.append(
            Result(
                "bulk",
                f"{capture.label}: capture cost per row",
                per_row,
                baseline=median(none) / STATEMENT_ROWS,
                baseline_label="time per row of the same statement with no trigger",
                ratio=median([t / n for t, n in zip(mine, none, strict=True)]),
                ratio_label="x the statement's time",
                goal=Goal.at_most("<= 30 us", per_row, 30e-6)
                if capture.name in ("notify", "wal")
                else None,
                notes=(
                    f"statement {median(mine) * 1e3:.1f} ms vs {median(none) * 1e3:.1f} ms "
                    "without a trigger; cost = median over pairs of (with - without) / 1,000"
                ),
            )
        )
    return results
