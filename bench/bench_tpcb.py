"""pgbench's TPC-B-like load at full speed with three subscribed trees kept in sync
(issue 12, row 11).

Three throwaway databases are initialised alike with ``pgbench -i -s 1`` (1 branch, 10 tellers,
100,000 accounts; primary keys on all but ``pgbench_history``, which has none). In the first,
nothing else: the baseline. In the second, rowsync's triggers and nobody listening: what capture
alone costs the writers (context). In the third, a started RowSync in its default capture
watches every pgbench table it can: branches, tellers and accounts; ``pgbench_history`` is
refused (no primary key: the ``ConfigurationError`` is quoted in the notes) and stays
unwatched, like the load's insert into it. Three trees are loaded and subscribed - every branch,
every teller and the accounts 1 to 10,000 (a tenth of them) - and each is held by a consumer
thread that applies every message with ``rs.sync`` as soon as it gets it, as an application
would (and calls ``rs.resync`` on a ``Resync``).

Each round runs ``pgbench -b tpcb-like -c 8 -j 2 -M prepared -T <s>`` (20 s, 5 s with --quick)
on each database in turn, the order rotated from round to round (pgbench vacuums branches and
tellers and empties history before each run). Every transaction updates one account, one
teller and the branch (3 changes rowsync delivers) and inserts one history row. During the
rowsync runs: changes dispatched by rowsync a second (until the last one is dispatched), the
CPU this process used (listener and consumers), each consumer's messages (and the time of
each ``rs.sync``: updates of a root list's own rows, here all of them), overflows
(``sub.overflows``: its queue, 10,000 by default, filled up and was replaced by a Resync) and
the most messages it saw queued (its lag). After the load stops: ``rs.flush()``, the consumers
empty their queues, and each tree is compared with a fresh query (primary keys and balances).

Figures: TPS with rowsync / TPS without any trigger (same round), median over rounds;
overflows and lag over every round (the goal: none).
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from harness import Context, Goal, Result, fmt, median, percentile
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import rowsync

logger = logging.getLogger(__name__)

ROW = 11
"""This benchmark's row in issue 12's table."""

SCALE = 1
CLIENTS = 8
JOBS = 2
ACCOUNTS_SLICE = 10_000
IDLE = 0.05
"""Seconds a consumer finds its queue empty before it counts as idle."""

_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_DONE = re.compile(r"^number of transactions actually processed: ([0-9]+)", re.MULTILINE)


class Base(DeclarativeBase):
    pass


class Branch(Base):
    __tablename__ = "pgbench_branches"
    bid: Mapped[int] = mapped_column(primary_key=True)
    bbalance: Mapped[int]
    filler: Mapped[str | None]


class Teller(Base):
    __tablename__ = "pgbench_tellers"
    tid: Mapped[int] = mapped_column(primary_key=True)
    bid: Mapped[int]
    tbalance: Mapped[int]
    filler: Mapped[str | None]


class Account(Base):
    __tablename__ = "pgbench_accounts"
    aid: Mapped[int] = mapped_column(primary_key=True)
    bid: Mapped[int]
    abalance: Mapped[int]
    filler: Mapped[str | None]


history = sa.Table(
    "pgbench_history",
    Base.metadata,
    sa.Column("tid", sa.Integer),
    sa.Column("bid", sa.Integer),
    sa.Column("aid", sa.Integer),
    sa.Column("delta", sa.Integer),
    sa.Column("mtime", sa.DateTime),
    sa.Column("filler", sa.String),
)


class History(Base):
    """What an application maps for a table without a primary key: the ORM is told one."""

    __table__ = history
    __mapper_args__ = {"primary_key": [history.c.tid, history.c.aid, history.c.mtime]}


TREES: dict[str, tuple[Callable[[], sa.Select[Any]], Callable[[Any], tuple[Any, ...]]]] = {
    "branches": (
        lambda: sa.select(Branch).order_by(Branch.bid),
        lambda b: (b.bid, b.bbalance),
    ),
    "tellers": (
        lambda: sa.select(Teller).order_by(Teller.tid),
        lambda t: (t.tid, t.bid, t.tbalance),
    ),
    f"accounts 1-{ACCOUNTS_SLICE:,}": (
        lambda: sa.select(Account).where(Account.aid <= ACCOUNTS_SLICE).order_by(Account.aid),
        lambda a: (a.aid, a.bid, a.abalance),
    ),
}
"""Each tree's query and what of each object is compared with a fresh query."""


def pgbench(url: str, seconds: int) -> tuple[float, int]:
    """TPS and transactions of one run of the built-in TPC-B-like script."""
    out = subprocess.run(
        [
            "pgbench",
            "-b",
            "tpcb-like",
            "-c",
            str(CLIENTS),
            "-j",
            str(JOBS),
            "-M",
            "prepared",
            "-T",
            str(seconds),
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    tps, done = _TPS.search(out.stdout), _DONE.search(out.stdout)
    if tps is None or done is None:
        raise RuntimeError(f"no tps in pgbench output:\n{out.stdout}\n{out.stderr}")
    return float(tps.group(1)), int(done.group(1))


def initialise(url: str) -> None:
    subprocess.run(
        ["pgbench", "-i", "-q", "-s", str(SCALE), url],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )


class Consumer(threading.Thread):
    """One tree, kept in sync with every message of its subscription as fast as it can."""

    def __init__(self, rs: rowsync.RowSync, name: str, tree: list[Any]) -> None:
        super().__init__(name=f"consumer {name}", daemon=True)
        self.rs = rs
        self.label = name
        self.tree = tree
        self.sub = rs.subscribe(tree)
        self.applied = 0
        self.resyncs = 0
        self.max_queued = 0
        self.busy_s = 0.0
        """Seconds spent applying messages."""
        self.syncs: list[float] = []
        """Seconds of each ``rs.sync``."""
        self.idle = threading.Event()
        """Set once the queue stayed empty for IDLE seconds."""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                try:
                    message = self.sub.get(IDLE)
                except TimeoutError:
                    if self.sub.closed:
                        return
                    self.idle.set()
                    continue
                self.idle.clear()
                self.max_queued = max(self.max_queued, len(self.sub) + 1)
                started = time.perf_counter()
                if message[0] is rowsync.Resync:
                    self.resyncs += 1
                    self.tree = self.rs.resync(self.tree)
                else:
                    self.tree = self.rs.sync(self.tree, message)
                    self.applied += 1
                    self.syncs.append(time.perf_counter() - started)
                self.busy_s += time.perf_counter() - started
        except BaseException as exc:  # reported by the benchmark, not lost in a thread
            self.error = exc
            logger.exception("%s failed", self.name)

    def caught_up(self, timeout: float) -> bool:
        """Wait until everything queued so far is applied (call after ``rs.flush()``)."""
        self.idle.clear()
        return self.idle.wait(timeout)


@dataclass
class _Samples:
    base_tps: list[float] = field(default_factory=list)
    capture_tps: list[float] = field(default_factory=list)
    """Triggers installed, nobody listening: what capture alone costs the writers."""
    tps: list[float] = field(default_factory=list)
    transactions: list[int] = field(default_factory=list)
    dispatched: list[int] = field(default_factory=list)
    delivery_s: list[float] = field(default_factory=list)
    """From the start of the load until its last change was dispatched."""
    catch_up_s: list[float] = field(default_factory=list)
    """From the end of the load until every consumer had applied everything."""
    cores: list[float] = field(default_factory=list)
    """CPU seconds of this process (listener, consumers) per second of load."""
    equal: list[bool] = field(default_factory=list)


CONFIGURATIONS = ("none", "capture", "rowsync")


def run(ctx: Context) -> list[Result]:
    rounds = ctx.rounds(2, 1)
    seconds = ctx.rounds(20, 5)
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(ctx.database(f"tpcb_{name}")) for name in CONFIGURATIONS}
        engines = {
            name: sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
            for name, url in urls.items()
        }
        try:
            for url in urls.values():
                initialise(url)
            return _run(urls, engines, rounds, seconds)
        finally:
            for engine in engines.values():
                engine.dispose()


def _rowsync(engine: sa.Engine) -> rowsync.RowSync:
    """A RowSync in its default capture over every pgbench table it accepts."""
    return rowsync.RowSync(
        engine, [w for model in (Branch, Teller, Account) for w in rowsync.watchers(model)]
    )


def _run(
    urls: dict[str, str], engines: dict[str, sa.Engine], rounds: int, seconds: int
) -> list[Result]:
    try:
        rowsync.watchers(History)
        refused = ""
    except rowsync.ConfigurationError as exc:
        refused = str(exc)
    _rowsync(engines["capture"]).install()
    rs = _rowsync(engines["rowsync"])
    rs.install()
    samples = _Samples()
    with rs:
        consumers = []
        for name, (query, _) in TREES.items():
            with Session(rs.engine, expire_on_commit=False) as session:
                tree = list(session.scalars(query()))
            consumers.append(Consumer(rs, name, tree))
        for consumer in consumers:
            consumer.start()
        try:
            for r in range(rounds):
                shift = r % len(CONFIGURATIONS)
                for which in CONFIGURATIONS[shift:] + CONFIGURATIONS[:shift]:
                    if which == "rowsync":
                        _loaded_round(rs, urls[which], consumers, seconds, samples)
                        logger.info(
                            "round %d rowsync: %.0f tps, %d changes dispatched, trees equal: %s",
                            r,
                            samples.tps[-1],
                            samples.dispatched[-1],
                            samples.equal[-1],
                        )
                        continue
                    into = samples.base_tps if which == "none" else samples.capture_tps
                    into.append(pgbench(urls[which], seconds)[0])
                    logger.info("round %d %s: %.0f tps", r, which, into[-1])
        finally:
            for consumer in consumers:
                consumer.sub.close()
            for consumer in consumers:
                consumer.join(10)
    return _results(samples, consumers, refused, rounds, seconds)


def _loaded_round(
    rs: rowsync.RowSync, url: str, consumers: list[Consumer], seconds: int, samples: _Samples
) -> None:
    before = rs.stats["dispatched"]
    cpu = time.process_time()
    started = time.perf_counter()
    tps, transactions = pgbench(url, seconds)
    ended = time.perf_counter()
    rs.flush(300)
    dispatched = time.perf_counter()
    caught_up = all(c.caught_up(300) for c in consumers)
    samples.cores.append((time.process_time() - cpu) / (time.perf_counter() - started))
    samples.tps.append(tps)
    samples.transactions.append(transactions)
    samples.dispatched.append(rs.stats["dispatched"] - before)
    samples.delivery_s.append(dispatched - started)
    samples.catch_up_s.append(time.perf_counter() - ended)
    samples.equal.append(caught_up and all(_same_as_fresh_query(rs, c) for c in consumers))


def _same_as_fresh_query(rs: rowsync.RowSync, consumer: Consumer) -> bool:
    query, shape = TREES[consumer.label]
    with Session(rs.engine) as session:
        fresh = [shape(o) for o in session.scalars(query())]
    return [shape(o) for o in consumer.tree] == fresh


def _results(
    samples: _Samples, consumers: list[Consumer], refused: str, rounds: int, seconds: int
) -> list[Result]:
    def ratio(tps: list[float]) -> float:
        return median([t / b for t, b in zip(tps, samples.base_tps, strict=True)])

    how = (
        f"pgbench -b tpcb-like -s {SCALE} -c {CLIENTS} -j {JOBS} -M prepared -T {seconds}; "
        f"{rounds} rounds, the three twin databases in rotated order"
    )
    history = (
        f"pgbench_history not watched: rowsync.watchers refuses it ({refused})"
        if refused
        else "pgbench_history watched too"
    )
    delivered = sum(samples.dispatched) / sum(samples.delivery_s)
    expected = 3 * sum(samples.transactions)
    overflows = sum(c.sub.overflows for c in consumers)
    errors = [f"{c.label}: {c.error!r}" for c in consumers if c.error is not None]
    results = [
        Result(
            "tpcb",
            "TPS with rowsync, 3 trees in sync",
            median(samples.tps),
            unit="tps",
            baseline=median(samples.base_tps),
            baseline_label="the same pgbench run on a twin database without any trigger",
            ratio=ratio(samples.tps),
            notes=(
                f"ratio: median over rounds of TPS with / without, same round; {how}; this "
                f"process (listener, consumers) kept {median(samples.cores):.2f} cores busy"
            ),
        ),
        Result(
            "tpcb",
            "TPS with rowsync's triggers, nobody listening (context)",
            median(samples.capture_tps),
            unit="tps",
            baseline=median(samples.base_tps),
            baseline_label="the same pgbench run on a twin database without any trigger",
            ratio=ratio(samples.capture_tps),
            notes="a third twin database: what capture alone costs the writers",
        ),
        Result(
            "tpcb",
            "changes delivered a second",
            delivered,
            unit="/s",
            notes=(
                f"{sum(samples.dispatched):,} changes dispatched ({expected:,} expected: 3 per "
                "transaction), from the start of the load until the last was dispatched; "
                f"{history}"
            ),
        ),
    ]
    for c in consumers:
        p50, p99 = (percentile(c.syncs or [0.0], q) for q in (50, 99))
        results.append(
            Result(
                "tpcb",
                f"{c.label} ({len(c.tree):,} objects): overflows",
                c.sub.overflows,
                unit="count",
                goal=Goal.at_most("0 (load sustained)", c.sub.overflows, 0, "count"),
                notes=(
                    f"{c.applied:,} messages applied with rs.sync (p50 {fmt(p50, 's')}, "
                    f"p99 {fmt(p99, 's')}), {c.resyncs} Resyncs; busy applying "
                    f"{c.busy_s / sum(samples.delivery_s):.1%} of the loaded time"
                ),
            )
        )
        results.append(
            Result(
                "tpcb",
                f"{c.label}: max lag (messages queued)",
                c.max_queued,
                unit="count",
                notes=f"the most messages the consumer found queued, of {c.sub.maxsize:,}",
            )
        )
    wrong = sum(not same for same in samples.equal)
    results.append(
        Result(
            "tpcb",
            "rounds whose trees differ from a fresh query",
            wrong,
            unit="count",
            goal=Goal.at_most("0", wrong, 0, "count"),
            notes=(
                f"after the load stopped, rs.flush() and every queue applied; consumers caught up "
                f"{median(samples.catch_up_s):.2f} s after the load ended (median); "
                f"{overflows} overflows in all"
                + (f"; consumer errors: {'; '.join(errors)}" if errors else "")
            ),
        )
    )
    return results
