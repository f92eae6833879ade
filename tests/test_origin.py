"""Self-write suppression: a process tags its own writes with an origin and chooses not to
receive their echo. The tag is decided per transaction, deterministically: a transaction-local
setting the trigger reads, or with ``capture="wal"`` a message in the transaction's WAL. Every
test runs in every capture mode."""

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import rowsync
from fixtures import reference_watchers
from models import Person


def events(sub):
    return [(change.event, change.ids["id"]) for _, change in sub.drain()]


def test_writes_tagged_in_an_origin_block_are_not_echoed_to_who_ignores_them(
    schema, capture, write
):
    rs = rowsync.RowSync(schema, reference_watchers(), capture=capture)
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


def test_a_default_origin_tags_every_write_through_the_rowsync_engine(schema, capture, write):
    worker = rowsync.RowSync(
        sa.create_engine(schema.url), reference_watchers(), origin="worker", capture=capture
    )
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


@pytest.mark.parametrize("capture", ["wal"])
def test_with_the_wal_only_a_tagged_transaction_that_wrote_gets_a_transaction_id(schema, capture):
    """The tag goes in the WAL at commit, and only when the transaction wrote: a read-only
    transaction stays read-only (no transaction id, so no WAL, and it works on a standby)."""
    rs = rowsync.RowSync(schema, reference_watchers(), origin="web", capture=capture)
    xids = []

    @sa.event.listens_for(rs.engine, "commit")  # after rowsync's: what its tag left
    def after_the_tag(conn):
        xids.append(conn.exec_driver_sql("SELECT pg_current_xact_id_if_assigned()").scalar())

    with Session(rs.engine) as session, session.begin():
        session.scalars(sa.select(Person)).all()
    with Session(rs.engine) as session, session.begin():
        session.add(Person(id=1, name="written"))
    assert xids[0] is None and xids[1] is not None
