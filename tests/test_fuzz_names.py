"""Generated DDL fuzzed with hostile identifiers: any table, column, channel and schema name
Postgres accepts (quotes, semicolons, keywords, unicode, up to 63 bytes) installs, captures
and is read back with the right ids."""

from __future__ import annotations

import itertools

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rowsync
from rowsync.triggers import MAX_IDENTIFIER

ALPHABET = st.characters(
    blacklist_categories=["Cs", "Cc"],  # no surrogates, no control characters (no NUL)
    blacklist_characters=["\x00"],
)
NAMES = (
    st.text(ALPHABET, min_size=1, max_size=40)
    | st.sampled_from(['a"b', "x; drop table y", "select", "Ünïcødé ✓", '"', " ", "$1", "%s", "{}"])
).filter(lambda n: 0 < len(n.encode()) <= MAX_IDENTIFIER)

_counter = itertools.count()


@pytest.fixture
def server(dsn: str) -> str:
    return dsn


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    table=NAMES,
    column=NAMES,
    schema=NAMES,
    channel=NAMES,
)
def test_any_identifier_installs_captures_and_reads_back(server, table, column, schema, channel):
    if column.lower() == "id":
        column += "_"
    # Each example gets its own table name (examples share one database).
    table = f"{next(_counter)}{table}".encode()[:MAX_IDENTIFIER].decode("utf-8", "ignore")
    metadata = sa.MetaData()
    hostile = sa.Table(
        table,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(column, sa.Text),
    )
    engine = sa.create_engine(sa.make_url(server).set(drivername="postgresql+psycopg"))
    try:
        metadata.create_all(engine)
        rs = rowsync.RowSync(
            engine,
            [
                rowsync.Watcher("public", table, event, ("id",), ("id", column), model=hostile)
                for event in rowsync.EVENTS
            ],
            schema=schema,
            channel=channel,
        )
        rs.install()
        assert rs.status().ok
        with rs:
            sub = rs.subscribe(hostile)
            with engine.begin() as conn:
                conn.execute(hostile.insert().values({"id": 1, column: "v"}))
                conn.execute(hostile.update().values({column: "w"}))
                conn.execute(hostile.delete())
            rs.flush()
            got = [(change.event, change.ids) for _, change in sub.drain()]
        assert got == [
            ("inserted", {"id": 1, column: "v"}),
            ("updated", {"id": 1, column: "w"}),
            ("deleted", {"id": 1, column: "w"}),
        ]
        assert rs.uninstall(drop_schema=True) == 3
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("DROP TABLE IF EXISTS {}").format(psycopg.sql.Identifier(table))
            )
        engine.dispose()


@pytest.mark.parametrize("name", ["", "x" * 64, "é" * 32])
def test_a_channel_or_schema_name_postgres_would_truncate_is_refused(name):
    watchers = [rowsync.Watcher("public", "t", "inserted", ("id",), ("id",), model=sa.table("t"))]
    for option in ("channel", "schema"):
        with pytest.raises(rowsync.ConfigurationError, match=option):
            rowsync.RowSync("postgresql://nobody@127.0.0.1:1/x", watchers, **{option: name})
