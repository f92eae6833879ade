"""Database fixtures shared by the whole test suite.

Tests run against an existing PostgreSQL server (``make test`` finds or starts
one with ``scripts/ensure-postgres.sh`` and exports its DSN as
``ROWSYNC_TEST_DSN``). Each test gets a brand-new empty database, cloned by
pytest-postgresql from a template and dropped afterwards, so triggers, NOTIFY
channels and schema changes never leak between tests.

Only the database fixtures live here; put other shared fixtures in their own
modules.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from pytest_postgresql import factories
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
_server = conninfo_to_dict(os.environ.get("ROWSYNC_TEST_DSN") or DEFAULT_DSN)

# Overrides pytest-postgresql's own `postgresql_noproc` (which would look at
# localhost with its defaults) with the server from ROWSYNC_TEST_DSN. The pid in
# the database names lets several pytest runs share one server at the same time.
postgresql_noproc = factories.postgresql_noproc(
    host=str(_server.get("host") or "127.0.0.1"),
    port=int(_server.get("port") or 5432),
    user=str(_server.get("user") or "postgres"),
    password=str(_server["password"]) if _server.get("password") else None,
    dbname=f"rowsync_test_{os.getpid()}",
    maintenance_dbname=str(_server.get("dbname") or "postgres"),
)

# A psycopg connection to a fresh per-test database. Named like the plugin's own
# `postgresql` fixture on purpose: the plugin's one would try to launch a server.
# Its teardown drops the database after terminating any connection a test left
# open (pytest-postgresql's DatabaseJanitor.drop does that).
postgresql = factories.postgresql("postgresql_noproc")


@pytest.fixture
def dsn(postgresql: psycopg.Connection) -> str:
    """libpq URL (``postgresql://...``) of this test's fresh, empty database.

    Works with ``psycopg.connect(dsn)``; for SQLAlchemy use the `engine`
    fixture or swap the scheme for ``postgresql+psycopg://``.
    """
    return _url("postgresql", postgresql).render_as_string(hide_password=False)


@pytest.fixture
def engine(postgresql: psycopg.Connection) -> Iterator[Engine]:
    """SQLAlchemy engine (psycopg 3 driver) on this test's fresh database.

    Disposed at teardown so its pooled connections are closed before the
    database is dropped.
    """
    eng = create_engine(_url("postgresql+psycopg", postgresql))
    try:
        yield eng
    finally:
        eng.dispose()


def _url(drivername: str, conn: psycopg.Connection) -> URL:
    """Build a URL for the database `conn` is connected to."""
    info = conn.info
    host = info.host
    # A Unix-socket directory cannot go in the host part of a URL; libpq and
    # SQLAlchemy both accept it as the `host` query parameter instead.
    socket_dir = host.startswith("/")
    return URL.create(
        drivername,
        username=info.user,
        password=info.password or None,
        host=None if socket_dir else host,
        port=info.port,
        database=info.dbname,
        query={"host": host} if socket_dir else {},
    )


# The reference-schema fixtures live in tests/fixtures.py; importing them here shares them.
from fixtures import (  # noqa: E402, F401
    capture,
    moded,
    moded_engine,
    rs,
    schema,
    sessions,
    write,
    write_to,
)
from restartable import (  # noqa: E402, F401
    logical_dsn,
    logical_engine,
    logical_server,
    lossy_dsn,
    lossy_server,
    restartable_dsn,
    restartable_server,
)


@pytest.fixture(autouse=True)
def _index_checked_after_every_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sync of the suite (and every reroot a live query makes) also checks the index
    it kept current (tests/index_check.py)."""
    from index_check import check_after_sync
    from rowsync.sync import Syncer

    original, reroot = Syncer.sync, Syncer.reroot

    def sync(self: Syncer, value: object, message: object, preloads: object = None) -> object:
        result = original(self, value, message, preloads)  # type: ignore[arg-type]
        check_after_sync(self, result)
        return result

    def rerooted(self: Syncer, roots: list[object], *args: object) -> list[object]:
        result = reroot(self, roots, *args)  # type: ignore[arg-type]
        check_after_sync(self, roots)
        return result

    monkeypatch.setattr(Syncer, "sync", sync)
    monkeypatch.setattr(Syncer, "reroot", rerooted)
