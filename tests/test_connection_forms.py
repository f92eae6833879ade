"""Every way of naming the database reaches it for every connection rowsync makes: install,
the listener, the flush barrier and the fan-out election connect the way the application's
engine connects (its URL, connect_args, creator or do_connect hook), not from its URL alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import rowsync
from models import Person
from rowsync import ConfigurationError, RowSync, Sync

NOWHERE = "postgresql+psycopg://nobody@127.0.0.1:1/nowhere"
"""A URL no connection may be made from: an engine that connects otherwise says so."""


@pytest.fixture
def params(schema: sa.Engine) -> dict[str, Any]:
    """libpq parameters of the test's database (the tables exist)."""
    url = schema.url
    return {"host": url.host, "port": url.port, "user": url.username, "dbname": url.database}


def delivers(rs: RowSync, write: Callable[..., None]) -> None:
    """install, a change delivered, a flush: the whole path, from ``rs``'s own connections."""
    rs.install()
    with rs:
        sub = rs.subscribe(Person)
        write(Person(id=1, name="ann"))
        rs.flush()
        messages = sub.drain()
    assert [(kind, change.event, change.ids["id"]) for kind, change in messages] == [
        (Sync, "inserted", 1)
    ]


def test_a_libpq_key_value_string_is_a_database(params, write) -> None:
    conninfo = " ".join(f"{k}={v}" for k, v in params.items())
    rs = RowSync(conninfo, rowsync.watchers(Person))
    try:
        delivers(rs, write)
    finally:
        rs.engine.dispose()


def test_a_libpq_url_with_several_hosts_is_a_database(params, write) -> None:
    """A URL libpq reads and SQLAlchemy does not: the first host is tried, then the next."""
    p = params
    url = f"postgresql://{p['user']}@127.0.0.1:1,{p['host']}:{p['port']}/{p['dbname']}"
    rs = RowSync(url, rowsync.watchers(Person))
    try:
        delivers(rs, write)
    finally:
        rs.engine.dispose()


def test_an_engine_with_a_creator_is_connected_through_its_creator(params, write) -> None:
    made: list[psycopg.Connection[Any]] = []

    def creator() -> psycopg.Connection[Any]:
        made.append(psycopg.connect(**params))
        return made[-1]

    engine = sa.create_engine(NOWHERE, creator=creator)
    try:
        delivers(RowSync(engine, rowsync.watchers(Person)), write)
    finally:
        engine.dispose()
    assert len(made) >= 3  # install, listener, flush


def test_an_engine_with_connect_args_is_connected_with_them(params, write) -> None:
    engine = sa.create_engine("postgresql+psycopg://", connect_args=params)
    try:
        delivers(RowSync(engine, rowsync.watchers(Person)), write)
    finally:
        engine.dispose()


def test_an_engine_whose_do_connect_hook_supplies_credentials_is_connected_by_it(
    params, write
) -> None:
    """As an IAM token or a secret fetched per connection is supplied."""
    engine = sa.create_engine(NOWHERE)
    supplied: list[str] = []

    @sa.event.listens_for(engine, "do_connect")
    def credentials(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        cparams.update(params, password=f"token-{len(supplied)}")
        supplied.append(cparams["password"])

    try:
        delivers(RowSync(engine, rowsync.watchers(Person)), write)
    finally:
        engine.dispose()
    assert len(supplied) >= 3  # install, listener, flush


def test_the_fanout_election_connects_as_the_engine_does(params, write) -> None:
    engine = sa.create_engine(NOWHERE, connect_args=params)
    try:
        rs = RowSync(engine, rowsync.watchers(Person), fanout="memory://")
        delivers(rs, write)
        assert rs.fanout is not None and rs.fanout.election.stats["elected"] == 1
    finally:
        engine.dispose()


def test_rowsyncs_own_connections_never_take_the_applications_pooled_ones(schema) -> None:
    engine = sa.create_engine(schema.url, pool_size=1, max_overflow=0, pool_timeout=1)
    try:
        rs = RowSync(engine, rowsync.watchers(Person))
        rs.install()
        with engine.connect(), rs:  # the pool's only connection is in use
            rs.flush()
            with rs.connect() as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        engine.dispose()


def test_an_engine_of_another_driver_is_refused_clearly() -> None:
    engine = sa.create_engine("sqlite://")
    with pytest.raises(ConfigurationError, match="needs a psycopg \\(3\\) engine, not pysqlite"):
        RowSync(engine, rowsync.watchers(Person))


@pytest.mark.parametrize(
    ("database", "message"),
    [
        ("mysql://root@127.0.0.1/app", "rowsync needs PostgreSQL, not mysql"),
        ("host=a dbname", "not a database URL nor a libpq conninfo"),
    ],
)
def test_a_string_that_is_no_postgres_conninfo_is_refused_clearly(database, message) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RowSync(database, rowsync.watchers(Person))


def test_the_command_line_takes_a_key_value_conninfo(params, capsys) -> None:
    from rowsync.cli import main

    conninfo = " ".join(f"{k}={v}" for k, v in params.items())
    assert main(["--app", "cli_app:watchers", "--dsn", conninfo, "install"]) == 0
    assert main(["--dsn", conninfo, "uninstall"]) == 0
    out = capsys.readouterr().out
    assert "rowsync install: " in out and "rowsync uninstall: " in out
