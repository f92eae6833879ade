"""Where the CPU of ``capture="wal"``'s thread goes: per change, per batch, in garbage collection.

    cd bench && PYTHONPATH=.. python wal_cpu.py steady [--rate 1500] [--seconds 15] [--profile F]
    cd bench && PYTHONPATH=.. python wal_cpu.py drain [--changes 100000] [--freeze] [--profile F]

Both run in a throwaway database on the logical server ``bench_wal.logical_server`` finds,
with the bench's schema and a started ``RowSync(capture="wal")``:

* **steady**: ``pgbench -R <rate>`` single-row UPDATEs of posts (row 12's writes script, 4
  clients, paced), one subscriber to ``Post`` taking every message (``bench_wal.Drain``).
* **drain**: row 12's backlog (``bench_drain.drain_rowsync``: the WAL thread held in a gate
  while the backlog is written).

Prints the WAL thread's own CPU time (``time.thread_time()`` around ``WalSource._stream``) per
change and per visibility query, the listener's counters, and the garbage collections made in
that thread (count and CPU time per generation, through ``gc.callbacks``). ``--freeze`` calls
``gc.freeze()`` as the stream starts (the process's objects until then leave the collections:
what an application can do once its trees are loaded); ``--profile`` writes a cProfile of the
thread (CPU time) for ``pstats``. A diagnostic, not a benchmark: no baseline, no ratio, and
its absolute figures follow the machine's load. Not part of ``make bench``: run by hand.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import bench_drain
import bench_wal
import bench_writes
import sqlalchemy as sa
from captures import setup, vacuum
from harness import Context

from rowsync import wal


class Probe:
    """The WAL thread's CPU time, its garbage collections, and optionally its profile."""

    def __init__(self, freeze: bool, profile: bool) -> None:
        self.cpu = 0.0
        self.collections = [0, 0, 0]
        self.gc_cpu = [0.0, 0.0, 0.0]
        self.profile = cProfile.Profile(time.thread_time) if profile else None
        self._freeze = freeze
        self._thread: int | None = None
        self._started = 0.0
        stream = wal.WalSource._stream
        probe = self

        def measured(source: wal.WalSource, notes: Any, cursor: Any) -> None:
            probe._thread = threading.get_ident()
            if probe._freeze:
                gc.freeze()
            if probe.profile is not None:
                probe.profile.enable()
            start = time.thread_time()
            try:
                stream(source, notes, cursor)
            finally:
                probe.cpu += time.thread_time() - start
                if probe.profile is not None:
                    probe.profile.disable()

        wal.WalSource._stream = measured  # type: ignore[method-assign]
        gc.callbacks.append(self._collected)

    def _collected(self, phase: str, info: dict[str, int]) -> None:
        if threading.get_ident() != self._thread:
            return
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.collections[info["generation"]] += 1
            self.gc_cpu[info["generation"]] += time.thread_time() - self._started

    def report(self, changes: int, stats: Counter[str] | None = None) -> None:
        queries = stats["visibility_queries"] if stats is not None else 0
        print(f"WAL thread: {self.cpu:.2f} s CPU, {self.cpu / changes * 1e6:.1f} us per change")
        if queries:
            print(f"  {self.cpu / queries * 1e6:.0f} us per visibility query ({queries} queries)")
        for generation in range(3):
            print(
                f"  gc generation {generation}: {self.collections[generation]} collections, "
                f"{self.gc_cpu[generation]:.3f} s"
            )
        if stats is not None:
            print(f"  listener counters: {dict(stats)}")


def steady(engine: sa.Engine, url: str, rate: int, seconds: int, probe: Probe) -> None:
    (capture,) = setup(engine, 1000, 10, baselines=(), rowsync_modes=("wal",))
    vacuum(engine, [capture])
    rs = capture.rowsync(engine)
    with rs:
        drain = bench_wal.Drain(rs, [capture.schema.post])
        try:
            script = bench_writes.update_script(Path(tempfile.mkdtemp()), capture.schema.posts.name)
            before = Counter(rs.listener.stats)
            load = subprocess.run(
                ["pgbench", "-n", "-c", "4", "-j", "2", "-M", "prepared", "-R", str(rate)]
                + ["-T", str(seconds), "-f", str(script), url],
                capture_output=True,
                text=True,
                check=True,
            )
            rs.flush(60)
            stats = Counter(rs.listener.stats)
            stats.subtract(before)
            taken = drain.taken
        finally:
            drain.close()
    print(load.stdout.strip().splitlines()[-1])
    probe.report(taken, stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["steady", "drain"])
    parser.add_argument("--rate", type=int, default=1500)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--freeze", action="store_true")
    parser.add_argument("--profile")
    args = parser.parse_args()
    probe = Probe(args.freeze, args.profile is not None)
    with Context(bench_wal.logical_server()).database("walcpu") as url:
        engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
        try:
            if args.mode == "steady":
                steady(engine, url, args.rate, args.seconds, probe)
            else:
                persons = args.changes // bench_drain.POSTS_PER_PERSON
                (capture,) = setup(
                    engine,
                    persons,
                    bench_drain.POSTS_PER_PERSON,
                    baselines=(),
                    rowsync_modes=("wal",),
                )
                vacuum(engine, [capture])
                seconds, _ = bench_drain.drain_rowsync(engine, capture, args.changes)
                print(f"drain: {args.changes / seconds:,.0f} changes/s")
                probe.report(args.changes)
        finally:
            engine.dispose()
            if probe.profile is not None:
                probe.profile.dump_stats(args.profile)


if __name__ == "__main__":
    main()
