"""PostgreSQL servers of the tests' own: one they may restart, one that decodes its WAL.

The shared server must never be restarted under other test runs, and need not run with
``wal_level = logical``, so these tests get throwaway clusters (``scripts/ensure-postgres.sh``
with ``ROWSYNC_PG_THROWAWAY=1``, which configures ``wal_level = logical``, on a port and
directory of their own; created once, reused). The two are apart so that restarting one never
cuts the other's connections.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
DIRECTORY = Path(os.environ.get("ROWSYNC_RESTART_PG_DIR", "/tmp/rowsync-pg-restart"))
PORT = os.environ.get("ROWSYNC_RESTART_PG_PORT", "54331")
LOGICAL_DIRECTORY = Path(os.environ.get("ROWSYNC_WAL_PG_DIR", "/tmp/rowsync-pg-wal"))
LOGICAL_PORT = os.environ.get("ROWSYNC_WAL_PG_PORT", "54332")
LOSSY_DIRECTORY = Path(os.environ.get("ROWSYNC_LOSSY_PG_DIR", "/tmp/rowsync-pg-lost"))
LOSSY_PORT = os.environ.get("ROWSYNC_LOSSY_PG_PORT", "54333")
LOSSY_KEEP = "1MB"
"""``max_slot_wal_keep_size`` of the lossy server: a slot behind by more is invalidated at
the next checkpoint that can remove its WAL."""


@dataclass(frozen=True)
class Server:
    dsn: str
    """libpq URL of the server's ``postgres`` database."""

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is cut, committed work survives."""
        bindir = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
        command = [f"{bindir}/pg_ctl", "-D", str(DIRECTORY / "data"), "-w", "-t", "60"]
        command += ["-l", str(DIRECTORY / "log"), "restart", "-m", "fast"]
        if os.geteuid() == 0:  # the cluster belongs to the postgres OS user
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, cwd="/tmp")


def throwaway(directory: Path, port: str, what: str) -> str:
    """The DSN of the throwaway cluster in ``directory``, started (or created) if needed."""
    if shutil.which("pg_config") is None:
        pytest.fail("pg_config is missing: scripts/ensure-postgres.sh installs PostgreSQL")
    env = dict(
        os.environ,
        ROWSYNC_PG_THROWAWAY="1",
        ROWSYNC_PG_DIR=str(directory),
        ROWSYNC_PG_PORT=port,
    )
    for name in ("ROWSYNC_TEST_DSN", "DATABASE_URL"):
        env.pop(name, None)
    result = subprocess.run(
        [str(ROOT / "scripts" / "ensure-postgres.sh")], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.fail(f"could not start {what} PostgreSQL server:\n{result.stderr}")
    return result.stdout.strip()


def fresh_database(server_dsn: str, prefix: str) -> Iterator[str]:
    """A fresh database on the server, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield sa.make_url(server_dsn).set(database=name).render_as_string(False)
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        # A replication slot in use keeps even a forced DROP DATABASE out; a temporary one
        # goes with its connection, which the server closes a moment after the client did.
        deadline = time.monotonic() + 30
        while (
            conn.execute(
                "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots"
                " WHERE database = %s AND active_pid IS NOT NULL",
                (name,),
            ).fetchone()
            != (0,)
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def restartable_server() -> Server:
    return Server(throwaway(DIRECTORY, PORT, "a restartable"))


@pytest.fixture
def restartable_dsn(restartable_server: Server) -> Iterator[str]:
    """A fresh database on the restartable server, dropped afterwards."""
    yield from fresh_database(restartable_server.dsn, "rowsync_restart")


@pytest.fixture(scope="session")
def logical_server() -> str:
    """The DSN of a server with ``wal_level = logical`` (never skipped: started if need be)."""
    dsn = throwaway(LOGICAL_DIRECTORY, LOGICAL_PORT, "a wal_level=logical")
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW wal_level").fetchone()
    if row is None or row[0] != "logical":
        pytest.fail(f"the throwaway server {dsn} runs with wal_level={row}, not logical")
    return dsn


@pytest.fixture(scope="session")
def lossy_server() -> str:
    """The DSN of a ``wal_level = logical`` server of its own whose slots keep at most
    :data:`LOSSY_KEEP` of WAL: a slot left behind is invalidated (``wal_status = 'lost'``).
    A server-wide setting, hence a server apart from the others, which must keep theirs."""
    dsn = throwaway(LOSSY_DIRECTORY, LOSSY_PORT, "a lossy wal_level=logical")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER SYSTEM SET max_slot_wal_keep_size = {}").format(sql.Literal(LOSSY_KEEP))
        )
        conn.execute("SELECT pg_reload_conf()")
    return dsn


@pytest.fixture
def lossy_dsn(lossy_server: str) -> Iterator[str]:
    """A fresh database on the lossy server, dropped afterwards."""
    yield from fresh_database(lossy_server, "rowsync_lost")


@pytest.fixture
def logical_dsn(logical_server: str) -> Iterator[str]:
    """A fresh database on the ``wal_level = logical`` server, dropped afterwards."""
    yield from fresh_database(logical_server, "rowsync_wal")


@pytest.fixture
def logical_engine(logical_dsn: str) -> Iterator[sa.Engine]:
    """A psycopg engine on a fresh database of the ``wal_level = logical`` server."""
    engine = sa.create_engine(sa.make_url(logical_dsn).set(drivername="postgresql+psycopg"))
    yield engine
    engine.dispose()
