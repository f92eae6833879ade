"""Soak: a steady stream of changes for a long time; the cache and the queues must stay
bounded and the process' memory flat.

    .venv/bin/python bench/soak.py --minutes 30 --rate 200

Writes bench/soak.json: samples of resident memory, cache size, queue lengths and listener
counters, one a minute, plus the first and last. Two subscribers keep their trees in sync
(and compare with a fresh query at the end); a third never reads (its queue must stay
bounded by its maxsize, overflowing into a Resync).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import DEFAULT_DSN, Context  # noqa: E402

import rowsync  # noqa: E402


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "people"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    posts: Mapped[list[Post]] = relationship(order_by="Post.id")


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    person_id: Mapped[int] = mapped_column(sa.ForeignKey("people.id", ondelete="CASCADE"))


QUERY = sa.select(Person).order_by(Person.id).options(selectinload(Person.posts))


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def writer(engine: sa.Engine, rate: float, stop: threading.Event, rng: random.Random) -> None:
    """``rate`` single-row transactions a second: updates, inserts and deletes of posts."""
    next_id = 10_000
    interval = 1.0 / rate
    deadline = time.monotonic()
    while not stop.is_set():
        with engine.begin() as conn:
            roll = rng.random()
            if roll < 0.6:
                conn.execute(
                    sa.update(Post)
                    .where(Post.id == rng.randrange(1, 1001))
                    .values(title=f"t{rng.randrange(10**6)}")
                )
            elif roll < 0.8:
                next_id += 1
                conn.execute(
                    sa.insert(Post).values(id=next_id, title="new", person_id=rng.randrange(1, 101))
                )
            else:
                conn.execute(sa.delete(Post).where(Post.id == rng.randrange(1001, next_id + 1)))
        deadline += interval
        stop.wait(max(0.0, deadline - time.monotonic()))


def reader(
    rs: rowsync.RowSync, sub: rowsync.Subscription, box: dict[str, Any], stop: threading.Event
) -> None:
    while not stop.is_set():
        try:
            message = sub.get(timeout=0.5)
        except TimeoutError:
            continue
        if message[0] is rowsync.Resync:
            box["tree"] = rs.resync(box["tree"])
            box["resyncs"] += 1
        else:
            box["tree"] = rs.sync(box["tree"], message)
            box["applied"] += 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=200, help="write transactions per second")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "soak.json"))
    args = parser.parse_args()
    ctx = Context(dsn=os.environ.get("DATABASE_URL", DEFAULT_DSN))
    with ctx.database("soak") as url:
        engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(Person), [{"id": i, "name": f"p{i}"} for i in range(1, 101)])
            conn.execute(
                sa.insert(Post),
                [{"id": i, "title": "t", "person_id": 1 + i % 100} for i in range(1, 1001)],
            )
        rs = rowsync.RowSync(
            engine, rowsync.watchers(Person, ["posts"]), cache_size=2000, queue_size=1000
        )
        rs.install()
        stop = threading.Event()
        samples: list[dict[str, Any]] = []
        with rs:
            boxes = []
            threads = []
            for _ in range(2):
                with Session(engine, expire_on_commit=False) as s:
                    tree = list(s.scalars(QUERY))
                box = {"tree": tree, "applied": 0, "resyncs": 0}
                sub = rs.subscribe(tree, assocs=["posts"])
                boxes.append((box, sub))
                threads.append(
                    threading.Thread(target=reader, args=(rs, sub, box, stop), daemon=True)
                )
            idle = rs.subscribe(Post, maxsize=500)  # never read
            threads.append(
                threading.Thread(
                    target=writer, args=(engine, args.rate, stop, random.Random(7)), daemon=True
                )
            )
            for t in threads:
                t.start()
            start = time.monotonic()

            def sample() -> None:
                samples.append(
                    {
                        "t_s": round(time.monotonic() - start, 1),
                        "rss_kib": rss_kib(),
                        "cache_entries": len(rs.cache),
                        "cache_max": rs.cache.maxsize,
                        "idle_queue": len(idle),
                        "idle_overflows": idle.overflows,
                        "reader_queues": [len(sub) for _, sub in boxes],
                        "applied": [box["applied"] for box, _ in boxes],
                        "objects_held": [
                            len(box["tree"]) + sum(len(p.posts) for p in box["tree"])
                            for box, _ in boxes
                        ],
                        "resyncs": [box["resyncs"] for box, _ in boxes],
                        "received": rs.listener.stats["received"],
                        "gaps": rs.listener.stats["gaps"],
                    }
                )
                print(json.dumps(samples[-1]), flush=True)

            sample()
            while time.monotonic() - start < args.minutes * 60:
                time.sleep(min(60, args.minutes * 60 - (time.monotonic() - start)))
                sample()
            stop.set()
            for t in threads:
                t.join(5)
            rs.flush(30)
            for box, sub in boxes:  # apply what is left, then compare with a fresh query
                for message in sub.drain():
                    box["tree"] = (
                        rs.sync(box["tree"], message)
                        if message[0] is rowsync.Sync
                        else rs.resync(box["tree"])
                    )
            with Session(engine) as s:
                expected = [
                    (p.id, p.name, [(q.id, q.title) for q in p.posts]) for p in s.scalars(QUERY)
                ]
            in_sync = [
                [(p.id, p.name, [(q.id, q.title) for q in p.posts]) for p in box["tree"]]
                == expected
                for box, _ in boxes
            ]
            result = {
                "minutes": args.minutes,
                "rate": args.rate,
                "samples": samples,
                "trees_in_sync": in_sync,
            }
            Path(args.out).write_text(json.dumps(result, indent=2))
            print("trees in sync with a fresh query:", in_sync)
        engine.dispose()


if __name__ == "__main__":
    main()
