"""Commit -> subscriber callback latency at 200 / 1,000 / 2,000 changes a second (issue 6, row 1).

A writer process (``bench/writer.py``) commits single-row updates of posts at a steady rate,
following a clock, and records when each commit returned. In this process a receiver records
when each change reaches it:

* baseline: a minimal psycopg ``LISTEN`` loop (``conn.notifies()``) on a table whose only
  trigger is the hand-written ``pg_notify(channel, NEW.id::text)``;
* rowsync, in each capture mode it offers: a started ``RowSync`` holding a subscription on
  the tree of every person with their posts (1,000 x 10); a subscriber thread blocked in
  ``sub.get()`` records each ``(Sync, change)`` as it gets it - the moment a callback would
  run. Between commit and callback: NOTIFY (or the change log), the listener's parse, its
  batched row fetch, routing, the subscription queue and the thread hand-over.

Latency = receive time - commit time (``CLOCK_MONOTONIC``, shared by both processes), matched
by post id (each phase updates distinct posts). Each round runs every configuration at every
rate, in an order rotated from round to round; figures are medians over rounds of each
round's p50 / p99, and of each round's difference to the baseline.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from captures import MINIMAL, Capture, setup
from harness import HERE, Context, Goal, Result, median, percentile
from psycopg import sql

from rowsync.messages import Change, Sync

logger = logging.getLogger(__name__)

ROW = 1
"""This benchmark's row in issue 6's table."""

RATES = (200, 1000, 2000)
PERSONS = 1000
POSTS_PER_PERSON = 10
SETTLE_S = 5.0
"""How long after the writer's last commit a phase waits for stragglers."""


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass
class Phase:
    """One configuration at one rate, in one round."""

    p50: float
    p99: float
    received: int
    expected: int
    rate: float
    """Achieved commit rate."""


class _Receiver:
    """Records the first arrival time of each post id, from a thread of its own."""

    def __init__(self) -> None:
        self.arrivals: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, target: Any) -> None:
        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def record(self, key: int) -> None:
        self.arrivals.setdefault(key, now_ns())

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)


def _minimal_receiver(url: str, channel: str) -> _Receiver:
    receiver = _Receiver()
    ready = threading.Event()

    def loop() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            ready.set()
            while not receiver.stop.is_set():
                for note in conn.notifies(timeout=0.1):
                    receiver.record(int(note.payload))

    receiver.start(loop)
    ready.wait(10)
    return receiver


def _rowsync_receiver(sub: Any) -> _Receiver:
    receiver = _Receiver()

    def loop() -> None:
        while not receiver.stop.is_set():
            try:
                message = sub.get(timeout=0.1)
            except TimeoutError:
                continue
            if message[0] is Sync and isinstance(message[1], Change):
                receiver.record(message[1].ids["id"])

    receiver.start(loop)
    return receiver


def _write(url: str, table: str, count: int, rate: float) -> tuple[list[list[int]], float]:
    """Run the writer process; its commits and the rate it achieved."""
    out = subprocess.run(
        [sys.executable, str(HERE / "writer.py"), url, table, "1", str(count), str(rate)],
        check=True,
        capture_output=True,
        text=True,
        timeout=count / rate + 60,
    )
    commits: list[list[int]] = json.loads(out.stdout)["commits"]
    span = (commits[-1][1] - min(c[1] for c in commits)) / 1e9 if len(commits) > 1 else 0.0
    return commits, (len(commits) - 1) / span if span > 0 else float("nan")


def _phase(url: str, capture: Capture, receiver: _Receiver, rate: int, seconds: float) -> Phase:
    count = int(rate * seconds)
    commits, achieved = _write(url, capture.schema.posts.name, count, rate)
    deadline = time.monotonic() + SETTLE_S
    while len(receiver.arrivals) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    receiver.close()
    latencies = [
        (receiver.arrivals[key] - at) / 1e9 for key, at in commits if key in receiver.arrivals
    ]
    if not latencies:
        raise RuntimeError(f"{capture.label}: nothing received at {rate}/s")
    return Phase(
        percentile(latencies, 50), percentile(latencies, 99), len(latencies), count, achieved
    )


def run(ctx: Context) -> list[Result]:
    rounds = ctx.rounds(3, 1)
    seconds = ctx.rounds(3.0, 1.0)
    with ctx.database("latency") as url:
        engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
        try:
            return measure(url, engine, rounds, seconds)
        finally:
            engine.dispose()


def measure(
    url: str,
    engine: sa.Engine,
    rounds: int,
    seconds: float,
    rowsync_modes: Sequence[str] | None = None,
) -> list[Result]:
    """The minimal ``LISTEN`` loop and rowsync in each of ``rowsync_modes`` (default: see
    :func:`captures.modes`) at every rate, on the server of ``url``; one row per mode, rate
    and percentile."""
    captures = setup(
        engine, PERSONS, POSTS_PER_PERSON, baselines=(MINIMAL,), rowsync_modes=rowsync_modes
    )
    baseline, modes = captures[0], captures[1:]
    syncs = {c.name: c.rowsync(engine) for c in modes}
    trees = {c.name: c.schema.load_tree(engine) for c in modes}
    phases: dict[tuple[str, int], list[Phase]] = {}
    plan = [(c, rate) for rate in RATES for c in captures]
    for r in range(rounds):
        shift = r * len(captures) % len(plan)
        for capture, rate in plan[shift:] + plan[:shift]:
            if capture.options is None:
                receiver = _minimal_receiver(url, capture.channel)
                phase = _phase(url, capture, receiver, rate, seconds)
            else:
                rs = syncs[capture.name]
                with rs:
                    sub = rs.subscribe(trees[capture.name], assocs=["posts"], maxsize=100_000)
                    receiver = _rowsync_receiver(sub)
                    phase = _phase(url, capture, receiver, rate, seconds)
                    sub.close()
            logger.info(
                "round %d %s at %d/s: p50 %.2f ms, p99 %.2f ms (%d/%d received, %.0f/s)",
                r,
                capture.label,
                rate,
                phase.p50 * 1e3,
                phase.p99 * 1e3,
                phase.received,
                phase.expected,
                phase.rate,
            )
            phases.setdefault((capture.name, rate), []).append(phase)

    results: list[Result] = []
    label = f"minimal LISTEN loop on a hand-written pg_notify(id) trigger ({baseline.label})"
    for rate in RATES:
        base = phases[(baseline.name, rate)]
        for capture in modes:
            mine = phases[(capture.name, rate)]
            for q in ("p50", "p99"):
                value = median([getattr(p, q) for p in mine])
                base_value = median([getattr(p, q) for p in base])
                diff = median(
                    [getattr(p, q) - getattr(b, q) for p, b in zip(mine, base, strict=True)]
                )
                results.append(
                    Result(
                        "latency",
                        f"{capture.label} {q} at {rate:,}/s",
                        value,
                        baseline=base_value,
                        baseline_label=label,
                        ratio=value / base_value,
                        goal=_goal(capture.name, q, rate, value, diff),
                        notes=(
                            f"{diff * 1e3:+.2f} ms vs baseline (median of per-round differences); "
                            f"received {sum(p.received for p in mine)}/"
                            f"{sum(p.expected for p in mine)}, baseline "
                            f"{sum(p.received for p in base)}/{sum(p.expected for p in base)}; "
                            f"writer achieved {median([p.rate for p in mine]):,.0f}/s "
                            f"(baseline phases {median([p.rate for p in base]):,.0f}/s); "
                            f"{len(mine)} rounds"
                        ),
                    )
                )
    return results


def _goal(mode: str, q: str, rate: int, value: float, diff: float) -> Goal | None:
    """Issue 6: p50 <= baseline + 0.5 ms, p99 <= baseline + 5 ms, p99 <= 20 ms at 1,000/s; with
    ``capture="stream"``, p99 <= 50 ms at 1,000/s; with ``capture="wal"`` (issue 14), p50 <=
    2 ms and p99 <= 10 ms at every rate."""
    if mode == "wal":
        limit = 2e-3 if q == "p50" else 10e-3
        return Goal.at_most(f"<= {limit * 1e3:.0f} ms", value, limit)
    if mode == "stream":
        if q == "p99" and rate == 1000:
            return Goal.at_most("p99 <= 50 ms", value, 50e-3)
        return None
    if q == "p50":
        return Goal.at_most("<= baseline + 0.5 ms", diff, 0.5e-3)
    if rate == 1000:
        plus = Goal.at_most("<= baseline + 5 ms", diff, 5e-3)
        absolute = Goal.at_most("<= 20 ms", value, 20e-3)
        return Goal(
            "<= baseline + 5 ms and <= 20 ms",
            plus.met and absolute.met,
            ", ".join(m for m in (plus.missed_by, absolute.missed_by) if m),
        )
    return Goal.at_most("<= baseline + 5 ms", diff, 5e-3)
