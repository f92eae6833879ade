"""How rowsync reaches the database: through the application's engine, the way it connects.

rowsync reads rows through a SQLAlchemy engine's pool, and opens a few psycopg connections of
its own: the listener's (autocommit, LISTENing for hours), the flush barrier's, install's, the
fan-out election's. They must reach the same database as the same role however the engine
connects (a URL, ``connect_args``, a ``creator``, a ``do_connect`` event that supplies a
password or an IAM token), so they are made by the engine's own machinery: rendering
``engine.url`` back into a string keeps the URL alone, and with ``creator=`` that URL may be
empty (libpq then picks a default database).

A connection of rowsync's own is checked out of a copy of the engine's pool
(``Pool.recreate()``: the same creator, connect arguments and events, as ``Engine.dispose``
uses) and detached from it at once: made as the engine makes its connections, owned by
rowsync alone, really closed when rowsync closes it, never counted against the application's
pool and never an idle connection of that pool that may have gone stale.

An ``AsyncEngine`` makes asyncio connections, which rowsync's threads cannot drive. rowsync
then reads and connects through a psycopg engine on the same URL that runs the async engine's
``do_connect`` hooks (where a password or token is supplied); an async engine's
``connect_args`` and ``creator`` live inside its pool and cannot be reused: give rowsync a
psycopg ``Engine`` built the same way when they matter.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

import psycopg
import sqlalchemy as sa
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from rowsync.errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger(__name__)

Database: TypeAlias = "str | sa.Engine | AsyncEngine"
"""What ``RowSync`` accepts: a libpq conninfo (URL or ``key=value`` string) or an engine."""

DRIVER = "postgresql+psycopg"


class Connect(Protocol):
    """Opens one dedicated psycopg connection; the caller closes it."""

    def __call__(
        self, *, autocommit: bool = False, name: str | None = None
    ) -> psycopg.Connection[TupleRow]: ...


def _as_async(database: Database) -> AsyncEngine | None:
    """``database`` if it is an ``AsyncEngine``. Told without importing SQLAlchemy's asyncio
    extension, which needs greenlet (not a dependency of rowsync's): an application that made
    an ``AsyncEngine`` has imported it already."""
    module = sys.modules.get("sqlalchemy.ext.asyncio")
    if module is not None and isinstance(database, module.AsyncEngine):
        return cast("AsyncEngine", database)
    return None


def engine_for(database: Database) -> sa.Engine:
    """The psycopg engine rowsync reads rows through: ``database`` itself when it is one."""
    if (async_engine := _as_async(database)) is not None:
        return _twin(async_engine)
    if isinstance(database, sa.Engine):
        if database.dialect.driver != "psycopg":
            raise ConfigurationError(
                f"rowsync needs a psycopg (3) engine, not {database.dialect.driver}: its listener "
                f"uses psycopg's notifications (create_engine('{DRIVER}://...'))"
            )
        return database
    if not isinstance(database, str):
        raise ConfigurationError(
            "rowsync needs a libpq conninfo (URL or key=value string), an Engine or an "
            f"AsyncEngine, not {type(database).__name__}"
        )
    # pre_ping: pooled connections survive a server restart unnoticed by the pool.
    try:
        url = sa.make_url(database)
    except (sa.exc.ArgumentError, ValueError):  # key=value, or a URL only libpq reads (hosts)
        return sa.create_engine(
            f"{DRIVER}://", connect_args=_conninfo(database), pool_pre_ping=True
        )
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise ConfigurationError(
            f"rowsync needs PostgreSQL, not {url.get_backend_name()} ({DRIVER}://user@host/db)"
        )
    return sa.create_engine(url.set(drivername=DRIVER), pool_pre_ping=True)


def writer_of(database: Database, engine: sa.Engine) -> sa.Engine:
    """The engine the application writes through (whose transactions ``rs.origin`` tags)."""
    async_engine = _as_async(database)
    return engine if async_engine is None else async_engine.sync_engine


def connector(engine: sa.Engine) -> Connect:
    """Opens rowsync's own connections the way ``engine`` (a psycopg engine) opens its own."""
    pool = engine.pool.recreate()

    def connect(
        *, autocommit: bool = False, name: str | None = None
    ) -> psycopg.Connection[TupleRow]:
        proxied = pool.connect()
        conn = proxied.driver_connection
        proxied.detach()
        if not isinstance(conn, psycopg.Connection):  # a creator returning something else
            proxied.close()
            raise ConfigurationError(
                f"the engine's connections are {type(conn).__name__}, not psycopg connections"
            )
        try:
            conn.autocommit = True
            if name is not None and not conn.info.parameter_status("application_name"):
                # named in pg_stat_activity, unless the engine names its connections
                conn.execute("SELECT set_config('application_name', %s, false)", (name,))
            conn.autocommit = autocommit
        except BaseException:
            conn.close()
            raise
        return conn

    return connect


def run(
    conn: psycopg.Connection[TupleRow], query: sql.Composed, values: Sequence[Any]
) -> psycopg.RawCursor[TupleRow]:
    """Run ``query``, whose values are PostgreSQL's own placeholders (``$1``, ``$2``…).

    For a query that names rowsync's schema or a watched table and takes values. psycopg
    reads every ``%`` of a query run with values as a placeholder, inside a quoted name too
    (it does not parse SQL, and ``sql.Identifier`` leaves ``%`` as it is): a schema named
    ``a%sb`` would take a value's place, one named ``a%%b`` would lose a ``%``. A raw cursor
    sends the composed text as it is.
    """
    return psycopg.RawCursor(conn).execute(query, values)


def conninfo_of(conn: psycopg.Connection[Any], **extra: str) -> str:
    """The libpq conninfo ``conn`` was made with, password included, plus ``extra`` where it
    sets none: for a client that connects by itself (psycopg2's replication connection),
    the way the engine connected ``conn`` (a token supplied per connection is fresh)."""
    dsn = conninfo_to_dict(conn.info.dsn)
    if conn.info.password:
        dsn["password"] = conn.info.password
    return make_conninfo(**{**extra, **{k: str(v) for k, v in dsn.items()}})


def _twin(database: AsyncEngine) -> sa.Engine:
    engine = sa.create_engine(database.url.set(drivername=DRIVER), pool_pre_ping=True)
    for hook in database.sync_engine.dialect.dispatch.do_connect:
        sa.event.listen(engine, "do_connect", hook)
    return engine


def _conninfo(text: str) -> dict[str, str]:
    try:
        return {k: str(v) for k, v in conninfo_to_dict(text).items()}
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(
            f"not a database URL nor a libpq conninfo ('host=... dbname=... user=...'): {exc}"
        ) from None
