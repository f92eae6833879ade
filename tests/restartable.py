"""A PostgreSQL server of the tests' own, which they may restart.

The shared server must never be restarted under other test runs, so tests that restart
Postgres get a throwaway cluster (``scripts/ensure-postgres.sh`` with
``ROWSYNC_PG_THROWAWAY=1`` on a port and directory of its own; created once, reused).
"""

from __future__ import annotations

import os
import shutil
import subprocess
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


@pytest.fixture(scope="session")
def restartable_server() -> Server:
    if shutil.which("pg_config") is None:
        pytest.fail("pg_config is missing: scripts/ensure-postgres.sh installs PostgreSQL")
    env = dict(
        os.environ,
        ROWSYNC_PG_THROWAWAY="1",
        ROWSYNC_PG_DIR=str(DIRECTORY),
        ROWSYNC_PG_PORT=PORT,
    )
    for name in ("ROWSYNC_TEST_DSN", "DATABASE_URL"):
        env.pop(name, None)
    result = subprocess.run(
        [str(ROOT / "scripts" / "ensure-postgres.sh")], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.fail(f"could not start a restartable PostgreSQL server:\n{result.stderr}")
    return Server(result.stdout.strip())


@pytest.fixture
def restartable_dsn(restartable_server: Server) -> Iterator[str]:
    """A fresh database on the restartable server, dropped afterwards."""
    name = f"rowsync_restart_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(restartable_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield sa.make_url(restartable_server.dsn).set(database=name).render_as_string(False)
    with psycopg.connect(restartable_server.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
