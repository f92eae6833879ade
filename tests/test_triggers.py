"""Trigger names and lifecycle: install, status, upgrade, prune, uninstall (SCENARIOS 3 and 4)."""

from __future__ import annotations

import threading

import psycopg
import sqlalchemy as sa

import rowsync
from fixtures import db_functions, db_triggers, reference_watchers
from models import Person, Post, Tag
from rowsync import RowSync, Sync
from rowsync.migrations import migration_files
from rowsync.triggers import MAX_IDENTIFIER, PREFIX, short_name, triggers

OFFLINE = "postgresql://rowsync@127.0.0.1:1/never_connected"


def names(rs: RowSync) -> set[tuple[str, str, str]]:
    return {(t.watcher.schema, t.watcher.table, t.name) for t in rs.triggers}


def rowsync_triggers(engine: sa.Engine) -> set[tuple[str, str, str]]:
    return {
        key
        for key, comment in db_triggers(engine).items()
        if comment.startswith("rowsync channel=")
    }


# -- scenario 3: names -----------------------------------------------------------------


def test_trigger_and_function_names_fit_postgres_identifiers_and_are_distinct() -> None:
    trigs = RowSync(OFFLINE, reference_watchers()).triggers
    all_names = [t.name for t in trigs] + [t.function for t in trigs]

    assert all(len(name.encode()) <= MAX_IDENTIFIER for name in all_names)
    assert all(name.startswith(PREFIX) for name in all_names)
    assert len(set(all_names)) == len(all_names)


def test_trigger_names_are_deterministic() -> None:
    first = RowSync(OFFLINE, reference_watchers())
    second = RowSync(OFFLINE, list(reversed(reference_watchers())))

    assert names(first) == names(second)
    assert {t.function for t in first.triggers} == {t.function for t in second.triggers}


def test_trigger_names_differ_by_table_event_label_and_channel() -> None:
    plain = triggers(rowsync.watchers(Post), schema="rowsync", channel="rowsync")
    labelled = triggers(rowsync.watchers(Post, label="feed"), schema="rowsync", channel="rowsync")
    other_label = triggers(
        rowsync.watchers(Post, label='feed "2"'), schema="rowsync", channel="rowsync"
    )
    other_channel = triggers(rowsync.watchers(Post), schema="rowsync", channel="other")
    tags = triggers(rowsync.watchers(Tag), schema="rowsync", channel="rowsync")
    sets = [
        {t.name for t in trigs} for trigs in (plain, labelled, other_label, other_channel, tags)
    ]

    assert sum(len(s) for s in sets) == len(set().union(*sets)) == 15
    assert len({t.name for t in plain}) == 3


def test_long_names_are_cut_on_a_character_boundary_and_kept_apart_by_a_hash() -> None:
    ascii_a = short_name("ins", "t" * 40 + "_first" + "x" * 200, ("a",))
    ascii_b = short_name("ins", "t" * 40 + "_second" + "x" * 200, ("b",))
    unicode = short_name("ins", "ü" * 100, ("c",))
    emoji = short_name("del", "🐘" * 40, ("d",))

    for name in (ascii_a, ascii_b, unicode, emoji):
        assert len(name.encode()) <= MAX_IDENTIFIER
        assert "\ufffd" not in name
    assert ascii_a != ascii_b
    assert unicode.startswith("rowsync_ins_üü")
    assert short_name("ins", "ü" * 100, ("c",)) == unicode


def test_names_keep_the_table_name_readable_when_it_fits() -> None:
    (trig,) = triggers(
        rowsync.watchers(Post, events=["updated"]), schema="rowsync", channel="rowsync"
    )

    assert trig.name.startswith("rowsync_upd_posts_")


# -- scenario 4: lifecycle -------------------------------------------------------------


def test_status_before_install_reports_every_trigger_missing(schema) -> None:
    rs = RowSync(schema, reference_watchers())

    status = rs.status()

    assert not status.schema_ready
    assert not status.ok
    assert set(status.missing) == names(rs)
    assert status.installed == status.outdated == status.orphaned == []


def test_install_creates_one_commented_trigger_per_watcher(schema) -> None:
    rs = RowSync(schema, reference_watchers())

    before = rs.install()

    assert set(before.missing) == names(rs) and not before.schema_ready
    assert rowsync_triggers(schema) == names(rs)
    assert db_functions(schema) == {t.function for t in rs.triggers}
    after = rs.status()
    assert after.ok and after.schema_ready
    assert set(after.installed) == names(rs)


def _versions(engine: sa.Engine) -> list[tuple[str, str, str]]:
    """Row versions (xmin) of rowsync's triggers and functions: rewriting one changes them."""
    query = sa.text(
        "SELECT t.tgname, t.xmin::text, p.xmin::text"
        " FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
        " WHERE starts_with(t.tgname, 'rowsync_') ORDER BY t.tgname"
    )
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]  # type: ignore[misc]


def test_installing_twice_is_a_no_op(schema) -> None:
    rs = RowSync(schema, reference_watchers())
    rs.install()
    versions = _versions(schema)

    again = RowSync(schema, reference_watchers()).install()

    assert again.ok
    assert set(again.installed) == names(rs)
    assert _versions(schema) == versions


def test_changed_watcher_is_reported_outdated_and_upgraded_by_install(schema, write) -> None:
    RowSync(schema, rowsync.watchers(Post)).install()
    changed = RowSync(schema, rowsync.watchers(Post, extra_columns=["name"]))

    status = changed.status()
    before = changed.install()

    assert set(status.outdated) == names(changed)
    assert status.installed == status.missing == status.orphaned == []
    assert before.outdated == status.outdated
    assert changed.status().ok
    with changed:
        sub = changed.subscribe(Post)
        write(Post(id=1, name="now identifying"))
        changed.flush()
        [(kind, change)] = sub.drain()
    assert kind is Sync
    assert change.ids == {"id": 1, "other_id": None, "person_id": None, "name": "now identifying"}


def test_rowsync_triggers_left_from_older_watchers_are_orphaned_and_pruned_on_request(
    schema, write
) -> None:
    old = RowSync(schema, rowsync.watchers(Post) + rowsync.watchers(Tag))
    old.install()
    new = RowSync(schema, rowsync.watchers(Post))
    tag_triggers = names(old) - names(new)

    status = new.status()
    kept = new.install()
    still_there = rowsync_triggers(schema)
    pruned = new.install(prune=True)

    assert len(tag_triggers) == 3
    assert set(status.orphaned) == tag_triggers and not status.ok
    assert set(kept.orphaned) == tag_triggers and still_there >= tag_triggers
    assert set(pruned.orphaned) == tag_triggers
    assert rowsync_triggers(schema) == names(new)
    assert db_functions(schema) == {t.function for t in new.triggers}
    assert new.status().ok
    write(Tag(id=1, name="no trigger fires"))


def test_triggers_of_another_channel_are_not_orphans_of_this_one(schema) -> None:
    mine = RowSync(schema, rowsync.watchers(Post))
    theirs = RowSync(schema, rowsync.watchers(Tag), channel="theirs")
    theirs.install()
    mine.install(prune=True)

    assert mine.status().orphaned == []
    assert rowsync_triggers(schema) == names(mine) | names(theirs)

    assert mine.uninstall() == 3
    assert rowsync_triggers(schema) == names(theirs)


FOREIGN = """
CREATE TABLE audit (id serial PRIMARY KEY, what text);
CREATE FUNCTION audit_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO audit (what) VALUES (TG_NAME); RETURN NULL; END $$;
CREATE FUNCTION rowsync_lookalike_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO audit (what) VALUES (TG_NAME); RETURN NULL; END $$;
CREATE TRIGGER audit_trg AFTER INSERT ON posts FOR EACH ROW EXECUTE FUNCTION audit_fn();
CREATE TRIGGER rowsync_ins_posts_lookalike AFTER INSERT ON posts
  FOR EACH ROW EXECUTE FUNCTION rowsync_lookalike_fn();
CREATE TRIGGER rowsync_ins_tags_commented AFTER INSERT ON tags
  FOR EACH ROW EXECUTE FUNCTION rowsync_lookalike_fn();
COMMENT ON TRIGGER rowsync_ins_tags_commented ON tags IS 'made by hand, not by rowsync';
"""


def test_another_librarys_triggers_are_never_touched(schema, write) -> None:
    with psycopg.connect(
        schema.url.set(drivername="postgresql").render_as_string(hide_password=False)
    ) as conn:
        conn.execute(FOREIGN)
    foreign = {
        ("public", "posts", "audit_trg"),
        ("public", "posts", "rowsync_ins_posts_lookalike"),
        ("public", "tags", "rowsync_ins_tags_commented"),
    }
    rs = RowSync(schema, reference_watchers())

    rs.install(prune=True)
    status = rs.status()
    dropped = rs.uninstall(drop_schema=True)

    assert status.ok and status.orphaned == []
    assert dropped == len(rs.triggers)
    assert set(db_triggers(schema)) == foreign
    write(Person(id=1), Post(id=1, person_id=1), Tag(id=1))
    with schema.connect() as conn:
        fired = sorted(conn.scalars(sa.text("SELECT what FROM audit")))
    assert fired == ["audit_trg", "rowsync_ins_posts_lookalike", "rowsync_ins_tags_commented"]


def test_uninstall_drops_triggers_and_functions_and_keeps_the_schema_unless_asked(
    schema, write
) -> None:
    rs = RowSync(schema, reference_watchers())
    rs.install()

    dropped = rs.uninstall()

    assert dropped == len(rs.triggers)
    assert rowsync_triggers(schema) == set()
    assert db_functions(schema) == set()
    status = rs.status()
    assert status.schema_ready and set(status.missing) == names(rs)
    write(Person(id=1), Post(id=1, person_id=1))
    assert rs.uninstall(drop_schema=True) == 0
    with schema.connect() as conn:
        assert conn.scalar(sa.text("SELECT to_regnamespace('rowsync')")) is None


def test_reinstalling_after_uninstall_restores_every_trigger(schema) -> None:
    rs = RowSync(schema, reference_watchers())
    rs.install()
    rs.uninstall(drop_schema=True)

    before = rs.install()

    assert set(before.missing) == names(rs) and not before.schema_ready
    assert rs.status().ok


def test_sql_script_leaves_the_database_as_install_does(schema) -> None:
    rs = RowSync(schema, reference_watchers())
    with rs.connect(autocommit=True) as conn:
        conn.execute(rs.sql())
        conn.execute(rs.sql())

    status = rs.status()

    assert status.ok, status
    assert rowsync_triggers(schema) == names(rs)


def test_concurrent_installs_all_succeed_and_leave_one_set_of_triggers(schema) -> None:
    """Several app processes starting at once: the advisory lock makes them take turns."""
    count = 6
    barrier = threading.Barrier(count)
    results: list[rowsync.Status] = []
    errors: list[BaseException] = []
    url = schema.url.render_as_string(hide_password=False)

    def install() -> None:
        rs = RowSync(url, reference_watchers())
        barrier.wait(timeout=30)
        try:
            results.append(rs.install())
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            rs.engine.dispose()

    threads = [threading.Thread(target=install) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    rs = RowSync(schema, reference_watchers())
    assert errors == []
    assert len(results) == count
    assert sorted(bool(status.missing) for status in results) == [False] * (count - 1) + [True]
    assert rowsync_triggers(schema) == names(rs)
    with schema.connect() as conn:
        versions = list(
            conn.scalars(sa.text("SELECT version FROM rowsync.migrations ORDER BY version"))
        )
    assert versions == [v for v, _ in migration_files()]
    assert rs.status().ok


def test_installed_trigger_fires_only_for_its_event(schema, write) -> None:
    """One RowSync per event (each on its own channel), so each sees only its trigger fire."""
    events = ("inserted", "updated", "deleted")
    each = {e: RowSync(schema, rowsync.watchers(Tag, events=[e]), channel=e) for e in events}
    subs = {}
    for event, rs in each.items():
        rs.install()
        rs.start()
        subs[event] = rs.subscribe(Tag)
    try:
        write(Tag(id=1, name="a"))
        write(sa.update(Tag).values(name="b"))
        write(sa.delete(Tag))
        got = {}
        for event, rs in each.items():
            rs.flush()
            got[event] = [change.event for _, change in subs[event].drain()]
    finally:
        for rs in each.values():
            rs.stop()

    assert got == {e: [e] for e in events}
