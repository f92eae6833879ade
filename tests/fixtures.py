"""Fixtures for tests that run rowsync against the reference schema (tests/models.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import rowsync
from models import Base, Person, Post, Tag
from rowsync import RowSync
from rowsync.app import CAPTURES, Capture
from rowsync.listener import APPLICATION_NAME

ALL_ASSOCS: list[Any] = [
    "profile",
    "other_posts",
    "test_posts",
    "bad_posts",
    "all_tags",
    "favourite_people",
    {"posts": ["tags", "test_tags", "labels", "post_tags", "person", "other_person"]},
]


def reference_watchers() -> list[rowsync.Watcher]:
    """Watchers covering every table and relationship of the reference schema."""
    return (
        rowsync.watchers(Person, ALL_ASSOCS)
        + rowsync.watchers(Post, ["tags", "labels"])
        + rowsync.watchers(Tag)
    )


@pytest.fixture
def moded_engine(request: pytest.FixtureRequest) -> sa.Engine:
    """This test's fresh, empty database: on the shared server, or on the ``wal_level =
    logical`` one for a test run with ``capture="wal"``. A test run in several modes takes
    this (or :func:`schema`), not ``engine`` or ``dsn``, which are on the shared server."""
    engine: sa.Engine = request.getfixturevalue(
        "logical_engine" if capture_of(request) == "wal" else "engine"
    )
    return engine


@pytest.fixture
def schema(moded_engine: sa.Engine) -> sa.Engine:
    """The reference schema's tables, created in this test's fresh database."""
    Base.metadata.create_all(moded_engine)
    return moded_engine


@pytest.fixture
def sessions(schema: sa.Engine) -> sessionmaker[Session]:
    """Sessions that keep their objects readable after commit, like a web request's."""
    return sessionmaker(schema, expire_on_commit=False)


TRIGGERED = [c for c in CAPTURES if c != "wal"]
"""The modes whose capture is a trigger in the writer's transaction (not ``"wal"``): for tests
of the triggers themselves, of NOTIFY payloads, of the change log or of ``announce()``."""


@pytest.fixture(params=CAPTURES)
def capture(request: pytest.FixtureRequest) -> Capture:
    """The capture mode a test runs in, once per mode of ``rowsync.app.CAPTURES``;
    ``@pytest.mark.parametrize("capture", [...])`` picks some. :func:`schema` follows it
    (``"wal"`` needs the logical server)."""
    return request.param  # type: ignore[no-any-return]


def capture_of(request: pytest.FixtureRequest) -> str:
    """The mode this test runs in: its ``capture`` parameter, or the default one."""
    if "capture" in request.fixturenames:
        return str(request.getfixturevalue("capture"))
    return "notify"


@pytest.fixture
def moded(schema: sa.Engine, capture: Capture) -> Iterator[RowSync]:
    """A started RowSync for the reference schema, once per capture mode."""
    instance = RowSync(schema, reference_watchers(), capture=capture)
    instance.install()
    with instance:
        yield instance


@pytest.fixture
def rs(schema: sa.Engine) -> Iterator[RowSync]:
    """A started RowSync with triggers installed for the whole reference schema."""
    instance = RowSync(schema, reference_watchers())
    instance.install()
    with instance:
        yield instance


@pytest.fixture
def write(sessions: sessionmaker[Session]) -> Callable[..., None]:
    """Run statements or add objects in one committed transaction, on its own connection."""
    return writer(sessions)


def writer(factory: sessionmaker[Session]) -> Callable[..., None]:
    def run(*items: Any) -> None:
        with factory() as session, session.begin():
            for item in items:
                if isinstance(item, sa.Executable):
                    session.execute(item)
                else:
                    session.add(item)
                    session.flush()

    return run


def apply_all(
    rs: RowSync,
    sub: rowsync.Subscription,
    value: Any,
    timeout: float = 5.0,
    preloads: dict[Any, Any] | None = None,
) -> Any:
    """Flush the listener, then apply every queued message to ``value``."""
    rs.flush(timeout)
    for message in sub.drain():
        value = rs.sync(value, message, preloads)
    return value


def messages(rs: RowSync, sub: rowsync.Subscription, timeout: float = 5.0) -> list[Any]:
    """Flush the listener, then take every message queued for ``sub`` (without applying them)."""
    rs.flush(timeout)
    return sub.drain()


def sync_each(rs: RowSync, value: Any, msgs: Iterable[Any]) -> Any:
    """Apply ``msgs`` to ``value`` in the given order."""
    for message in msgs:
        value = rs.sync(value, message)
    return value


@contextmanager
def counting_queries(engine: sa.Engine) -> Iterator[list[str]]:
    """The SQL statements ``engine`` sends while the block runs, from any thread."""
    statements: list[str] = []

    def record(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        statements.append(statement)  # list.append is atomic: safe from several threads

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def returning(call: Callable[[], Any], limit: float = 60.0) -> Any:
    """``call()``'s result, failing (instead of hanging the suite) if it never returns.

    A guard against infinite loops, not a performance assertion: ``limit`` is generous.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        pytest.fail(f"call did not return within {limit} s (infinite loop?)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def terminate_listener(rs: RowSync) -> None:
    """Kill the listener's backend (it reconnects by itself): a lost connection, on demand."""
    with rs.connect(autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            (APPLICATION_NAME,),
        )


def db_triggers(engine: sa.Engine) -> dict[tuple[str, str, str], str]:
    """Every user trigger: ``(schema, table, trigger) -> comment`` (``""`` if none)."""
    query = sa.text(
        "SELECT n.nspname, c.relname, t.tgname, coalesce(obj_description(t.oid, 'pg_trigger'), '')"
        " FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT t.tgisinternal"
    )
    with engine.connect() as conn:
        return {(s, t, n): comment for s, t, n, comment in conn.execute(query)}


def db_functions(engine: sa.Engine, schema: str = "rowsync") -> set[str]:
    """Names of the trigger functions in ``schema`` (not rowsync's own helpers, like park)."""
    query = sa.text(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = :s AND p.prorettype = 'trigger'::regtype"
    )
    with engine.connect() as conn:
        return set(conn.scalars(query, {"s": schema}))


@pytest.fixture
def write_to() -> Callable[[sa.Engine], Any]:
    """``write_to(engine)``: a ``write`` for a schema of a test's own (``.sessions`` too)."""

    def make(engine: sa.Engine) -> Any:
        factory = sessionmaker(engine, expire_on_commit=False)
        run = writer(factory)
        run.sessions = factory  # type: ignore[attr-defined]
        return run

    return make
