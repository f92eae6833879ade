"""Nothing rowsync does may make a user's write fail: the trigger reads columns as jsonb, so a
column dropped or renamed under it yields a null, never an error in the writer's transaction.
The listener survives and says what it could not follow."""

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import rowsync
from models import Person, Post, Tag


def test_dropping_a_column_under_the_trigger_fails_no_write_and_asks_for_a_resync(rs, write):
    posts = rs.subscribe(Post, "inserted")
    tags = rs.subscribe(Tag, "inserted")
    write(sa.text("ALTER TABLE posts DROP COLUMN other_id"))

    write(sa.text("INSERT INTO posts (id, name) VALUES (1, 'still works')"))
    write(Tag(id=1, name="t"))
    rs.flush()

    [(marker, info)] = posts.drain()
    assert marker is rowsync.Resync and "posts" in info.reason
    assert rs.stats["fetch_errors"] == 1
    [(marker, change)] = tags.drain()
    assert marker is rowsync.Sync and change.ids == {"id": 1}


def test_renaming_the_primary_key_under_the_trigger_skips_the_event_and_counts_it(rs, write):
    sub = rs.subscribe(Person)
    write(sa.text("ALTER TABLE persons RENAME COLUMN id TO person_key"))
    write(sa.text("INSERT INTO persons (person_key, name) VALUES (7, 'x')"))
    rs.flush()
    assert sub.drain() == []
    assert rs.stats["malformed"] == 1


def test_a_watched_partitioned_table_takes_writes_through_its_partitions(schema, write) -> None:
    """The trigger fires for the partition: its function must accept a partition of its
    table, not only the table it was installed on."""

    class Base(DeclarativeBase):
        pass

    class Reading(Base):
        __tablename__ = "readings"
        __table_args__ = {"postgresql_partition_by": "RANGE (id)"}
        id: Mapped[int] = mapped_column(primary_key=True)

    Base.metadata.create_all(schema)
    write(sa.text("CREATE TABLE readings_low PARTITION OF readings FOR VALUES FROM (0) TO (100)"))
    rs = rowsync.RowSync(schema, rowsync.watchers(Reading))
    rs.install()
    with rs, rs.subscribe(Reading) as sub:
        write(sa.text("INSERT INTO readings (id) VALUES (1)"))
        rs.flush()
        assert [(kind, change.ids) for kind, change in sub.drain()] == [(rowsync.Sync, {"id": 1})]
