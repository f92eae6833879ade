"""Write overhead: pgbench single-row UPDATEs from 8 clients, with and without capture
(issue 6, row 3).

Each configuration of ``captures.py`` has its own copy of the posts table (10,000 rows): no
trigger, the hand-written ``pg_notify(id)`` trigger, and rowsync's capture in each mode this
``RowSync`` accepts. Every round runs ``pgbench -n -c 8 -j 2 -M prepared -T <s>`` on each in
turn (order rotated from round to round; VACUUM ANALYZE before each round) with the script

    \\set id random(1, 10000)
    UPDATE posts_N SET score = score + 1 WHERE id = :id;

Nobody listens: this is what capture costs the writers (NOTIFY takes a cluster-wide lock at
commit whether anyone listens or not). Figures: TPS(configuration) / TPS(no trigger) of the
same round, median over rounds; the baseline is the same ratio for the hand-written trigger.
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
from pathlib import Path

import sqlalchemy as sa
from captures import LOG_INSERT, MINIMAL, NONE, Capture, setup, vacuum
from harness import Context, Goal, Result, median
from psycopg import sql

logger = logging.getLogger(__name__)

ROW = 3
"""This benchmark's row in issue 6's table."""

ROWS = 10_000
CLIENTS = 8
JOBS = 2
_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)


def pgbench(url: str, script: Path, seconds: int) -> float:
    """Transactions a second of one pgbench run."""
    out = subprocess.run(
        [
            "pgbench",
            "-n",
            "-c",
            str(CLIENTS),
            "-j",
            str(JOBS),
            "-M",
            "prepared",
            "-T",
            str(seconds),
            "-f",
            str(script),
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    found = _TPS.search(out.stdout)
    if found is None:
        raise RuntimeError(f"no tps in pgbench output:\n{out.stdout}\n{out.stderr}")
    return float(found.group(1))


def update_script(tmp: Path, table: str, rows: int = ROWS) -> Path:
    """A pgbench script updating one random row of ``table`` (ids 1 to ``rows``)."""
    script = tmp / f"{table}.sql"
    update = sql.SQL("UPDATE {} SET score = score + 1 WHERE id = :id;").format(
        sql.Identifier(table)
    )
    script.write_text(f"\\set id random(1, {rows})\n{update.as_string()}\n")
    return script


def run(ctx: Context) -> list[Result]:
    rounds = ctx.rounds(3, 1)
    seconds = ctx.rounds(5, 2)
    with ctx.database("writes") as url, tempfile.TemporaryDirectory() as tmp:
        engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
        try:
            return _run(url, engine, Path(tmp), rounds, seconds)
        finally:
            engine.dispose()


def _run(url: str, engine: sa.Engine, tmp: Path, rounds: int, seconds: int) -> list[Result]:
    captures = setup(engine, ROWS // 10, 10, baselines=(NONE, MINIMAL, LOG_INSERT))
    scripts = {c.name: update_script(tmp, c.schema.posts.name) for c in captures}
    tps: dict[str, list[float]] = {c.name: [] for c in captures}
    for r in range(rounds):
        vacuum(engine, captures)
        shift = r % len(captures)
        for capture in captures[shift:] + captures[:shift]:
            tps[capture.name].append(pgbench(url, scripts[capture.name], seconds))
            logger.info("round %d %s: %.0f tps", r, capture.label, tps[capture.name][-1])
    return _results(captures, tps, rounds, seconds)


def _results(
    captures: list[Capture], tps: dict[str, list[float]], rounds: int, seconds: int
) -> list[Result]:
    def ratios(name: str) -> list[float]:
        return [t / n for t, n in zip(tps[name], tps[NONE], strict=True)]

    minimal = next(c for c in captures if c.name == MINIMAL)
    base = median(ratios(minimal.name))
    how = (
        f"pgbench -c {CLIENTS} -j {JOBS} -M prepared -T {seconds}, single-row UPDATE of "
        f"{ROWS:,} rows, nobody listening; {rounds} rounds, configurations in rotated order"
    )
    results = [
        Result(
            "writes",
            "no trigger, TPS (context)",
            median(tps[NONE]),
            unit="tps",
            notes=how,
        ),
        Result(
            "writes",
            f"{minimal.label} trigger: TPS ratio (baseline)",
            base,
            unit="x",
            notes=f"TPS {median(tps[minimal.name]):,.0f}; ratio to no trigger, same round",
        ),
    ]
    results.append(
        Result(
            "writes",
            f"{LOG_INSERT} trigger: TPS ratio (context)",
            median(ratios(LOG_INSERT)),
            unit="x",
            notes=(
                f"TPS {median(tps[LOG_INSERT]):,.0f}; a trigger appending the id to a bare "
                "table: the least any per-row change-log capture costs"
            ),
        )
    )
    for capture in captures:
        if capture.options is None:
            continue
        mine = ratios(capture.name)
        value = median(mine)
        per_round = median([m / b for m, b in zip(mine, ratios(minimal.name), strict=True)])
        goal = None
        if capture.name == "notify":
            goal = Goal.at_least(f">= {minimal.label}'s ratio", value, base, "x")
        elif capture.name == "stream":
            goal = Goal.at_least(">= 0.90", value, 0.90, "x")
        results.append(
            Result(
                "writes",
                f"{capture.label}: TPS ratio to no trigger",
                value,
                unit="x",
                baseline=base,
                baseline_label=(
                    f"TPS ratio of the hand-written {minimal.label} trigger to no trigger, "
                    "same rounds"
                ),
                ratio=per_round,
                ratio_label="x of baseline",
                goal=goal,
                notes=f"TPS {median(tps[capture.name]):,.0f}; {how}",
            )
        )
    return results
