"""Least privilege: once installed (by the schema owner), a listener role needs CONNECT,
SELECT on the watched tables and what install grants it; writers need nothing of rowsync's;
any other role (CONNECT only) can read, forge, freeze or erase nothing rowsync carries."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.orm import Session

import rowsync
from fixtures import reference_watchers
from models import Base, Person, Post
from rowsync import advisory, migrations, privileges


@pytest.fixture
def make_role(engine: sa.Engine) -> Iterator[Callable[[str], str]]:
    """``make_role(kind)``: a login role with CONNECT on the test database and nothing else
    (cluster-wide, so named per run); dropped at teardown."""
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    made: list[str] = []

    def make(kind: str) -> str:
        role = f"rowsync_{kind}_{os.getpid()}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            conn.execute(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                    sql.Identifier(engine.url.database or ""), sql.Identifier(role)
                )
            )
        made.append(role)
        return role

    yield make
    with psycopg.connect(url, autocommit=True) as conn:
        for role in made:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def roles(engine: sa.Engine, make_role: Callable[[str], str]) -> tuple[str, str]:
    """A listener role that may read the watched tables, a writer role that may change them."""
    reader, writer = make_role("reader"), make_role("writer")
    tables = sql.SQL(", ").join(sql.Identifier(t.name) for t in Base.metadata.sorted_tables)
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(tables, sql.Identifier(reader)))
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(
                tables, sql.Identifier(writer)
            )
        )
    return reader, writer


@pytest.fixture
def attacker(make_role: Callable[[str], str]) -> str:
    """A role with CONNECT and nothing else: no privilege on the watched tables or rowsync's."""
    return make_role("attacker")


def connect_as(engine: sa.Engine, role: str) -> psycopg.Connection[Any]:
    url = engine.url.set(drivername="postgresql", username=role)
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


MODES = [
    pytest.param({}, id="notify"),
    pytest.param({"capture": "durable", "consumer": "reader"}, id="durable"),
    pytest.param({"capture": "stream", "retention": 0}, id="stream"),
]


@pytest.mark.parametrize("mode", MODES)
def test_a_select_only_listener_receives_what_a_plain_writer_writes(schema, roles, mode):
    """In every mode: NOTIFY mode's overflow table, the log modes' log, saved positions and
    pruning all work for a listener that may only SELECT the watched tables."""
    reader, writer = roles
    watchers = reference_watchers() + rowsync.watchers(Post, extra_columns=["body"])
    owner = rowsync.RowSync(schema, watchers, **mode)
    owner.install(listener_roles=[reader])  # as the owner, once
    assert owner.status(listener_roles=[reader]).privileges == []
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


# -- what a role with CONNECT only can do: nothing -----------------------------------------

WITH_BODY = reference_watchers() + rowsync.watchers(Post, extra_columns=["body"])
"""Posts' events carry their body: a long one is parked in the overflow table."""


@pytest.mark.parametrize("table", ["log", "overflow", "cursors", "log_pruned", "migrations"])
def test_another_role_reads_no_identifier_history(schema, attacker, table) -> None:
    """The log and the parked events name rows the role may not read (tenant ids, emails
    given as extra columns); the saved positions are someone else's."""
    rs = rowsync.RowSync(schema, reference_watchers(), capture="durable", consumer="worker")
    rs.install()
    with rs:
        write_as(schema, "postgres", Post(id=1, name="secret tenant's post"))
        rs.flush()
    with connect_as(schema, attacker) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier("rowsync", table)))


def test_another_role_cannot_attach_a_trigger_function_to_its_own_table(schema, attacker) -> None:
    """Attached to a temp table of its own, a trigger function would forge rows in the log."""
    rs = rowsync.RowSync(schema, reference_watchers(), capture="durable")
    rs.install()
    function = sql.Identifier("rowsync", rs.triggers[0].function)
    with connect_as(schema, attacker) as conn:
        conn.execute("CREATE TEMP TABLE forged (id int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER t AFTER INSERT ON forged FOR EACH ROW EXECUTE FUNCTION {}()"
                ).format(function)
            )
    with rs.connect() as conn:
        assert conn.execute("SELECT count(*) FROM rowsync.log").fetchone() == (0,)


def test_a_trigger_function_refuses_any_table_but_its_own(schema) -> None:
    """Even attached by a role that may (the owner), a function serves only its table."""
    rs = rowsync.RowSync(schema, reference_watchers(), capture="durable")
    rs.install()
    function = sql.Identifier("rowsync", rs.triggers[0].function)
    with rs.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE elsewhere (id int)")
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER t AFTER INSERT ON elsewhere FOR EACH ROW EXECUTE FUNCTION {}()"
            ).format(function)
        )
        with pytest.raises(psycopg.errors.RaiseException, match="serves"):
            conn.execute("INSERT INTO elsewhere VALUES (1)")
        assert conn.execute("SELECT count(*) FROM rowsync.log").fetchone() == (0,)


def test_another_role_cannot_prune_and_a_listener_role_prunes_no_younger_than_the_retention(
    schema, roles, attacker
) -> None:
    reader, _ = roles
    rs = rowsync.RowSync(schema, reference_watchers(), capture="durable")
    rs.install(listener_roles=[reader])  # the default retention: an hour
    write_as(schema, "postgres", Post(id=1))
    with connect_as(schema, attacker) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT rowsync.prune_log('0 s')")
    with connect_as(schema, reader) as conn:
        assert conn.execute("SELECT rowsync.prune_log('0 s')").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM rowsync.log").fetchone() == (1,)


def test_a_prune_that_passes_a_running_listener_is_announced(schema, roles) -> None:
    """Rows committed but not yet read, pruned under the listener: it says so (a Resync)."""
    reader, _ = roles
    owner = rowsync.RowSync(schema, reference_watchers(), retention=0, capture="stream")
    owner.install(listener_roles=[reader])
    as_reader = sa.create_engine(schema.url.set(username=reader))
    # The listener reads only when a flush wakes it up, and never prunes by itself.
    rs = rowsync.RowSync(
        as_reader, reference_watchers(), retention=0, poll_interval=3600, capture="stream"
    )
    assert rs.listener.log is not None
    rs.listener.log.prune_interval = 3600
    try:
        with rs, rs.subscribe(Post) as sub:
            rs.flush()
            write_as(schema, "postgres", Post(id=1), Post(id=2))
            with connect_as(schema, reader) as conn:
                assert conn.execute("SELECT rowsync.prune_log('0 s')").fetchone() == (2,)
            rs.flush()
            assert [kind for kind, _ in sub.drain()] == [rowsync.Resync]
            assert rs.listener.stats["gaps"] == 1
    finally:
        as_reader.dispose()


def test_a_saved_position_can_be_moved_only_by_the_role_that_saved_it(
    schema, roles, attacker, make_role
) -> None:
    reader, _ = roles
    other_listener = make_role("other_listener")
    rowsync.RowSync(schema, reference_watchers(), capture="durable").install(
        listener_roles=[reader, other_listener]
    )
    as_reader = sa.create_engine(schema.url.set(username=reader))
    try:
        with rowsync.RowSync(as_reader, reference_watchers(), capture="durable", consumer="worker"):
            pass  # saves its position on stop
    finally:
        as_reader.dispose()
    future = "SELECT rowsync.save_cursor('worker', pg_current_snapshot())"
    with connect_as(schema, attacker) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(future)
    with connect_as(schema, other_listener) as conn:
        before = conn.execute("SELECT last_read::text FROM rowsync.cursors").fetchall()
        conn.execute("SELECT txid_current()")  # the position would move past this
        assert conn.execute(future).fetchone() == (False,)
        assert conn.execute("SELECT last_read::text FROM rowsync.cursors").fetchall() == before


def test_another_role_cannot_park_or_take_refs_and_oversized_writes_succeed(
    schema, roles, attacker
) -> None:
    reader, writer = roles
    rowsync.RowSync(schema, WITH_BODY).install(listener_roles=[reader])
    with connect_as(schema, attacker) as conn:
        for query in (
            "SELECT nextval('rowsync.ref_seq')",
            "SELECT rowsync.park(1000, 'x')",
            "INSERT INTO rowsync.overflow (ref, payload) VALUES (1000, 'x')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(query)
    as_reader = sa.create_engine(schema.url.set(username=reader))
    rs = rowsync.RowSync(as_reader, WITH_BODY)
    try:
        with rs, rs.subscribe(Post) as sub:
            write_as(schema, writer, Post(id=1, body="x" * 9000))  # parked, as the owner
            rs.flush()
            assert [(c.event, c.ids["id"]) for _, c in sub.drain()] == [("inserted", 1)]
    finally:
        as_reader.dispose()


def test_an_overflow_reference_is_honoured_only_if_a_trigger_parked_it(schema, attacker) -> None:
    """Anyone may NOTIFY: a forged reference is dropped and counted, no one resyncs. (Refs
    5 and 6 are issued already, so the seal is what gives them away; a ref out of range is
    malformed.)"""
    rs = rowsync.RowSync(schema, WITH_BODY)
    rs.install()
    with connect_as(schema, "postgres") as conn:
        conn.execute("SELECT setval('rowsync.ref_seq', 100)")
    with rs, rs.subscribe(Post) as sub:
        with connect_as(schema, attacker) as conn:
            for forged in (
                {"r": 5, "x": True},
                {"r": 6, "x": True, "k": "0" * 64},
                {"r": 10**30, "x": True, "k": "0" * 64},
            ):
                conn.execute("SELECT pg_notify('rowsync', %s)", (json.dumps(forged),))
        write_as(schema, "postgres", Post(id=1, body="x" * 9000))  # a genuine one
        rs.flush()
        assert [(kind, c.ids["id"]) for kind, c in sub.drain()] == [(rowsync.Sync, 1)]
    assert rs.listener.stats["overflow_forged"] == 2
    assert rs.listener.stats["malformed"] == 1
    assert rs.listener.stats["gaps"] == 0


def test_another_role_can_neither_seal_nor_check_a_seal(schema, attacker) -> None:
    """Sealing is the triggers' (as the owner); checking is a listener role's: a role that
    could compute seals could forge the values before an update."""
    rowsync.RowSync(schema, reference_watchers()).install()
    with connect_as(schema, attacker) as conn:
        for query in (
            "SELECT rowsync.seal('{}'::text)",
            "SELECT rowsync.seal(1::bigint)",
            "SELECT rowsync.sealed(ARRAY['{}'], ARRAY['0'])",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(query)


def moves(roles: tuple[str, str], schema: sa.Engine, **options: Any) -> list[list[Any]]:
    """What the subscribers of person 1 (whom post 20 leaves) and of person 2 (whom it joins)
    receive when a writer moves it, as a listener connected as the reader role."""
    reader, writer = roles
    as_reader = sa.create_engine(schema.url.set(username=reader))
    as_writer = sa.create_engine(schema.url.set(username=writer))
    rs = rowsync.RowSync(as_reader, reference_watchers(), **options)
    try:
        with Session(as_writer) as session, session.begin():
            session.add_all([Person(id=1), Person(id=2)])
            session.flush()
            session.add(Post(id=20, person_id=1))
        with rs:
            subs = [rs.subscribe(Post, person_id=1), rs.subscribe(Post, person_id=2)]
            with Session(as_writer) as session, session.begin():
                session.execute(sa.update(Post).where(Post.id == 20).values(person_id=2))
            rs.flush()
            got = [
                [(repr(kind), getattr(info, "event", None)) for kind, info in sub.drain()]
                for sub in subs
            ]
            return [got, [rs.listener.stats[k] for k in ("unsealed", "seals_unchecked")]]
    finally:
        as_reader.dispose()
        as_writer.dispose()


def test_an_install_upgrades_a_database_of_the_previous_migration(
    schema, roles, monkeypatch
) -> None:
    """A database installed before updates were sealed: status finds its schema out of date,
    an install (given no listener role) upgrades it, parked events sealed before keep their
    seal, the listener role installed before may check seals, and moves reach the
    subscribers of the parent their row leaves."""
    reader, _ = roles
    owner = rowsync.RowSync(schema, reference_watchers())
    previous = [(v, text) for v, text in migrations.migration_files() if v < "0005"]
    with monkeypatch.context() as before:
        before.setattr(migrations, "migration_files", lambda: previous)
        before.setattr(
            privileges, "LISTENER", tuple(g for g in privileges.LISTENER if g.name != "sealed")
        )
        owner.install(listener_roles=[reader])
    with connect_as(schema, "postgres") as conn:
        parked_seal = conn.execute("SELECT rowsync.seal(42::bigint)").fetchone()
    assert not owner.status().schema_ready

    owner.install()

    assert owner.status(listener_roles=[reader]).ok
    with connect_as(schema, "postgres") as conn:
        assert conn.execute("SELECT rowsync.seal(42::bigint)").fetchone() == parked_seal
    moved = [("rowsync.Sync", "updated")]
    assert moves(roles, schema) == [[moved, moved], [0, 0]]


def test_a_listener_role_that_may_not_check_seals_announces_the_moves_it_cannot_route(
    schema, roles
) -> None:
    """The move still reaches the parent its row joins; the subscribers of the one it leaves
    may have missed it, and are told so."""
    reader, _ = roles
    rowsync.RowSync(schema, reference_watchers()).install(listener_roles=[reader])
    with connect_as(schema, "postgres") as conn:
        conn.execute(
            sql.SQL("REVOKE EXECUTE ON FUNCTION rowsync.sealed(text[], text[]) FROM {}").format(
                sql.Identifier(reader)
            )
        )
    [left, joined], stats = moves(roles, schema)
    assert left == [("rowsync.Resync", None)]
    assert joined == [("rowsync.Resync", None), ("rowsync.Sync", "updated")]
    assert stats == [0, 1]


def test_a_parked_event_larger_than_the_listener_holds_is_announced_not_read(schema) -> None:
    rs = rowsync.RowSync(schema, WITH_BODY)
    rs.install()
    rs.listener.max_parked = 20_000
    with rs, rs.subscribe(Post) as sub:
        write_as(schema, "postgres", Post(id=1, body="x" * 9000), Post(id=2, body="x" * 30_000))
        rs.flush()
        messages = sub.drain()
    assert [kind for kind, _ in messages] == [rowsync.Resync, rowsync.Sync]
    assert messages[1][1].ids["id"] == 1
    assert rs.listener.stats["overflow_too_large"] == 1


def test_holding_rowsyncs_old_prune_lock_does_not_stop_pruning(schema, roles, attacker) -> None:
    """Advisory locks are anyone's: pruning takes turns through a row lock of its own."""
    reader, _ = roles
    rowsync.RowSync(schema, reference_watchers(), capture="durable", retention=0).install(
        listener_roles=[reader]
    )
    write_as(schema, "postgres", Post(id=1))
    with connect_as(schema, attacker) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext('rowsync prune ' || 'rowsync'))")
        with connect_as(schema, reader) as conn:
            assert conn.execute("SELECT rowsync.prune_log('0 s')").fetchone() == (1,)


def test_a_session_squatting_the_install_lock_is_named_after_a_bounded_wait(
    schema, attacker
) -> None:
    """Advisory locks are anyone's (the key follows from the schema's name): install and
    uninstall wait for theirs at most ``lock_timeout``, then fail naming the session that holds
    it, having changed nothing."""
    rs = rowsync.RowSync(schema, reference_watchers())
    with connect_as(schema, attacker) as squatter:
        squatter.execute("SET application_name = 'squatter'")
        squatter.execute("SELECT pg_advisory_lock(%s)", (advisory.key("rowsync install rowsync"),))
        pid = squatter.info.backend_pid
        named = rf"held by pid {pid} \(role '{attacker}', application_name 'squatter'\)"
        with pytest.raises(psycopg.errors.LockNotAvailable, match=named):
            rs.install(lock_timeout=0.2)
        assert not rs.status().schema_ready
        with pytest.raises(psycopg.errors.LockNotAvailable, match=named):
            rs.uninstall(lock_timeout=0.2)
    rs.install(lock_timeout=0.2)  # the squatter gone
    assert rs.status().ok


def test_the_install_script_restores_the_transactions_lock_timeout(schema) -> None:
    """A migration's own ``lock_timeout`` applies again once the script has its lock."""
    rs = rowsync.RowSync(schema, reference_watchers())
    with rs.connect() as conn, conn.transaction():
        conn.execute("SET LOCAL lock_timeout = '7s'")
        conn.execute(rs.sql())
        assert conn.execute("SHOW lock_timeout").fetchone() == ("7s",)
    assert rs.status().ok


def test_status_reports_what_public_holds_and_what_a_listener_role_lacks(schema, roles) -> None:
    reader, _ = roles
    rs = rowsync.RowSync(schema, reference_watchers(), capture="durable")
    rs.install()
    assert rs.status(listener_roles=[]).ok
    lacking = rs.status(listener_roles=[reader]).privileges
    assert f'listener role {reader!r} lacks EXECUTE on function "rowsync"."parked"' in "\n".join(
        lacking
    )
    with rs.connect(autocommit=True) as conn:
        conn.execute("GRANT SELECT ON rowsync.log TO PUBLIC")
    assert "PUBLIC may SELECT relation rowsync.log" in rs.status(listener_roles=[]).privileges
    rs.install(listener_roles=[reader])
    assert rs.status(listener_roles=[reader]).privileges == [
        "PUBLIC may SELECT relation rowsync.log"  # install does not undo a deliberate grant
    ]


def test_a_listener_role_without_its_grants_is_told_so_at_start(schema, roles, caplog) -> None:
    reader, _ = roles
    rowsync.RowSync(schema, reference_watchers()).install()  # no listener role named
    as_reader = sa.create_engine(schema.url.set(username=reader))
    try:
        with (
            caplog.at_level("WARNING", logger="rowsync"),
            rowsync.RowSync(as_reader, reference_watchers()),
        ):
            pass
    finally:
        as_reader.dispose()
    assert "run `rowsync install --listener-role ROLE` as the owner" in caplog.text


def write_as(engine: sa.Engine, role: str, *rows: Any) -> None:
    """Commit ``rows`` in one transaction, as ``role``."""
    as_role = sa.create_engine(engine.url.set(username=role))
    try:
        with Session(as_role) as session, session.begin():
            session.add_all(rows)
    finally:
        as_role.dispose()
