"""What every benchmark shares: the :class:`Context` it runs in, the :class:`Result` rows it
returns, throwaway databases, and statistics.

Every figure is measured against a baseline taken in the same run, interleaved with it
round by round, and summarised by the median over rounds: the machine is small and noisy,
so absolute numbers move between runs while ratios measured side by side hold still.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa
from psycopg import sql

logger = logging.getLogger(__name__)

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
HERE = Path(__file__).resolve().parent
T = TypeVar("T")


@dataclass(frozen=True)
class Goal:
    """A goal of issue 6 and whether a figure meets it (and by how much it misses)."""

    text: str
    met: bool
    missed_by: str = ""

    @classmethod
    def at_most(cls, text: str, value: float, limit: float, unit: str = "s") -> Goal:
        return cls(text, value <= limit, "" if value <= limit else fmt(value - limit, unit))

    @classmethod
    def at_least(cls, text: str, value: float, limit: float, unit: str = "s") -> Goal:
        return cls(text, value >= limit, "" if value >= limit else fmt(limit - value, unit))

    def verdict(self) -> str:
        return "met" if self.met else f"missed by {self.missed_by}"


@dataclass(frozen=True)
class Result:
    """One row of the table: a measured figure, its same-run baseline and its goal.

    ``value`` and ``baseline`` are in ``unit`` (seconds for times, so the table can pick a
    readable scale); ``ratio`` is ``value / baseline`` unless the benchmark says otherwise
    (e.g. "x cheaper"), with its meaning in ``ratio_label``.
    """

    name: str
    metric: str
    value: float
    unit: str = "s"
    baseline: float | None = None
    baseline_label: str | None = None
    ratio: float | None = None
    ratio_label: str = "x"
    goal: Goal | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What ``run(ctx)`` gets: the server to use and how long it may take."""

    dsn: str
    quick: bool = False
    profile: bool = False
    out: Path = HERE

    def rounds(self, default: T, quick: T) -> T:
        """``default``, or ``quick`` with --quick (rounds, sample counts, time budgets)."""
        return quick if self.quick else default

    @contextlib.contextmanager
    def database(self, name: str) -> Iterator[str]:
        """A throwaway database ``bench_<name>_<pid>`` on the server, dropped afterwards.

        Yields its URL."""
        dbname = f"bench_{name}_{os.getpid()}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        try:
            yield _with_dbname(self.dsn, dbname)
        finally:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                _release_slots(conn, dbname)
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(dbname)
                    )
                )


def _release_slots(conn: psycopg.Connection[Any], dbname: str) -> None:
    """Wait until no replication slot of ``dbname`` is active (``capture="wal"``'s temporary
    slots): an active slot keeps even ``DROP DATABASE ... WITH (FORCE)`` out, and the server
    drops a temporary one a moment after its connection closed."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots"
            " WHERE database = %s AND active_pid IS NOT NULL",
            (dbname,),
        ).fetchone()
        if row == (0,):
            return
        time.sleep(0.05)


def _with_dbname(dsn: str, dbname: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(dsn).set(database=dbname).render_as_string(hide_password=False)


# -- statistics ------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """``q`` in [0, 100], linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of nothing")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes (wall clock, ``perf_counter``)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds over ``repeat`` calls."""
    return median([timed(fn) for _ in range(repeat)])


def write_profile(ctx: Context, name: str, profiler: Any, limit: int = 30) -> Path:
    """Write a cProfile's hot spots (by own time, then cumulative) to bench/profiles/<name>.txt."""
    import io
    import pstats

    out = ctx.out / "profiles"
    out.mkdir(exist_ok=True)
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    path = out / f"{name}.txt"
    path.write_text(buffer.getvalue())
    logger.info("profile written to %s", path)
    return path


# -- formatting ------------------------------------------------------------------------


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        magnitude = abs(value)
        if magnitude >= 1:
            return f"{value:.3f} s"
        if magnitude >= 1e-3:
            return f"{value * 1e3:.2f} ms"
        return f"{value * 1e6:.1f} us"
    if unit in ("", "count"):
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
    if unit == "x":
        return f"{value:,.2f}x"
    if unit == "/s":
        return f"{value:,.0f}/s"
    return f"{value:,.2f} {unit}"


class Queries:
    """Counts the statements an engine sends, to show what the code under test asked the
    database (for ``sync``: nothing, the rows being in the listener's cache)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.count = 0
        sa.event.listen(engine, "before_cursor_execute", self._hit)

    def _hit(self, *args: Any) -> None:
        self.count += 1
