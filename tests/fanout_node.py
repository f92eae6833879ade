"""One app node of a fan-out group, as its own process, for tests/test_fanout_nodes.py.

    python tests/fanout_node.py DSN FANOUT_URL FANOUT_KEY [OPTIONS]

It starts ``RowSync(DSN, reference_watchers(), fanout=FANOUT_URL, fanout_key=FANOUT_KEY,
**OPTIONS)`` (``OPTIONS``: a JSON object, e.g. ``{"capture": "wal", "consumer": "group"}``),
loads the oracle's trees (tests/oracle.py) and subscribes to them, prints
``{"ready": ...}``, then answers each command read from stdin with one JSON line on stdout:

- ``check``: flush, apply every queued message (on a ``Resync``, run the tree's query
  again: rows inserted meanwhile are unknown to the tree), and report how each tree differs
  from a fresh query, with the node's role and counters;
- ``quit``: stop and exit.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sqlalchemy.orm import sessionmaker  # noqa: E402

import rowsync  # noqa: E402
from fixtures import reference_watchers  # noqa: E402
from oracle import Tree, assocs_of, differences, fresh, snapshot, trees  # noqa: E402

FLUSH_TIMEOUT = 60.0
"""Generous: after the capture process is killed, a flush waits for the next one."""


def load(rs: rowsync.RowSync, factory: sessionmaker[Any], t: Tree) -> None:
    """Run the tree's query and subscribe to what it returns."""
    value = fresh(factory, t.statement, many=t.many)
    if value is None and t.sub is not None:
        t.value = None  # a deleted root: its subscription still follows the root's key
        return
    if t.sub is not None:
        t.sub.close()
    t.value = value
    t.sub = rs.subscribe(t.value, assocs=assocs_of(t))
    if t.many:
        entity = t.statement.column_descriptions[0]["entity"]
        t.sub.add(entity, "inserted", follow=True, assocs=assocs_of(t))


def check(rs: rowsync.RowSync, factory: sessionmaker[Any], held: list[Tree]) -> dict[str, Any]:
    rs.flush(FLUSH_TIMEOUT)
    resyncs = 0
    for t in held:
        assert t.sub is not None
        for message in t.sub.drain():
            if message[0] is rowsync.Resync:
                resyncs += 1
                load(rs, factory, t)
                break
            t.value = rs.sync(t.value, message, t.preloads)
    diffs = {
        t.name: differences(snapshot(t.value), snapshot(fresh(factory, t.statement, many=t.many)))
        for t in held
    }
    assert rs.fanout is not None
    return {
        "diffs": {name: d for name, d in diffs.items() if d},
        "resyncs": resyncs,
        "capturing": rs.fanout.capturing,
        "notifications": rs.listener.stats["received"],
        "stats": dict(rs.fanout.stats),
    }


def main(dsn: str, url: str, key: str, options: str = "{}") -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    rs = rowsync.RowSync(
        dsn, reference_watchers(), fanout=url, fanout_key=key, **json.loads(options)
    ).start()
    factory = sessionmaker(rs.engine, expire_on_commit=False)
    held = trees()
    for t in held:
        load(rs, factory, t)
    assert rs.fanout is not None
    stream = getattr(rs.fanout.backend, "stream", None)  # NATS: for the test to drop it
    print(json.dumps({"ready": True, "stream": stream}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "check":
            print(json.dumps(check(rs, factory, held)), flush=True)
        elif command == "quit":
            break
    rs.stop()


if __name__ == "__main__":
    main(*sys.argv[1:])
