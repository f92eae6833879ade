"""Nothing rowsync does may make a user's write fail: the trigger reads columns as jsonb, so a
column dropped or renamed under it yields a null, never an error in the writer's transaction.
The listener survives and says what it could not follow."""

import sqlalchemy as sa

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
