"""rowsync's own schema: versioned SQL files from ``migrations/``, applied in order, once."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

logger = logging.getLogger(__name__)


def migration_files() -> list[tuple[str, str]]:
    """``(version, text)`` of every migration, oldest first.

    In a wheel the files are inside the package; in a checkout they sit beside it.
    """
    packaged = resources.files("rowsync").joinpath("migrations")
    folder = packaged if packaged.is_dir() else Path(__file__).parent.parent / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in files]


def dollar_tag(text: str) -> str:
    """A dollar-quote tag (``$rowsync$``, ``$rowsync1$``…) that ``text`` does not contain, so
    ``tag + text + tag`` is a string constant whatever ``text`` holds."""
    tag, n = "$rowsync$", 0
    while tag in text:
        n += 1
        tag = f"$rowsync{n}$"
    return tag


def render(text: str, schema: str) -> sql.Composed:
    """``{schema}`` becomes the quoted identifier, ``{schema_name}`` the name as a literal.

    Function bodies are written between ``$$`` in the files; they are quoted with a dollar
    tag the schema's name does not contain, so no name can end a body early.
    """
    return sql.SQL(text.replace("$$", dollar_tag(schema))).format(
        schema=sql.Identifier(schema), schema_name=sql.Literal(schema)
    )


def migrate(conn: psycopg.Connection[TupleRow], schema: str) -> list[str]:
    """Apply the migrations ``schema`` lacks, inside the caller's transaction; return their
    versions."""
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.migrations"
            " (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        ).format(sql.Identifier(schema))
    )
    done = {
        row[0]
        for row in conn.execute(
            sql.SQL("SELECT version FROM {}.migrations").format(sql.Identifier(schema))
        )
    }
    applied = []
    for version, text in migration_files():
        if version in done:
            continue
        logger.info("applying rowsync migration %s to schema %s", version, schema)
        conn.execute(render(text, schema))
        conn.execute(
            sql.SQL("INSERT INTO {}.migrations (version) VALUES ({})").format(
                sql.Identifier(schema), sql.Literal(version)
            )
        )
        applied.append(version)
    return applied


def pending_sql(schema: str) -> list[sql.Composed]:
    """Every migration as composed SQL, for ``rowsync sql`` and Alembic revisions.

    Like :func:`migrate`, each runs only if ``<schema>.migrations`` lacks it and is recorded
    there, so the script leaves the schema as ``install()`` does (``status`` finds it ready)
    and running it again changes nothing.
    """
    ident = sql.Identifier(schema)
    steps = [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.migrations"
            " (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        ).format(ident),
    ]
    for version, text in migration_files():
        body = sql.SQL(
            "BEGIN IF NOT EXISTS (SELECT FROM {schema}.migrations WHERE version = {version}) THEN"
            " EXECUTE {text}; INSERT INTO {schema}.migrations (version) VALUES ({version});"
            " END IF; END"
        ).format(
            schema=ident,
            version=sql.Literal(version),
            text=sql.Literal(render(text, schema).as_string()),
        )
        steps.append(sql.SQL("DO {}").format(sql.Literal(body.as_string())))
    return steps
