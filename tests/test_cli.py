"""The ``rowsync`` command, run in-process (``main([...])``) and as ``python -m rowsync``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from fixtures import reference_watchers
from models import Person, Post, Tag
from rowsync import RowSync
from rowsync.alembic import install_text
from rowsync.cli import main

APP = ["--app", "cli_app:watchers"]
TESTS = Path(__file__).parent
TRIGGERS = len(RowSync("postgresql://localhost/unused", reference_watchers()).triggers)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def python_m_rowsync(*argv: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    env.pop("DATABASE_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "rowsync", *argv],
        env=env,
        cwd=TESTS.parent,
        text=True,
        **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs},
    )


def stderr_until_listening(proc: subprocess.Popen[str]) -> str:
    """What ``listen`` wrote on stderr up to its "listening on" line (or its exit)."""
    assert proc.stderr is not None
    lines = []
    while line := proc.stderr.readline():
        lines.append(line)
        if "listening on" in line:
            break
    return "".join(lines)


def counts(out: str) -> dict[str, int]:
    return {
        m[1]: int(m[2])
        for m in re.finditer(r"^  (installed|outdated|missing|orphaned) +(\d+)$", out, re.M)
    }


# -- sql -------------------------------------------------------------------------------------


def test_sql_prints_the_install_ddl_with_quoted_identifiers_without_a_database(capsys, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    code, out, err = run(capsys, *APP, "sql")
    assert code == 0, err
    assert re.search(
        r'CREATE OR REPLACE TRIGGER "rowsync_ins_posts_\w+" AFTER INSERT ON "public"."posts"', out
    )
    assert 'CREATE OR REPLACE FUNCTION "rowsync"."rowsync_' in out
    assert out == install_text(reference_watchers())


def test_sql_channel_and_schema_options_reach_the_ddl(capsys):
    code, out, _ = run(capsys, *APP, "sql", "--channel", "other", "--schema", "my schema")
    assert code == 0
    assert 'CREATE SCHEMA IF NOT EXISTS "my schema"' in out
    assert "pg_notify('other'" in out


@pytest.mark.parametrize(
    ("capture", "writes_the_log", "notifies"),
    [("notify", False, True), ("durable", True, True), ("stream", True, False)],
)
def test_sql_capture_option_picks_the_triggers_of_that_mode(
    capsys, capture, writes_the_log, notifies
):
    code, out, err = run(capsys, *APP, "sql", "--capture", capture)
    assert code == 0, err
    assert out == install_text(reference_watchers(), capture=capture)
    assert ('INSERT INTO "rowsync"."log"' in out) is writes_the_log
    assert ("PERFORM pg_notify(" in out) is notifies


def test_sql_for_wal_capture_creates_no_trigger(capsys):
    code, out, err = run(capsys, *APP, "sql", "--capture", "wal")
    assert code == 0, err
    assert "CREATE OR REPLACE TRIGGER" not in out


def test_sql_alembic_prints_a_revision_body_that_compiles(capsys):
    code, out, _ = run(capsys, *APP, "sql", "--alembic")
    assert code == 0
    compile(out, "revision.py", "exec")
    assert "def upgrade() -> None:" in out and "def downgrade() -> None:" in out
    assert "op.execute(verbatim(ROWSYNC_INSTALL))" in out


# -- install / status / uninstall --------------------------------------------------------------


def test_status_exits_1_before_install_and_0_after(schema, dsn, capsys):
    code, out, _ = run(capsys, *APP, "--dsn", dsn, "status")
    assert code == 1
    assert counts(out) == {"installed": 0, "outdated": 0, "missing": TRIGGERS, "orphaned": 0}
    assert "  tables     ready\n" in out
    assert "drift: run `rowsync install`" in out

    assert run(capsys, *APP, "--dsn", dsn, "install")[0] == 0

    code, out, _ = run(capsys, *APP, "--dsn", dsn, "status")
    assert code == 0
    assert counts(out) == {"installed": TRIGGERS, "outdated": 0, "missing": 0, "orphaned": 0}
    assert re.search(r"^    public\.posts  rowsync_ins_posts_\w+$", out, re.M)
    assert "ok: the database matches the watchers" in out


def test_status_without_the_watched_tables_says_to_create_them_and_install_refuses(dsn, capsys):
    """Triggers cannot be created on tables that do not exist: ``status`` names the tables
    (not only the triggers) and ``install`` refuses, naming them, before changing anything."""
    tables = sorted({(w.schema, w.table) for w in reference_watchers()})
    code, out, _ = run(capsys, *APP, "--dsn", dsn, "status")
    assert code == 1
    assert re.search(rf"^  tables     {len(tables)} missing$", out, re.M), out
    for schema, table in tables:
        assert re.search(rf"^    {schema}\.{table}$", out, re.M)
    assert out.endswith(
        "drift: create the missing tables (your migrations), then run `rowsync install`\n"
    )

    code, _, err = run(capsys, *APP, "--dsn", dsn, "install")
    assert code == 2
    assert err.startswith("rowsync: error: configuration: the watched tables do not exist: ")
    assert "public.persons" in err and len(err.splitlines()) == 1
    with psycopg.connect(dsn) as conn:  # nothing was installed, not even rowsync's schema
        assert conn.execute("SELECT to_regnamespace('rowsync')").fetchone() == (None,)


def test_status_checks_a_listener_role_that_install_grants(schema, dsn, capsys):
    role = f"rowsync_cli_listener_{os.getpid()}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    try:
        assert run(capsys, *APP, "--dsn", dsn, "install")[0] == 0
        code, out, _ = run(capsys, *APP, "--dsn", dsn, "status", "--listener-role", role)
        assert code == 1
        assert f'listener role \'{role}\' lacks SELECT on table "rowsync"."log"' in out
        assert "--listener-role ROLE" in out
        assert run(capsys, *APP, "--dsn", dsn, "install", "--listener-role", role)[0] == 0
        code, out, _ = run(capsys, *APP, "--dsn", dsn, "status", "--listener-role", role)
        assert code == 0
        assert "  privileges ok" in out
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_install_twice_creates_then_changes_nothing(schema, dsn, capsys):
    code, out, _ = run(capsys, *APP, "--dsn", dsn, "install")
    assert code == 0
    assert f"{TRIGGERS} created, 0 upgraded, 0 unchanged" in out
    code, out, _ = run(capsys, *APP, "--dsn", dsn, "install")
    assert code == 0
    assert f"0 created, 0 upgraded, {TRIGGERS} unchanged" in out


def test_install_shows_its_progress_when_asked_and_not_by_default_off_a_terminal(
    schema, dsn, capsys
):
    code, _, err = run(capsys, *APP, "--dsn", dsn, "install", "--progress")
    assert code == 0
    assert re.search(rf"triggers: 100%.*{TRIGGERS}/{TRIGGERS}", err), err
    run(capsys, *APP, "--dsn", dsn, "uninstall")
    code, _, err = run(capsys, *APP, "--dsn", dsn, "install")  # stderr is not a terminal here
    assert code == 0 and "triggers:" not in err


def test_progress_without_tqdm_is_none_by_default_and_a_usage_error_when_asked(
    schema, dsn, capsys, monkeypatch
):
    """tqdm comes with the ``cli`` extra: a plain ``pip install rowsync`` has no bars."""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    code, _, err = run(capsys, *APP, "--dsn", dsn, "install", "--progress")
    assert (code, err) == (2, "rowsync: error: --progress needs tqdm: pip install 'rowsync[cli]'\n")
    code, _, err = run(capsys, *APP, "--dsn", dsn, "install")
    assert (code, err) == (0, "")


def test_resync_announces_every_row_a_trigger_missed_to_a_listener(schema, dsn, capsys):
    """``rowsync resync`` after a load with triggers off: ``rowsync listen`` (here, a
    RowSync) receives an update of every row, with one progress bar per table."""
    run(capsys, *APP, "--dsn", dsn, "install")
    with psycopg.connect(dsn) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO persons (id, name) SELECT i, 'n' FROM generate_series(1, 5) i")
    with RowSync(dsn, reference_watchers()) as rs, rs.subscribe(Person) as sub:
        code, out, err = run(
            capsys, *APP, "--dsn", dsn, "resync", "persons", "--batch", "2", "--progress"
        )
        assert code == 0, err
        assert "public.persons: 5 rows announced" in out
        assert "5 rows of 1 table (" in out
        assert re.search(r"public\.persons: 100%.*5/5", err), err
        rs.flush()
        changes = [change for _, change in sub.drain()]
    assert sorted(c.ids["id"] for c in changes) == [1, 2, 3, 4, 5]
    assert {c.event for c in changes} == {"updated"}


def test_resync_of_one_row_says_row_and_table_in_the_singular(schema, dsn, capsys):
    run(capsys, *APP, "--dsn", dsn, "install")
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO persons (id, name) VALUES (1, 'n')")
    code, out, err = run(capsys, *APP, "--dsn", dsn, "resync", "persons")
    assert code == 0, err
    assert out.startswith("rowsync resync: public.persons: 1 row announced\n")
    assert "rowsync resync: 1 row of 1 table (" in out


def test_resync_of_a_table_that_is_not_watched_is_a_usage_error(schema, dsn, capsys):
    run(capsys, *APP, "--dsn", dsn, "install")
    code, _, err = run(capsys, *APP, "--dsn", dsn, "resync", "nope")
    assert code == 2
    assert "not watched for updates or inserts: nope" in err


def test_install_prune_drops_the_triggers_of_tables_no_longer_watched(schema, dsn, capsys):
    run(capsys, *APP, "--dsn", dsn, "install")
    smaller = ["--app", "cli_app:posts_only", "--dsn", dsn]
    code, out, _ = run(capsys, *smaller, "status")
    assert code == 1
    assert counts(out)["orphaned"] == TRIGGERS - 3
    assert "run `rowsync install` --prune" in out

    code, out, _ = run(capsys, *smaller, "install")
    assert code == 0 and f"{TRIGGERS - 3} orphaned left in place (--prune drops them)" in out
    code, out, _ = run(capsys, *smaller, "install", "--prune")
    assert code == 0 and f"{TRIGGERS - 3} orphaned dropped" in out
    assert run(capsys, *smaller, "status")[0] == 0


def test_uninstall_drops_every_trigger_of_the_channel_and_the_schema_when_asked(
    schema, dsn, capsys
):
    run(capsys, *APP, "--dsn", dsn, "install")
    code, out, _ = run(capsys, "--dsn", dsn, "uninstall")  # no --app needed
    assert code == 0
    assert f'{TRIGGERS} triggers of channel "rowsync" dropped' in out
    code, out, _ = run(capsys, *APP, "--dsn", dsn, "status")
    assert code == 1 and counts(out)["missing"] == TRIGGERS

    code, out, _ = run(capsys, "uninstall", "--dsn", dsn, "--drop-schema")
    assert code == 0 and '0 triggers of channel "rowsync" dropped and schema "rowsync"' in out
    with psycopg.connect(dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'rowsync'"
        ).fetchone() == (0,)


def test_dsn_defaults_to_DATABASE_URL_and_options_may_follow_the_command(
    schema, dsn, capsys, monkeypatch
):
    monkeypatch.setenv("DATABASE_URL", dsn)
    assert run(capsys, "install", *APP)[0] == 0
    assert run(capsys, "status", *APP)[0] == 0


def test_app_may_be_a_function_returning_a_rowsync_with_its_own_channel(
    schema, dsn, capsys, monkeypatch
):
    monkeypatch.setenv("DATABASE_URL", dsn)
    code, out, _ = run(capsys, "--app", "cli_app:make_rowsync", "install")
    assert code == 0 and 'channel "cli_app"' in out
    assert run(capsys, "--app", "cli_app:make_rowsync", "status")[0] == 0
    # The default channel has nothing installed: the app's channel is the one used above.
    assert run(capsys, *APP, "status")[0] == 1


def test_status_runs_as_python_m_rowsync(schema, dsn):
    before = python_m_rowsync(*APP, "--dsn", dsn, "status")
    out, err = before.communicate(timeout=60)
    assert before.returncode == 1, err
    assert "drift" in out
    assert main([*APP, "--dsn", dsn, "install"]) == 0
    after = python_m_rowsync(*APP, "--dsn", dsn, "status")
    out, err = after.communicate(timeout=60)
    assert after.returncode == 0, err
    assert "ok: the database matches the watchers" in out


# -- listen ----------------------------------------------------------------------------------------


def test_listen_count_2_prints_two_events_written_from_another_connection(
    schema, dsn, write, capsys
):
    assert main([*APP, "--dsn", dsn, "install"]) == 0
    capsys.readouterr()
    listening = threading.Event()
    result: dict[str, int] = {}

    def listen() -> None:
        result["code"] = main(
            [*APP, "--dsn", dsn, "listen", "--count", "2"], on_listening=lambda rs: listening.set()
        )

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert listening.wait(30), "the listener never started"
    write(Person(id=1, name="a"))
    write(Post(id=10, name="p", person_id=1))
    thread.join(30)
    assert not thread.is_alive(), "listen --count 2 did not exit"
    assert result["code"] == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert re.fullmatch(r"Person inserted id=1 ref=\d+", lines[0])
    assert re.fullmatch(r"Post inserted id=10 other_id=None person_id=1 ref=\d+", lines[1])
    assert "listening on" in err


def test_listen_in_a_subprocess_prints_json_and_stops_cleanly_on_sigterm(schema, dsn, write):
    assert main([*APP, "--dsn", dsn, "install"]) == 0
    proc = python_m_rowsync(*APP, "--dsn", dsn, "listen", "--json")
    try:
        assert proc.stderr is not None and proc.stdout is not None
        ready = proc.stderr.readline()  # printed once it LISTENs and is subscribed
        assert "listening on" in ready, ready
        write(Tag(id=5, name="x"))
        event = json.loads(proc.stdout.readline())
        assert {k: v for k, v in event.items() if k != "ref"} == {
            "model": "Tag",
            "event": "inserted",
            "ids": {"id": 5},
        }
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "stopped after 1 message\n" in err


def test_listen_warns_once_when_the_triggers_are_not_up_to_date(schema, dsn):
    assert main(["--app", "cli_app:posts_only", "--dsn", dsn, "install"]) == 0
    proc = python_m_rowsync(*APP, "--dsn", dsn, "listen")
    try:
        err = stderr_until_listening(proc)
        assert "listening on" in err, err
        proc.send_signal(signal.SIGTERM)
        err += proc.communicate(timeout=30)[1]
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, err
    assert len(re.findall(rf"{TRIGGERS - 3} missing, 0 outdated", err)) == 1, err


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ("cli_app", "expected module:attribute"),
        ("no_such_module:watchers", "cannot import 'no_such_module'"),
        ("cli_app:nothing", "'cli_app' has no attribute 'nothing'"),
        ("cli_app:not_watchers", "expected a RowSync, a non-empty list of rowsync.Watcher"),
    ],
)
def test_a_bad_app_is_one_clear_line_and_exit_code_2(capsys, app, message):
    code, out, err = run(capsys, "--app", app, "--dsn", "postgresql://localhost/unused", "status")
    assert code == 2
    assert err.startswith("rowsync: error: --app ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_an_app_that_fails_to_import_is_reported_as_that_import_on_one_line():
    """Not as the error it raised ("database error: duplicate key…"): the command never got
    as far as its own work."""
    proc = python_m_rowsync(
        "--app", "cli_broken_app:watchers", "--dsn", "postgresql://localhost/unused", "status"
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err == (
        "rowsync: error: --app 'cli_broken_app:watchers': importing 'cli_broken_app' failed: "
        'UniqueViolation: duplicate key value violates unique constraint "people_pkey" '
        "(-v shows the traceback)\n"
    )


def test_v_shows_the_traceback_of_an_app_that_fails_to_import():
    proc = python_m_rowsync(
        "-v", "--app", "cli_broken_app:watchers", "--dsn", "postgresql://localhost/unused", "sql"
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "Traceback (most recent call last):" in err
    assert re.search(r'cli_broken_app\.py", line \d+', err), err


@pytest.mark.parametrize("command", ["status", "install", "uninstall", "resync"])
def test_a_url_of_another_database_is_refused_on_one_line_with_exit_code_2(capsys, command):
    code, _, err = run(capsys, *APP, "--dsn", "mysql://root@127.0.0.1:1/app", command)
    assert code == 2
    assert err == (
        "rowsync: error: the database URL (--dsn or DATABASE_URL) is a mysql URL: "
        "rowsync needs PostgreSQL (postgresql://user@host/db)\n"
    )


def test_a_closed_stdout_ends_the_command_quietly():
    """``rowsync sql | head -1``: the reader went away, which is no error of the command."""
    read, write = os.pipe()
    os.close(read)  # before the command starts: its first write meets a closed pipe
    try:
        proc = python_m_rowsync(*APP, "sql", stdout=write)
    finally:
        os.close(write)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (0, "")


def test_no_dsn_and_no_DATABASE_URL_is_a_clear_error_with_exit_code_2(capsys, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    code, _, err = run(capsys, *APP, "status")
    assert code == 2
    assert err == "rowsync: error: no database given: pass --dsn URL or set DATABASE_URL\n"


def test_no_app_is_a_clear_error_with_exit_code_2(capsys, monkeypatch):
    monkeypatch.delenv("ROWSYNC_APP", raising=False)
    code, _, err = run(capsys, "--dsn", "postgresql://localhost/unused", "install")
    assert code == 2 and "--app MODULE:ATTR is needed" in err


def test_an_unreachable_database_is_one_line_and_exit_code_3(capsys):
    code, _, err = run(capsys, *APP, "--dsn", "postgresql://postgres@127.0.0.1:1/nowhere", "status")
    assert code == 3
    assert err.startswith("rowsync: error: cannot connect to the database: ")
    assert len(err.splitlines()) == 1


def test_a_bad_option_is_argparse_usage_and_exit_code_2(capsys):
    code, _, err = run(capsys, "install", "--no-such-option")
    assert code == 2 and "unrecognized arguments: --no-such-option" in err
