"""Self-write suppression: a process tags its own writes with an origin and chooses not to
receive their echo. The tag is a transaction-local setting the trigger reads, so which
events are skipped is decided per transaction, deterministically."""

import sqlalchemy as sa
from sqlalchemy.orm import Session

import rowsync
from fixtures import reference_watchers
from models import Person


def events(sub):
    return [(change.event, change.ids["id"]) for _, change in sub.drain()]


def test_writes_tagged_in_an_origin_block_are_not_echoed_to_who_ignores_them(schema, write):
    rs = rowsync.RowSync(schema, reference_watchers())
    rs.install()
    with rs:
        mine = rs.subscribe(Person, ignore_origin="web")
        everyone = rs.subscribe(Person)

        with rs.origin("web"), Session(rs.engine) as session, session.begin():
            session.add(Person(id=1, name="mine"))
        with Session(rs.engine) as session, session.begin():  # same pool, outside the block
            session.add(Person(id=2, name="untagged"))
        write(Person(id=3, name="another process"))
        rs.flush()

        assert events(mine) == [("inserted", 2), ("inserted", 3)]
        assert events(everyone) == [("inserted", 1), ("inserted", 2), ("inserted", 3)]


def test_a_default_origin_tags_every_write_through_the_rowsync_engine(engine, schema, write):
    worker = rowsync.RowSync(sa.create_engine(engine.url), reference_watchers(), origin="worker")
    worker.install()
    with worker:
        sub = worker.subscribe(Person, ignore_origin=["worker", "cron"])
        with Session(worker.engine) as session, session.begin():
            session.add(Person(id=1, name="by the worker"))
        with worker.origin(None), Session(worker.engine) as session, session.begin():
            session.add(Person(id=2, name="untagged on purpose"))
        write(Person(id=3, name="by someone else"))
        worker.flush()
        assert events(sub) == [("inserted", 2), ("inserted", 3)]
    worker.engine.dispose()
