"""A paced writer, run as a process of its own by the latency benchmark (row 1).

    python bench/writer.py DSN TABLE FIRST_ID COUNT RATE [--connections N]

Commits ``COUNT`` single-row updates (``UPDATE table SET score = score + 1 WHERE id = :id``,
ids ``FIRST_ID`` .. ``FIRST_ID + COUNT - 1``, one transaction each) at ``RATE`` a second,
following a clock: update ``k`` is due at ``start + k / RATE`` (a late one goes at once, it is
not skipped). ``N`` connections share the schedule, so one slow commit does not hold the next
ones back (one connection commits ~1,600 times a second here, with fsync on). Prints one JSON
object: ``{"commits": [[id, monotonic ns when the commit returned], ...], "late": n}``.
Times are ``CLOCK_MONOTONIC``, which every process of the machine shares.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time

import psycopg
from psycopg import sql


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("table")
    parser.add_argument("first_id", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("rate", type=float)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args(argv)

    update = sql.SQL("UPDATE {} SET score = score + 1 WHERE id = %s").format(
        sql.Identifier(args.table)
    )
    connections = [psycopg.connect(args.dsn, autocommit=True) for _ in range(args.connections)]
    for conn in connections:  # prepared before the clock starts, on a row that does not exist
        for _ in range(6):
            conn.execute(update, (-1,), prepare=True)
    slots = itertools.count()
    commits: list[tuple[int, int]] = []
    late = 0
    period_ns = int(1e9 / args.rate)
    start_ns = now_ns() + 50_000_000

    def write(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        nonlocal late
        while (k := next(slots)) < args.count:
            due = start_ns + k * period_ns
            wait = due - now_ns()
            if wait > 0:
                time.sleep(wait / 1e9)
            elif wait < -period_ns:
                late += 1
            key = args.first_id + k
            conn.execute(update, (key,), prepare=True)
            commits.append((key, now_ns()))

    threads = [threading.Thread(target=write, args=(c,)) for c in connections]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for conn in connections:
        conn.close()
    json.dump({"commits": commits, "late": late}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
