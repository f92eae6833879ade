"""Fan-out across processes: three app-node processes (tests/fanout_node.py) of one group,
each holding the oracle's trees, against the real Redis and NATS of this machine.

After random writes every node's trees equal a fresh query, and only the elected capture
process listened (and so fetched the changed rows). Killed with SIGKILL, the capture process
is replaced by another node (the nodes wait for it with a generous flush timeout); the
survivors are told to resync, and from then on keep their trees current again.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from brokers import BROKERS, KEY, NATS, REDIS, Relay, drop_stream, require, wait_until
from fixtures import reference_watchers, writer
from models import Person, Post, PostTag, Profile, Tag
from rowsync import RowSync, Sync, slots

NODE = Path(__file__).resolve().parent / "fanout_node.py"
ANSWER_LIMIT = 120.0
"""Seconds a node may take to answer (a guard against hanging, not a timing assertion)."""


class NodeProcess:
    def __init__(self, dsn: str, url: str, options: dict[str, str] | None = None) -> None:
        self.log: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, str(NODE), dsn, url, KEY, json.dumps(options or {})],
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

    def answer(self) -> dict[str, Any]:
        try:
            reply: dict[str, Any] = json.loads(self._lines.get(timeout=ANSWER_LIMIT))
            return reply
        except queue.Empty:
            self.log.seek(0)
            pytest.fail(f"node gave no answer within {ANSWER_LIMIT} s:\n{self.log.read()}")

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.answer()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def random_writes(rng: random.Random, sessions: sessionmaker[Session], count: int) -> None:
    """``count`` committed transactions of random inserts, updates, moves, deletes and links
    (ids 1 to 5, so rows collide); one a constraint refuses commits nothing."""
    ids = range(1, 6)
    for _ in range(count):
        i, j = rng.choice(ids), rng.choice(ids)
        name = rng.choice(["test", "bad", "x", None])
        statement = rng.choice(
            [
                sa.text(
                    "INSERT INTO persons (id, name) VALUES (:i, :n)"
                    " ON CONFLICT (id) DO UPDATE SET name = :n"
                ).bindparams(i=i, n=name),
                sa.delete(Person).where(Person.id == i),
                sa.insert(Post).values(id=i, person_id=j, name=name, body="blabla"),
                sa.update(Post).where(Post.id == i).values(name=name),
                sa.update(Post).where(Post.id == i).values(person_id=j, other_id=i),
                sa.delete(Post).where(Post.id == i),
                sa.text(
                    "INSERT INTO tags (id, name) VALUES (:i, :n)"
                    " ON CONFLICT (id) DO UPDATE SET name = :n"
                ).bindparams(i=i, n=rng.choice(["test", "t1"])),
                sa.insert(PostTag).values(post_id=i, tag_id=j),
                sa.delete(PostTag).where(PostTag.post_id == i, PostTag.tag_id == j),
                sa.text(
                    "INSERT INTO profiles (id, person_id, bio) VALUES (:i, :p, 'b')"
                    " ON CONFLICT (id) DO UPDATE SET person_id = :p"
                ).bindparams(i=rng.choice([1, 2]), p=j),
            ]
        )
        try:
            with sessions() as s, s.begin():
                s.execute(statement)
        except sa.exc.DBAPIError:
            pass  # a constraint said no: nothing was committed, nothing is expected


def assert_converged(reports: list[dict[str, Any]]) -> None:
    assert [r["diffs"] for r in reports] == [{}] * len(reports)
    assert sum(r["capturing"] for r in reports) == 1


@pytest.mark.parametrize("url", BROKERS)
def test_every_node_converges_and_a_killed_capture_process_is_replaced(
    url, dsn, schema, sessions
) -> None:
    require(url)
    RowSync(schema, reference_watchers()).install()
    with sessions() as s, s.begin():
        s.add_all([Person(id=i, name="p") for i in (1, 2, 3)] + [Tag(id=1, name="t1")])
        s.add_all([Post(id=1, person_id=1), Profile(id=1, person_id=1)])
    nodes = [NodeProcess(dsn, url) for _ in range(3)]
    try:
        stream = [node.answer() for node in nodes][0]["stream"]
        rng = random.Random(23)

        random_writes(rng, sessions, 40)
        reports = [node.ask("check") for node in nodes]
        assert_converged(reports)
        assert [r["resyncs"] for r in reports] == [0, 0, 0]
        # one listener for the group: only the capture node received notifications
        assert sorted(r["notifications"] > 0 for r in reports) == [False, False, True]

        capture = next(n for n, r in zip(nodes, reports, strict=True) if r["capturing"])
        capture.kill()  # SIGKILL: no goodbye; Postgres ends its session and frees the lock
        survivors = [node for node in nodes if node is not capture]
        random_writes(rng, sessions, 20)  # some of it while nobody captures
        reports = [node.ask("check") for node in survivors]
        assert_converged(reports)
        assert all(r["resyncs"] > 0 for r in reports)  # the takeover was announced

        random_writes(rng, sessions, 20)
        reports = [node.ask("check") for node in survivors]
        assert_converged(reports)
        assert [r["resyncs"] for r in reports] == [0, 0]  # synced, not re-read
    finally:
        for node in nodes:
            node.close()
    if url == NATS:
        drop_stream(NATS, stream)


@pytest.mark.parametrize("capture", ["wal"])
def test_a_killed_capture_node_holding_the_consumer_slot_is_taken_over_without_a_gap(
    capture, schema, sessions, caplog
) -> None:
    """The capture process of a group sharing ``consumer=`` is killed with its host: the
    server hears no goodbye, so its session keeps the election's lock until the lease runs
    out, and its walsender keeps the slot until ``wal_sender_timeout`` (60 s by default).
    Elected meanwhile, the next node finds the slot in use and tries again, backing off,
    until the server frees it; then it reads on from the slot: no gap, no Resync.

    The dead node's sessions run with ``wal_sender_timeout = 0`` (never), and the test plays
    the server's timeout with ``pg_terminate_backend`` (what the timeout does to the
    walsender) once the next node has met the slot in use: so that path is known taken,
    whatever the load on the machine, and the test does not wait a minute."""
    require(REDIS)
    caplog.set_level(logging.WARNING, logger="rowsync.listener")
    RowSync(schema, reference_watchers(), capture="wal").install()
    options = {"capture": "wal", "consumer": "group"}
    url = schema.url.set(drivername="postgresql").render_as_string(hide_password=False)
    relay = Relay(int(schema.url.port or 5432))
    never = schema.url.set(
        drivername="postgresql", port=relay.port, query={"options": "-c wal_sender_timeout=0"}
    )
    first = NodeProcess(never.render_as_string(hide_password=False), REDIS, options)
    second: RowSync | None = None
    write = writer(sessions)
    try:
        first.answer()  # started alone: the capture node
        second = RowSync(url, reference_watchers(), fanout=REDIS, fanout_key=KEY, **options)
        second.start()
        sub = second.subscribe(Post)
        write(Person(id=1, name="a"), Post(id=1, person_id=1))
        second.flush(30)
        relay.freeze()  # its host is gone: not even the connections' end reaches the server
        first.kill()
        write(Post(id=2, person_id=1))  # while nobody captures, then while the slot is held
        # elected once the lease ran out, it met the slot in use, and tried again
        wait_until(lambda: second.listener.stats["connection_errors"] >= 3, ANSWER_LIMIT)
        with second.connect(autocommit=True) as conn:
            (held,) = [s for s in slots.of_channel(conn, second.channel) if s.active_pid]
            conn.execute("SELECT pg_terminate_backend(%s)", (held.active_pid,))
        write(Post(id=3, person_id=1))
        second.flush(ANSWER_LIMIT)
        got = [(kind, change.ids["id"]) for kind, change in sub.drain()]
        assert second.fanout is not None and second.fanout.capturing
    finally:
        if second is not None:
            second.stop()
        first.close()
        relay.close()
        RowSync(schema, reference_watchers(), capture="wal").uninstall()
    # at least once: what the killed node dispatched but had not confirmed may come again
    assert {kind for kind, _ in got} == {Sync} and {id_ for _, id_ in got} == {1, 2, 3}
    assert got.index((Sync, 2)) < got.index((Sync, 3))
    delays = [
        float(m.group(1))
        for r in caplog.records
        if "is active for PID" in r.getMessage()
        and (m := re.search(r"retrying in ([\d.]+) s", r.getMessage()))
    ]
    assert delays and delays == [min(0.05 * 2**i, 5.0) for i in range(len(delays))]
