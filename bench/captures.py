"""The write-side configurations that rows 1-4 compare, each on its own copy of the schema
(``models.schema(suffix)``) in one database, so they can be measured turn by turn:

* ``none``: no trigger at all;
* ``pg_notify(id)``: the minimal hand-written trigger of issue 6,
  ``AFTER UPDATE ... FOR EACH ROW ... PERFORM pg_notify(channel, NEW.id::text)``;
* ``log insert`` (row 3 only): ``... INSERT INTO bench_log (id) VALUES (NEW.id)``, the floor
  of a change-log capture;
* ``rowsync <mode>``: rowsync's own capture, for every mode this ``RowSync`` accepts:
  ``capture="notify"`` (the default), ``capture="durable"`` and ``capture="stream"``. Modes are
  taken from ``rowsync.app.CAPTURES``, so the benchmarks follow the library as it grows;
  ``capture="wal"`` needs a ``wal_level = logical`` server, and only ``bench_wal.py`` asks
  for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from psycopg import sql

import rowsync
from models import Schema, populate, schema
from rowsync.app import CAPTURES

NONE = "none"
MINIMAL = "pg_notify(id)"
LOG_INSERT = "log insert"
"""A hand-written trigger appending the row's id to a bare table (no index, no JSON): what
any per-row change-log capture costs at the least (row 3's context for capture="stream")."""


def modes(names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """rowsync's capture modes ``names`` (default: every mode this version offers but
    ``wal``, which needs a ``wal_level = logical`` server), with the ``RowSync`` keywords for
    each."""
    wanted = [m for m in CAPTURES if m != "wal"] if names is None else names
    unknown = set(wanted) - set(CAPTURES)
    if unknown:
        raise ValueError(f"no capture mode {sorted(unknown)}; rowsync offers {CAPTURES}")
    return {mode: ({} if mode == "notify" else {"capture": mode}) for mode in wanted}


@dataclass(frozen=True)
class Capture:
    """One configuration: its tables and how changes leave them."""

    name: str
    """``none``, ``pg_notify(id)`` or a rowsync mode (``notify``, ``durable``, ``stream``)."""
    suffix: str
    schema: Schema
    options: dict[str, Any] | None = field(default=None)
    """``RowSync`` keywords of a rowsync mode; None for the other configurations."""

    @property
    def label(self) -> str:
        return self.name if self.options is None else f"rowsync {self.name}"

    @property
    def channel(self) -> str:
        """Where this configuration's notifications go (the minimal trigger's, or rowsync's)."""
        return f"bench{self.suffix}"

    def rowsync(self, engine: sa.Engine, **more: Any) -> rowsync.RowSync:
        """A RowSync for this mode's tables, with a schema and channel of its own."""
        assert self.options is not None, f"{self.name} is not a rowsync mode"
        return rowsync.RowSync(
            engine,
            rowsync.watchers(self.schema.person, ["posts"]),
            schema=f"rowsync{self.suffix}",
            channel=self.channel,
            **self.options,
            **more,
        )


def setup(
    engine: sa.Engine,
    persons: int,
    posts_per_person: int,
    *,
    baselines: tuple[str, ...] = (NONE, MINIMAL),
    rowsync_modes: Sequence[str] | None = None,
) -> list[Capture]:
    """Create and fill one copy of the schema per configuration and install its trigger (or
    rowsync's capture, for each of ``rowsync_modes``: see :func:`modes`)."""
    captures = [Capture(name, f"_{i}", schema(f"_{i}")) for i, name in enumerate(baselines)]
    offset = len(captures)
    captures += [
        Capture(name, f"_{offset + i}", schema(f"_{offset + i}"), options)
        for i, (name, options) in enumerate(modes(rowsync_modes).items())
    ]
    for capture in captures:
        populate(engine, capture.schema, persons, posts_per_person)
        if capture.name == MINIMAL:
            install_minimal(engine, capture)
        elif capture.name == LOG_INSERT:
            install_log_insert(engine, capture)
        elif capture.options is not None:
            capture.rowsync(engine).install()
    return captures


def install_minimal(engine: sa.Engine, capture: Capture) -> None:
    """The hand-written baseline: one ``pg_notify`` of the row's id per updated row."""
    _install_trigger(
        engine,
        capture,
        sql.SQL("PERFORM pg_notify({}, NEW.id::text);").format(sql.Literal(capture.channel)),
    )


def install_log_insert(engine: sa.Engine, capture: Capture) -> None:
    """The floor of a change-log capture: the row's id appended to a bare table."""
    log = sql.Identifier(f"bench_log{capture.suffix}")
    _install_trigger(
        engine,
        capture,
        sql.SQL("INSERT INTO {} (id) VALUES (NEW.id);").format(log),
        sql.SQL("CREATE TABLE {} (id bigint NOT NULL);").format(log),
    )


def _install_trigger(
    engine: sa.Engine, capture: Capture, statement: sql.Composed, before: sql.Composed | None = None
) -> None:
    function = sql.Identifier(f"bench_trigger{capture.suffix}")
    ddl = sql.SQL(
        "{before} CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS {body};"
        " CREATE TRIGGER {trigger} AFTER UPDATE ON {table}"
        " FOR EACH ROW EXECUTE FUNCTION {function}();"
    ).format(
        before=before or sql.SQL(""),
        function=function,
        body=sql.Literal(f"BEGIN {statement.as_string()} RETURN NULL; END"),
        trigger=sql.Identifier(f"bench_trigger{capture.suffix}"),
        table=sql.Identifier(capture.schema.posts.name),
    )
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            cur.execute(ddl.as_string())
        raw.commit()
    finally:
        raw.close()


def vacuum(engine: sa.Engine, captures: list[Capture]) -> None:
    """VACUUM ANALYZE every configuration's posts, so each round starts alike (and autovacuum
    has nothing to do in the middle of one)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for capture in captures:
            conn.exec_driver_sql(
                sql.SQL("VACUUM ANALYZE {}")
                .format(sql.Identifier(capture.schema.posts.name))
                .as_string()
            )
