"""Least privilege: once installed (by the schema owner), the listener needs only CONNECT
and SELECT on the watched tables, and writers need nothing of rowsync's beyond what the
install grants to PUBLIC (the ref sequence, the overflow table)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.orm import Session

import rowsync
from fixtures import reference_watchers
from models import Base, Post


@pytest.fixture
def roles(engine: sa.Engine) -> Iterator[tuple[str, str]]:
    """A read-only listener role and a writer role (cluster-wide, so named per run)."""
    reader, writer = f"rowsync_reader_{os.getpid()}", f"rowsync_writer_{os.getpid()}"
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    tables = sql.SQL(", ").join(sql.Identifier(t.name) for t in Base.metadata.sorted_tables)
    with psycopg.connect(url, autocommit=True) as conn:
        for role in (reader, writer):
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            conn.execute(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                    sql.Identifier(engine.url.database or ""), sql.Identifier(role)
                )
            )
        conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(tables, sql.Identifier(reader)))
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(
                tables, sql.Identifier(writer)
            )
        )
    yield reader, writer
    with psycopg.connect(url, autocommit=True) as conn:
        for role in (reader, writer):
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


MODES = [
    pytest.param({}, id="notify"),
    pytest.param({"durable": True, "consumer": "reader"}, id="durable"),
    pytest.param({"capture": "stream", "retention": 0}, id="stream"),
]


@pytest.mark.parametrize("mode", MODES)
def test_a_select_only_listener_receives_what_a_plain_writer_writes(schema, roles, mode):
    """In every mode: NOTIFY mode's overflow table, the log modes' log, saved positions and
    pruning all work for a listener that may only SELECT the watched tables."""
    reader, writer = roles
    watchers = reference_watchers() + rowsync.watchers(Post, extra_columns=["body"])
    rowsync.RowSync(schema, watchers, **mode).install()  # as the owner, once
    as_reader = sa.create_engine(schema.url.set(username=reader))
    as_writer = sa.create_engine(schema.url.set(username=writer))
    rs = rowsync.RowSync(as_reader, watchers, **mode)
    try:
        with rs:
            sub = rs.subscribe(Post)
            with Session(as_writer) as session, session.begin():
                session.add(Post(id=1, name="small"))
                session.add(Post(id=2, body="x" * 9000))  # an oversized event: the overflow table
            with Session(as_writer) as session, session.begin():
                session.execute(sa.update(Post).where(Post.id == 1).values(name="renamed"))
            rs.flush()
            messages = sub.drain()
            changes = [(change.event, change.ids["id"]) for _, change in messages]
            assert changes == [("inserted", 1), ("inserted", 2), ("updated", 1)]
            assert rs.listener.stats["overflow"] == (1 if not mode else 0)
            post = rs.sync(None, messages[0])  # the row was read with the listener's role
            post = rs.sync(post, messages[2])
            assert (post.id, post.name) == (1, "renamed")
    finally:
        as_reader.dispose()
        as_writer.dispose()
