"""Which client reads the WAL for ``capture="wal"``: commit -> callback latency of each.

    python bench/wal_clients.py [DSN] [--rate 1000] [--count 2000] [--rounds 3]

DSN: a server with ``wal_level = logical`` (default: the throwaway cluster that
``ROWSYNC_PG_THROWAWAY=1 ROWSYNC_PG_DIR=/tmp/rowsync-pg-wal ROWSYNC_PG_PORT=54332
scripts/ensure-postgres.sh`` starts). A paced writer process (``bench/writer.py``) commits
single-row updates at ``--rate`` a second; this process records when each change reaches a
callback, through:

* baseline: a psycopg 3 ``LISTEN`` loop on a ``pg_notify(channel, NEW.id::text)`` trigger
  (what rowsync's default capture rides on);
* push: psycopg2's ``LogicalReplicationConnection``, ``pgoutput`` through a publication,
  messages decoded by :mod:`rowsync.pgoutput`, the callback run at each Commit;
* poll: psycopg 3 calling ``pg_logical_slot_get_binary_changes`` in a loop, sleeping
  ``--poll-ms`` when a call returns nothing.

Not part of ``make bench`` (it needs a logical server and psycopg2): run by hand. Prints the
median over rounds of each round's p50 / p99, and each one's ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import select
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import psycopg2
import psycopg2.extras
from psycopg import sql

from rowsync import pgoutput

HERE = Path(__file__).resolve().parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:54332/postgres"
ROWS = 200_000


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def setup(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS wal_bench, notify_bench")
        conn.execute("DROP PUBLICATION IF EXISTS wal_bench")
        for table in ("wal_bench", "notify_bench"):
            name = sql.Identifier(table)
            conn.execute(
                sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, score int NOT NULL)").format(name)
            )
            conn.execute(
                sql.SQL("INSERT INTO {} SELECT i, 0 FROM generate_series(1, %s) i").format(name),
                (ROWS,),
            )
        conn.execute(
            "CREATE OR REPLACE FUNCTION notify_bench() RETURNS trigger LANGUAGE plpgsql AS"
            " $$BEGIN PERFORM pg_notify('notify_bench', NEW.id::text); RETURN NULL; END$$"
        )
        conn.execute(
            "CREATE TRIGGER notify_bench AFTER UPDATE ON notify_bench"
            " FOR EACH ROW EXECUTE FUNCTION notify_bench()"
        )
        conn.execute("CREATE PUBLICATION wal_bench FOR TABLE wal_bench")


Received = dict[int, int]
"""Row id -> monotonic ns its change reached the callback."""


def run_writer(dsn: str, table: str, first: int, count: int, rate: float) -> dict[int, int]:
    out = subprocess.run(
        [sys.executable, str(HERE / "writer.py"), dsn, table, str(first), str(count), str(rate)],
        capture_output=True,
        text=True,
        check=True,
    )
    return {key: ts for key, ts in json.loads(out.stdout)["commits"]}


def listen(dsn: str, received: Received, ready: threading.Event, done: threading.Event) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("LISTEN notify_bench")
        ready.set()
        while not done.is_set():
            for note in conn.notifies(timeout=0.2):
                received[int(note.payload)] = now_ns()


def push(dsn: str, received: Received, ready: threading.Event, done: threading.Event) -> None:
    conn = psycopg2.connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        cur = conn.cursor()
        cur.execute("CREATE_REPLICATION_SLOT wal_bench_push TEMPORARY LOGICAL pgoutput")
        cur.start_replication(
            "wal_bench_push",
            decode=False,
            options={"proto_version": "1", "publication_names": "wal_bench"},
        )
        ready.set()
        pending: list[int] = []
        while not done.is_set():
            msg = cur.read_message()
            if msg is None:
                select.select([cur], [], [], 0.2)
                continue
            if _stamp(msg.payload, pending, received):
                cur.send_feedback(flush_lsn=msg.data_start)
    finally:
        conn.close()


def _stamp(payload: bytes, pending: list[int], received: Received) -> bool:
    """Note the key an Update carries; at its Commit, stamp the transaction's keys as received
    now. Returns whether ``payload`` was a Commit (the push client then confirms it)."""
    decoded = pgoutput.decode(payload)
    if isinstance(decoded, pgoutput.Update):
        value = decoded.new[0]
        assert isinstance(value, bytes)
        pending.append(int(value))
        return False
    if not isinstance(decoded, pgoutput.Commit):
        return False
    stamp = now_ns()
    for key in pending:
        received[key] = stamp
    pending.clear()
    return True


def poll(poll_ms: float) -> Callable[[str, Received, threading.Event, threading.Event], None]:
    def run(dsn: str, received: Received, ready: threading.Event, done: threading.Event) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_create_logical_replication_slot('wal_bench_poll', 'pgoutput', true)"
            )
            query = (
                "SELECT data FROM pg_logical_slot_get_binary_changes('wal_bench_poll', NULL,"
                " NULL, 'proto_version', '1', 'publication_names', 'wal_bench')"
            )
            ready.set()
            pending: list[int] = []
            while not done.is_set():
                rows = conn.execute(query, prepare=True).fetchall()
                for (data,) in rows:
                    _stamp(bytes(data), pending, received)
                if not rows:
                    time.sleep(poll_ms / 1000)

    return run


def measure(
    dsn: str,
    table: str,
    receiver: Callable[[str, Received, threading.Event, threading.Event], None],
    first: int,
    count: int,
    rate: float,
) -> tuple[float, float, int]:
    """p50, p99 (ms) and the number of changes never received."""
    received: Received = {}
    ready, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=receiver, args=(dsn, received, ready, done))
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("receiver did not start")
    commits = run_writer(dsn, table, first, count, rate)
    deadline = time.monotonic() + 10
    while len(received) < len(commits) and time.monotonic() < deadline:
        time.sleep(0.05)
    done.set()
    thread.join()
    latencies = sorted((received[k] - t) / 1e6 for k, t in commits.items() if k in received)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return statistics.median(latencies), p99, len(commits) - len(latencies)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn", nargs="?", default=DEFAULT_DSN)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--poll-ms", type=float, default=1.0)
    args = parser.parse_args()
    with psycopg.connect(args.dsn) as conn:
        level = conn.execute("SHOW wal_level").fetchone()
    if level is None or level[0] != "logical":
        print(f"{args.dsn}: wal_level is {level}, not logical", file=sys.stderr)
        return 1
    setup(args.dsn)
    configs: dict[str, tuple[str, Callable[..., None]]] = {
        "baseline: LISTEN/NOTIFY (psycopg 3)": ("notify_bench", listen),
        "push: psycopg2 LogicalReplicationConnection": ("wal_bench", push),
        f"poll: pg_logical_slot_get_binary_changes, {args.poll_ms:g} ms sleep": (
            "wal_bench",
            poll(args.poll_ms),
        ),
    }
    figures: dict[str, list[tuple[float, float, int]]] = {name: [] for name in configs}
    names = list(configs)
    first = 1
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            table, receiver = configs[name]
            figures[name].append(measure(args.dsn, table, receiver, first, args.count, args.rate))
            first += args.count
    base = names[0]
    base50 = statistics.median(f[0] for f in figures[base])
    base99 = statistics.median(f[1] for f in figures[base])
    print(f"{args.count} single-row commits at {args.rate:g}/s, median of {args.rounds} rounds")
    print(f"{'client':58} {'p50 ms':>8} {'p99 ms':>8} {'x base p50':>10} {'x base p99':>10} lost")
    for name in names:
        p50 = statistics.median(f[0] for f in figures[name])
        p99 = statistics.median(f[1] for f in figures[name])
        lost = sum(f[2] for f in figures[name])
        print(f"{name:58} {p50:8.2f} {p99:8.2f} {p50 / base50:10.2f} {p99 / base99:10.2f} {lost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
