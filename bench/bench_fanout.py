"""Fan-out (issue 7): 1, 4 and 16 app-node processes, with a broker and without one.

Each node is a process of its own (this script with ``--node``): a started RowSync watching
one table, ``items``, with a thread reading a model subscription (``for message in sub``)
that stamps each message with ``time.time()`` as it arrives: the application's callback.
With a broker (``fanout="redis://…"`` or ``"nats://…"``) the nodes elect one capture
node; without one (``fanout=None``, the baseline) every node listens and fetches for itself.

Once every node is up, the script commits 100 inserts (30 with ``--quick``), one
transaction each, spaced by 20 ms (latency, not throughput), waits until every node has
received all of them, and counts the database's connections (``pg_stat_activity``, by
``application_name``) while the nodes are still up.

Figures, per configuration:

* connections per change: those that take part in each change, the listening ones and
  those of the nodes that fetched rows; and every connection of the nodes (with a broker,
  each node also keeps its idle election connection);
* row queries per change: the ``rows`` queries of every node, added up, per change (the
  dispatch's fetch of the changed rows; nothing else queries here);
* notifications received per change, by all the listeners;
* commit -> callback latency on the far nodes (every node but the capture node, or the
  capture node itself when it is alone; every node without a broker), from just before the
  writer's autocommit INSERT to the callback, p50 and p99 over every delivery.

    .venv/bin/python bench/bench_fanout.py            # standalone, prints the table
    .venv/bin/python bench/run.py --only fanout       # the same, through the runner
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import IO, Any

import nats
import psycopg
import sqlalchemy as sa
from harness import DEFAULT_DSN, Context, Goal, Result, median, percentile
from nats.js.errors import NotFoundError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import rowsync

logger = logging.getLogger(__name__)

MODES = {"none": None, "redis": "redis://127.0.0.1:6379/0", "nats": "nats://127.0.0.1:4222"}
SPACING = 0.02
"""Seconds between two changes."""
REPLY_LIMIT = 120.0
KEY = "the benchmark's fan-out key"
"""``fanout_key`` of every node (a group's nodes share it)."""


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None]


# -- a node ------------------------------------------------------------------------------


def node(dsn: str, url: str | None) -> None:
    """Run one node until stdin closes; answer ``mark`` and ``report N`` with JSON lines."""
    rs = rowsync.RowSync(
        dsn, rowsync.watchers(Item), fanout=url, fanout_key=KEY, start_timeout=60
    ).start()
    sub = rs.subscribe(Item)
    arrived: dict[int, float] = {}
    lock = threading.Lock()

    def callback() -> None:
        for _, change in sub:
            now = time.time()
            with lock:
                arrived[int(change.ids["id"])] = now

    threading.Thread(target=callback, daemon=True).start()
    marks: Counter[str] = Counter()
    stream = getattr(rs.fanout and rs.fanout.backend, "stream", None)  # NATS: dropped after
    print(json.dumps({"ready": True, "stream": stream}), flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "mark":
            with lock:
                arrived.clear()
            marks = Counter(rows=rs.rows.queries["rows"], notices=rs.listener.stats["received"])
            print(json.dumps({"ok": True}), flush=True)
        elif command == "report":
            deadline = time.monotonic() + 30
            while len(arrived) < int(args[0]) and time.monotonic() < deadline:
                time.sleep(0.01)
            with lock:
                got = dict(arrived)
            capturing = rs.fanout.capturing if rs.fanout is not None else None
            print(
                json.dumps(
                    {
                        "capturing": capturing,
                        "rows": rs.rows.queries["rows"] - marks["rows"],
                        "notices": rs.listener.stats["received"] - marks["notices"],
                        "arrived": got,
                    }
                ),
                flush=True,
            )
    rs.stop()


class NodeProcess:
    def __init__(self, dsn: str, url: str | None) -> None:
        self.log: IO[str] = open(os.devnull, "w")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--node", dsn, url or ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)

    def reply(self) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(self._lines.get(timeout=REPLY_LIMIT))
        return answer

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


# -- one configuration -------------------------------------------------------------------


def measure(dsn: str, url: str | None, count: int, changes: int, first_id: int) -> dict[str, Any]:
    nodes = [NodeProcess(dsn, url) for _ in range(count)]
    try:
        stream = [n.reply() for n in nodes][0]["stream"]
        with psycopg.connect(dsn, autocommit=True) as conn:
            for n in nodes:
                n.send("mark")
            for n in nodes:
                n.reply()
            committed: dict[int, float] = {}
            for i in range(first_id, first_id + changes):
                committed[i] = time.time()
                conn.execute("INSERT INTO items (id) VALUES (%s)", (i,))
                time.sleep(SPACING)
            for n in nodes:
                n.send(f"report {changes}")
            reports = [n.reply() for n in nodes]
            by_name = dict(  # every node still up, its pool as the changes left it
                conn.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " GROUP BY 1"
                ).fetchall()
            )
    finally:
        for n in nodes:
            n.close()
    far = [r for r in reports if not r["capturing"]] or reports
    latencies = [float(t) - committed[int(i)] for r in far for i, t in r["arrived"].items()]
    delivered = sum(len(r["arrived"]) for r in reports)
    if stream is not None:
        asyncio.run(_drop_stream(MODES["nats"], stream))
    return {
        "connections": sum(by_name.values()),
        "working": by_name.get("rowsync-listener", 0) + sum(r["rows"] > 0 for r in reports),
        "by_name": by_name,
        "rows_per_change": sum(r["rows"] for r in reports) / changes,
        "notices_per_change": sum(r["notices"] for r in reports) / changes,
        "p50": median(latencies),
        "p99": percentile(latencies, 99),
        "delivered": delivered,
        "expected": changes * count,
    }


async def _drop_stream(url: str, stream: str) -> None:
    nc = await nats.connect(url)
    with contextlib.suppress(NotFoundError):
        await nc.jetstream().delete_stream(stream)
    await nc.close()


def run(ctx: Context) -> list[Result]:
    sizes = ctx.rounds([1, 4, 16], [1, 4])
    changes = ctx.rounds(100, 30)
    figures: dict[tuple[str, int], dict[str, Any]] = {}
    with ctx.database("fanout") as url:
        engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
        Base.metadata.create_all(engine)
        engine.dispose()
        rowsync.RowSync(url, rowsync.watchers(Item)).install()
        first = 1
        for size in sizes:
            for mode, broker in MODES.items():
                logger.info("fanout: %s, %d node(s)", mode, size)
                figures[(mode, size)] = measure(url, broker, size, changes, first)
                first += changes
    return results(figures, sizes, changes)


def results(
    figures: dict[tuple[str, int], dict[str, Any]], sizes: list[int], changes: int
) -> list[Result]:
    out: list[Result] = []
    for size in sizes:
        base = figures[("none", size)]
        for mode in ("redis", "nats"):
            f = figures[(mode, size)]
            name = f"fanout {mode}, {size} node{'s' if size > 1 else ''}"
            note = (
                f"{f['delivered']}/{f['expected']} delivered (baseline "
                f"{base['delivered']}/{base['expected']}); connections {f['by_name']}"
            )
            for metric, key, unit in (
                ("connections per change (listen + fetch)", "working", "count"),
                ("postgres connections in all", "connections", "count"),
                ("row queries per change", "rows_per_change", "count"),
                ("notifications received per change", "notices_per_change", "count"),
                ("commit -> callback p50, far nodes", "p50", "s"),
                ("commit -> callback p99, far nodes", "p99", "s"),
            ):
                value, baseline = f[key], base[key]
                goal = None
                if key == "working":
                    goal = Goal.at_most("constant: 2", value, 2, "count")
                elif key == "rows_per_change":
                    goal = Goal.at_most("constant: <= 1", value, 1.0, "count")
                out.append(
                    Result(
                        name=name,
                        metric=metric,
                        value=value,
                        unit=unit,
                        baseline=baseline,
                        baseline_label=None
                        if out and out[-1].name == name
                        else f"the same {size} node(s) with fanout=None (each listens and "
                        f"fetches), {changes} changes",
                        ratio=value / baseline if baseline else None,
                        goal=goal,
                        notes=note if key == "connections" else "",
                    )
                )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", nargs=2, metavar=("DSN", "URL"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="1 and 4 nodes, 30 changes")
    args = parser.parse_args()
    if args.node:
        logging.basicConfig(level=logging.WARNING)
        node(args.node[0], args.node[1] or None)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from run import table

    ctx = Context(dsn=os.environ.get("DATABASE_URL") or DEFAULT_DSN, quick=args.quick)
    print(table(run(ctx)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
