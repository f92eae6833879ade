"""``capture="wal"``: what decoding the WAL costs the writers and how fast it delivers (issue 14).

The WAL needs a ``wal_level = logical`` server, which the shared one need not be: this
benchmark uses ``WAL_DATABASE_URL`` when set, else the throwaway cluster the tests use
(port 54332, ``/tmp/rowsync-pg-wal``), which ``scripts/ensure-postgres.sh`` starts (or
creates) when it is not running. Every part runs in a throwaway database of its own there, and
measures each figure against a baseline of the same run, configurations taking turns within
each round (order rotated from round to round):

* **writes**: ``pgbench -n -c 8 -j 2 -M prepared`` with the single-row UPDATE of row 3
  (``bench_writes.py``) on a posts table of 10,000 rows: no capture (baseline), rowsync's
  default triggers with nobody listening (context, as in row 3), and ``capture="wal"`` started,
  a subscriber to ``Post`` taking every message while the load runs (posts get REPLICA IDENTITY
  FULL: a post's ``person_id`` identifies the tree it belongs to); context: the same table
  read by a bare decoding loop (:class:`BareLoop`, no rowsync), the floor of a Python client.
* **tpcb**: ``pgbench -b tpcb-like`` on a database initialised by ``pgbench -i -s 1``: nothing
  decoding (baseline) and ``capture="wal"`` watching branches, tellers and accounts (as row 11
  does) with a subscriber per table taking every message, on the same tables; rowsync's
  triggers on a twin database, nobody listening (context).
* **drain**: a backlog of 100,000 changes (100 transactions of 1,000-row updates) committed
  while the WAL thread is held inside a gate (the authorizer of a subscription to ``Person``
  blocks, as in row 2): the temporary slot holds the backlog. The clock runs from the gate
  opening until one subscriber to ``Post`` has taken every change. Baseline: a bare loop on a
  replication connection of its own, its slot created before the same backlog, reading and
  ``pgoutput.decode``-ing every message until the last update.
* **latency**: row 1's measurement (``bench_latency.py``) with ``capture="wal"``: commit ->
  subscriber at 200 / 1,000 / 2,000 changes a second, against a minimal ``LISTEN`` loop.
* **bulk**: row 4's measurement (``bench_bulk.py``): 1,000-row UPDATE statements, no capture
  against rowsync's triggers and against ``capture="wal"``, the latter decoding (a subscriber
  taking every message) for the whole measurement.
* **identity**: REPLICA IDENTITY DEFAULT against FULL on the same table (posts, a 200-byte
  body): WAL bytes per updated row of one 1,000-row UPDATE, read from ``pg_walinspect``'s
  records of that transaction alone (the cluster is shared: a diff of
  ``pg_current_wal_lsn()`` would count other sessions' WAL too), and pgbench's single-row
  TPS, nothing decoding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import bench_bulk
import bench_drain
import bench_latency
import bench_tpcb
import bench_writes
import psycopg
import sqlalchemy as sa
from captures import NONE, Capture, setup, vacuum
from harness import HERE, Context, Goal, Result, median
from psycopg import sql

import rowsync
from models import populate, schema
from rowsync import pgoutput
from rowsync.messages import Sync

logger = logging.getLogger(__name__)

ROW = 12
"""This benchmark's row in the benchmarks table (issue 14's figures)."""

LOGICAL_DIRECTORY = os.environ.get("ROWSYNC_WAL_PG_DIR", "/tmp/rowsync-pg-wal")
LOGICAL_PORT = os.environ.get("ROWSYNC_WAL_PG_PORT", "54332")
WRITES_ROWS = 10_000
STATEMENT_ROWS = 1000


def logical_server() -> str:
    """The DSN of a ``wal_level = logical`` server: ``WAL_DATABASE_URL``, or the tests'
    throwaway cluster, started if need be."""
    dsn = os.environ.get("WAL_DATABASE_URL")
    if not dsn:
        if shutil.which("pg_config") is None:
            raise RuntimeError("pg_config is missing: scripts/ensure-postgres.sh installs it")
        env = dict(
            os.environ,
            ROWSYNC_PG_THROWAWAY="1",
            ROWSYNC_PG_DIR=LOGICAL_DIRECTORY,
            ROWSYNC_PG_PORT=LOGICAL_PORT,
        )
        for name in ("ROWSYNC_TEST_DSN", "DATABASE_URL"):
            env.pop(name, None)
        out = subprocess.run(
            [str(HERE.parent / "scripts" / "ensure-postgres.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0:
            raise RuntimeError(f"could not start a wal_level=logical server:\n{out.stderr}")
        dsn = out.stdout.strip()
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW wal_level").fetchone()
    if row is None or row[0] != "logical":
        raise RuntimeError(f"{dsn} runs with wal_level={row}, not logical")
    return dsn


class Drain:
    """Subscribers that take every message as it arrives and do nothing with it: what the
    writers pay for rowsync decoding and delivering, not for an application's work."""

    def __init__(self, rs: rowsync.RowSync, targets: Sequence[Any]) -> None:
        self.subs = [rs.subscribe(t, maxsize=1_000_000) for t in targets]
        self.taken = 0
        self.resyncs = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._take, args=(s,)) for s in self.subs]
        for thread in self._threads:
            thread.start()

    def _take(self, sub: Any) -> None:
        while True:
            try:
                message = sub.get(0.5)
            except TimeoutError:
                if sub.closed:
                    return
                continue
            with self._lock:
                if message[0] is Sync:
                    self.taken += 1
                else:
                    self.resyncs += 1

    def close(self) -> None:
        for sub in self.subs:
            sub.close()
        for thread in self._threads:
            thread.join(10)


@contextlib.contextmanager
def decoding(rs: rowsync.RowSync, targets: Sequence[Any]) -> Iterator[Drain]:
    """``rs`` started, with a :class:`Drain` of ``targets``; flushed before it stops."""
    with rs:
        drain = Drain(rs, targets)
        try:
            yield drain
            rs.flush(300)
        finally:
            drain.close()


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))


def _ratios(values: list[float], bases: list[float]) -> float:
    return median([v / b for v, b in zip(values, bases, strict=True)])


def _rotated(items: Sequence[Any], r: int) -> list[Any]:
    shift = r % len(items)
    return [*items[shift:], *items[:shift]]


# -- writes --------------------------------------------------------------------------


def _writes(ctx: Context) -> list[Result]:
    rounds, seconds = ctx.rounds(4, 1), ctx.rounds(5, 2)  # 4: each configuration in each place
    with ctx.database("wal_writes") as url, tempfile.TemporaryDirectory() as tmp:
        engine = _engine(url)
        try:
            captures = setup(
                engine, WRITES_ROWS // 10, 10, baselines=(NONE,), rowsync_modes=("notify", "wal")
            )
            scripts = {
                c.name: bench_writes.update_script(Path(tmp), c.schema.posts.name) for c in captures
            }
            wal = next(c for c in captures if c.name == "wal")
            names = [NONE, "notify", "bare", "wal"]
            tps: dict[str, list[float]] = {name: [] for name in names}
            cores: dict[str, list[float]] = {"bare": [], "wal": []}
            taken: list[int] = []
            resyncs = 0
            for r in range(rounds):
                vacuum(engine, captures)
                for name in _rotated(names, r):
                    script = scripts["wal" if name == "bare" else name]
                    cpu, wall = time.process_time(), time.perf_counter()
                    if name == "wal":
                        with decoding(wal.rowsync(engine), [wal.schema.post]) as drain:
                            tps[name].append(bench_writes.pgbench(url, script, seconds))
                        taken.append(drain.taken)
                        resyncs += drain.resyncs
                    elif name == "bare":
                        with bare_decoding(url, wal.channel):
                            tps[name].append(bench_writes.pgbench(url, script, seconds))
                    else:
                        tps[name].append(bench_writes.pgbench(url, script, seconds))
                    if name in cores:
                        used = (time.process_time() - cpu) / (time.perf_counter() - wall)
                        cores[name].append(used)
                    logger.info("round %d writes %s: %.0f tps", r, name, tps[name][-1])
        finally:
            engine.dispose()
    how = (
        f"pgbench -n -c {bench_writes.CLIENTS} -j {bench_writes.JOBS} -M prepared -T {seconds}, "
        f"single-row UPDATE of {WRITES_ROWS:,} rows, each configuration on its own copy; "
        f"{rounds} rounds, rotated order"
    )
    base = median(tps[NONE])
    label = "the same pgbench run on a table without capture, same round"
    return [
        Result(
            "wal",
            "writes: rowsync wal, decoding: TPS",
            median(tps["wal"]),
            unit="tps",
            baseline=base,
            baseline_label=label,
            ratio=_ratios(tps["wal"], tps[NONE]),
            goal=Goal.at_least(">= 0.90x", _ratios(tps["wal"], tps[NONE]), 0.90, "x"),
            notes=(
                f"{how}; started RowSync, a subscriber to Post taking every message "
                f"({sum(taken):,} taken in all, after rs.flush(); {resyncs} Resyncs); posts "
                "REPLICA IDENTITY FULL; "
                f"this process used {median(cores['wal']):.2f} cores"
            ),
        ),
        Result(
            "wal",
            "writes: a bare decoding loop: TPS (context)",
            median(tps["bare"]),
            unit="tps",
            baseline=base,
            baseline_label=label,
            ratio=_ratios(tps["bare"], tps[NONE]),
            notes=(
                "the same table and publication as rowsync wal's, read by a BareLoop (no "
                f"rowsync): the floor of any Python WAL client; it used "
                f"{median(cores['bare']):.2f} cores"
            ),
        ),
        Result(
            "wal",
            "writes: rowsync notify, nobody listening: TPS (context)",
            median(tps["notify"]),
            unit="tps",
            baseline=base,
            baseline_label=label,
            ratio=_ratios(tps["notify"], tps[NONE]),
            notes="rowsync's default triggers on the same server, as row 3 measures them",
        ),
    ]


# -- tpcb ----------------------------------------------------------------------------


def _tpcb(ctx: Context) -> list[Result]:
    rounds, seconds = ctx.rounds(3, 1), ctx.rounds(10, 3)  # 3: each configuration in each place
    with ctx.database("wal_tpcb") as url, ctx.database("wal_tpcb_notify") as notify_url:
        engines = {url: _engine(url), notify_url: _engine(notify_url)}
        try:
            for u in engines:
                bench_tpcb.initialise(u)
            models = (bench_tpcb.Branch, bench_tpcb.Teller, bench_tpcb.Account)

            def watching(engine: sa.Engine, **options: Any) -> rowsync.RowSync:
                watchers = [w for m in models for w in rowsync.watchers(m)]
                return rowsync.RowSync(engine, watchers, **options)

            watching(engines[notify_url]).install()
            rs = watching(engines[url], capture="wal")
            rs.install()
            tps: dict[str, list[float]] = {"none": [], "notify": [], "wal": []}
            transactions, taken, resyncs = 0, 0, 0
            cores: list[float] = []
            for r in range(rounds):
                for which in _rotated(list(tps), r):
                    if which == "wal":
                        cpu, wall = time.process_time(), time.perf_counter()
                        with decoding(rs, models) as drain:
                            got, done = bench_tpcb.pgbench(url, seconds)
                        cores.append((time.process_time() - cpu) / (time.perf_counter() - wall))
                        taken += drain.taken
                        resyncs += drain.resyncs
                        transactions += done
                    else:
                        got, _ = bench_tpcb.pgbench(
                            notify_url if which == "notify" else url, seconds
                        )
                    tps[which].append(got)
                    logger.info("round %d tpcb %s: %.0f tps", r, which, got)
        finally:
            for engine in engines.values():
                engine.dispose()
    how = (
        f"pgbench -b tpcb-like -s {bench_tpcb.SCALE} -c {bench_tpcb.CLIENTS} "
        f"-j {bench_tpcb.JOBS} -M prepared -T {seconds}; {rounds} rounds, rotated order"
    )
    label = "the same pgbench run on the same tables, nothing decoding, same round"
    return [
        Result(
            "wal",
            "tpcb: rowsync wal, decoding: TPS",
            median(tps["wal"]),
            unit="tps",
            baseline=median(tps["none"]),
            baseline_label=label,
            ratio=_ratios(tps["wal"], tps["none"]),
            goal=Goal.at_least(">= 0.90x", _ratios(tps["wal"], tps["none"]), 0.90, "x"),
            notes=(
                f"{how}; branches, tellers and accounts watched (REPLICA IDENTITY DEFAULT), a "
                f"subscriber per table taking every message: {taken:,} taken ({resyncs} "
                f"Resyncs) for {transactions:,} transactions ({3 * transactions:,} changes); "
                f"this process used {median(cores):.2f} cores"
            ),
        ),
        Result(
            "wal",
            "tpcb: rowsync notify, nobody listening: TPS (context)",
            median(tps["notify"]),
            unit="tps",
            baseline=median(tps["none"]),
            baseline_label=label,
            ratio=_ratios(tps["notify"], tps["none"]),
            notes="rowsync's default triggers on a twin database (row 11's context figure)",
        ),
    ]


# -- drain ---------------------------------------------------------------------------


class BareLoop:
    """A replication connection of its own, its temporary slot created at once, reading and
    ``pgoutput.decode``-ing every message of ``publication``: the least any client of the
    WAL does (the server decodes; Python only parses what arrives)."""

    def __init__(self, url: str, publication: str) -> None:
        import psycopg2
        import psycopg2.extras

        self.conn = psycopg2.connect(
            url, connection_factory=psycopg2.extras.LogicalReplicationConnection
        )
        self.cursor = self.conn.cursor()
        slot = f"bench_{uuid.uuid4().hex[:12]}"  # [a-z0-9_]: an identifier as it is
        self.cursor.execute(f"CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput")
        self.cursor.start_replication(
            slot,
            decode=False,
            options={"proto_version": "1", "publication_names": publication},
        )
        self.updates = 0

    def read(self, done: Callable[[], bool], timeout: float = 300) -> None:
        """Read and decode until ``done()``; confirms each commit, as a client must for the
        server to free the WAL."""
        deadline = time.monotonic() + timeout
        while not done():
            message = self.cursor.read_message()
            if message is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the bare loop decoded {self.updates} updates")
                select.select([self.cursor], [], [], 0.1)
                continue
            decoded = pgoutput.decode(message.payload)
            if isinstance(decoded, pgoutput.Update):
                self.updates += 1
            elif isinstance(decoded, pgoutput.Commit):
                self.cursor.send_feedback(flush_lsn=decoded.end_lsn)

    def close(self) -> None:
        self.conn.close()


@contextlib.contextmanager
def bare_decoding(url: str, publication: str) -> Iterator[BareLoop]:
    """A :class:`BareLoop` reading in a thread of its own while the block runs."""
    loop = BareLoop(url, publication)
    stop = threading.Event()
    thread = threading.Thread(target=loop.read, args=(stop.is_set,))
    thread.start()
    try:
        yield loop
    finally:
        stop.set()
        thread.join(60)
        loop.close()


def _bare_drain(url: str, engine: sa.Engine, capture: Capture, changes: int) -> float:
    """Seconds a :class:`BareLoop` takes to read the backlog's messages."""
    loop = BareLoop(url, capture.channel)
    try:
        bench_drain.backlog(engine, capture, changes)
        start = time.perf_counter()
        loop.read(lambda: loop.updates >= changes)
        return time.perf_counter() - start
    finally:
        loop.close()


def _drain(ctx: Context) -> list[Result]:
    rounds, changes = ctx.rounds(3, 1), ctx.rounds(100_000, 20_000)
    with ctx.database("wal_drain") as url:
        engine = _engine(url)
        try:
            (capture,) = setup(
                engine,
                changes // bench_drain.POSTS_PER_PERSON,
                bench_drain.POSTS_PER_PERSON,
                baselines=(),
                rowsync_modes=("wal",),
            )
            times: dict[str, list[float]] = {"bare": [], "wal": []}
            queries: list[int] = []
            for r in range(rounds):
                vacuum(engine, [capture])
                for which in _rotated(list(times), r):
                    if which == "bare":
                        seconds = _bare_drain(url, engine, capture, changes)
                    else:
                        seconds, stats = bench_drain.drain_rowsync(engine, capture, changes)
                        queries.append(stats["row_queries"])
                    times[which].append(seconds)
                    logger.info(
                        "round %d drain %s: %d changes in %.2f s (%.0f/s)",
                        r,
                        which,
                        changes,
                        seconds,
                        changes / seconds,
                    )
        finally:
            engine.dispose()
    rate = median([changes / s for s in times["wal"]])
    return [
        Result(
            "wal",
            "drain: rowsync wal, changes/s",
            rate,
            unit="/s",
            baseline=median([changes / s for s in times["bare"]]),
            baseline_label=(
                "a bare loop on a replication connection: read and pgoutput.decode every "
                "message of the same backlog (same table, publication and replica identity)"
            ),
            ratio=_ratios(
                [changes / s for s in times["wal"]], [changes / s for s in times["bare"]]
            ),
            goal=Goal.at_least(">= 100,000/s", rate, 100_000, "/s"),
            notes=(
                f"{changes:,} changes (1,000-row UPDATEs) held in the slot while the WAL thread "
                "waits in a gate; from its opening until one subscriber to Post took the last; "
                f"{median(queries):.0f} row queries; {rounds} rounds"
            ),
        )
    ]


# -- latency and bulk: rows 1 and 4, with capture="wal" --------------------------------


def _relabel(results: list[Result], part: str) -> list[Result]:
    return [dataclasses.replace(r, name="wal", metric=f"{part}: {r.metric}") for r in results]


def _latency(ctx: Context) -> list[Result]:
    rounds, seconds = ctx.rounds(3, 1), ctx.rounds(2.0, 1.0)
    with ctx.database("wal_latency") as url:
        engine = _engine(url)
        try:
            found = bench_latency.measure(url, engine, rounds, seconds, rowsync_modes=("wal",))
        finally:
            engine.dispose()
    return _relabel(found, "latency")


def _bulk(ctx: Context) -> list[Result]:
    rounds, blocks = ctx.rounds(5, 1), ctx.rounds(10, 4)
    with ctx.database("wal_bulk") as url:
        engine = _engine(url)
        try:
            captures = setup(
                engine, WRITES_ROWS // 10, 10, baselines=(NONE,), rowsync_modes=("notify", "wal")
            )
            wal = next(c for c in captures if c.name == "wal")
            with decoding(wal.rowsync(engine), [wal.schema.post]):
                found = bench_bulk.measure(url, engine, captures, rounds, blocks)
        finally:
            engine.dispose()
    return _relabel(found, "bulk")


# -- REPLICA IDENTITY FULL -------------------------------------------------------------

_WAL_OF = """
SELECT count(*), coalesce(sum(record_length - fpi_length), 0), coalesce(sum(fpi_length), 0)
FROM pg_get_wal_records_info(%s, %s)
WHERE xid = %s::text::xid
"""
"""The WAL records one transaction wrote (heap, index, commit), their bytes without full-page
images, and the full-page images' bytes (those depend on when the last checkpoint was, not
on the row)."""


def _wal_per_row(conn: psycopg.Connection[Any], table: sa.Table, first: int) -> tuple[float, float]:
    """WAL bytes per row (without full-page images; then their bytes) of one transaction
    updating rows ``first`` .. ``first + 999``."""
    update = sql.SQL("UPDATE {} SET score = score + 1 WHERE id BETWEEN %s AND %s").format(
        sql.Identifier(table.name)
    )
    with conn.transaction():
        row = conn.execute(
            "SELECT pg_current_wal_insert_lsn(), pg_current_xact_id()::text::bigint % 4294967296"
        ).fetchone()
        assert row is not None
        start, xid = row
        conn.execute(update, (first, first + STATEMENT_ROWS - 1))
    end = conn.execute("SELECT pg_current_wal_flush_lsn()").fetchone()
    assert end is not None
    found = conn.execute(_WAL_OF, (start, end[0], str(xid))).fetchone()
    assert found is not None and found[0] > 0, f"no WAL record of transaction {xid}"
    return found[1] / STATEMENT_ROWS, found[2] / STATEMENT_ROWS


def _identity(ctx: Context) -> list[Result]:
    rounds, seconds = ctx.rounds(6, 1), ctx.rounds(4, 2)
    posts = schema("").posts
    with ctx.database("wal_identity") as url, tempfile.TemporaryDirectory() as tmp:
        engine = _engine(url)
        try:
            populate(engine, schema(""), WRITES_ROWS // 10, 10)
            script = bench_writes.update_script(Path(tmp), posts.name)
            per_row: dict[str, list[float]] = {"default": [], "full": []}
            fpi: dict[str, list[float]] = {"default": [], "full": []}
            tps: dict[str, list[float]] = {"default": [], "full": []}
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION pg_walinspect")
                for r in range(rounds):
                    for identity in _rotated(list(tps), r):
                        conn.execute(
                            sql.SQL("ALTER TABLE {} REPLICA IDENTITY {}").format(
                                sql.Identifier(posts.name), sql.SQL(identity.upper())
                            )
                        )
                        conn.execute(
                            sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(posts.name))
                        )
                        for block in range(3):
                            first = (r * 6 + block * 2 + (identity == "full")) * STATEMENT_ROWS
                            data, images = _wal_per_row(conn, posts, first % WRITES_ROWS + 1)
                            per_row[identity].append(data)
                            fpi[identity].append(images)
                        tps[identity].append(bench_writes.pgbench(url, script, seconds))
                        logger.info(
                            "round %d identity %s: %.0f WAL bytes per row, %.0f tps",
                            r,
                            identity,
                            per_row[identity][-1],
                            tps[identity][-1],
                        )
        finally:
            engine.dispose()
    return [
        Result(
            "wal",
            "identity: FULL, WAL bytes per updated row",
            median(per_row["full"]),
            unit="bytes",
            baseline=median(per_row["default"]),
            baseline_label="REPLICA IDENTITY DEFAULT (the primary key), same table, same round",
            ratio=_ratios(per_row["full"], per_row["default"]),
            notes=(
                f"WAL records of one 1,000-row UPDATE transaction (pg_walinspect), full-page "
                f"images left out (FULL {median(fpi['full']):.0f}, DEFAULT "
                f"{median(fpi['default']):.0f} bytes a row: they follow checkpoints); posts rows "
                f"carry a 200-byte body; {rounds} rounds x 3 statements"
            ),
        ),
        Result(
            "wal",
            "identity: FULL, TPS",
            median(tps["full"]),
            unit="tps",
            baseline=median(tps["default"]),
            baseline_label="REPLICA IDENTITY DEFAULT, same table, same round",
            ratio=_ratios(tps["full"], tps["default"]),
            notes=(
                f"pgbench -n -c {bench_writes.CLIENTS} -j {bench_writes.JOBS} -M prepared "
                f"-T {seconds}, single-row UPDATE, nothing decoding; {rounds} rounds"
            ),
        ),
    ]


_PARTS: tuple[Callable[[Context], list[Result]], ...] = (
    _writes,
    _tpcb,
    _drain,
    _latency,
    _bulk,
    _identity,
)


def run(ctx: Context) -> list[Result]:
    """Every part, or those ``BENCH_WAL_PARTS`` names (comma-separated: writes, tpcb, drain,
    latency, bulk, identity)."""
    parts = {part.__name__.strip("_"): part for part in _PARTS}
    wanted = [p for p in os.environ.get("BENCH_WAL_PARTS", "").split(",") if p] or list(parts)
    unknown = set(wanted) - set(parts)
    if unknown:
        raise ValueError(f"BENCH_WAL_PARTS: no part {sorted(unknown)}; have {list(parts)}")
    logical = dataclasses.replace(ctx, dsn=logical_server())
    results: list[Result] = []
    for name in wanted:
        logger.info("wal: %s", name)
        results += parts[name](logical)
    return results
