"""Trigger DDL generated from watchers, and its lifecycle: install, status, prune, uninstall.

Every identifier is composed with :mod:`psycopg.sql`. Names are ``rowsync_`` + event + table,
shortened to fit Postgres' 63-byte limit, + a hash of the trigger's identity, so they are
deterministic and distinct. A ``COMMENT ON TRIGGER`` carries the channel and a hash of the
definition: ``status`` compares it to detect drift, and only triggers whose name starts with
the prefix *and* whose comment names this channel are ever dropped as orphans.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, TypeAlias

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from rowsync import advisory, migrations, privileges
from rowsync.errors import ConfigurationError
from rowsync.listener import SEALED
from rowsync.watchers import Watcher

if TYPE_CHECKING:
    from rowsync.slots import Slot

logger = logging.getLogger(__name__)

PREFIX = "rowsync_"
DEFAULT_CHANNEL = "rowsync"
DEFAULT_SCHEMA = "rowsync"
"""Where rowsync's own objects live unless told otherwise (``RowSync(schema=...)``)."""
MAX_IDENTIFIER = 63
LOCK_TIMEOUT = 60.0
"""Seconds ``install`` and ``uninstall`` wait for another one to finish (see :func:`_lock`)."""
NOTIFY_LIMIT = 7900
"""Payload bytes above which an event goes through the overflow table (NOTIFY's hard limit is
8000)."""

Mode: TypeAlias = Literal["notify", "durable", "stream"]
"""How an event leaves the writer's transaction. ``notify``: in a NOTIFY payload.
``durable``: as a row of the change log, plus an empty NOTIFY that wakes the listener up.
``stream``: as a row of the change log only, which the listener polls: no NOTIFY, so no
cluster-wide lock at the writer's commit."""
MODES: tuple[Mode, ...] = ("notify", "durable", "stream")

Progress: TypeAlias = Callable[[str, int, int], None]
"""Called as ``progress(what, done, total)`` while a long operation runs: ``what`` is
``"triggers"`` for an install, ``"schema.table"`` for an announce."""

_EVENT = {
    "inserted": ("INSERT", "ins", "i"),
    "updated": ("UPDATE", "upd", "u"),
    "deleted": ("DELETE", "del", "d"),
}


def short_name(kind: str, table: str, identity: Sequence[object]) -> str:
    """``rowsync_<kind>_<table…>_<hash>`` cut to 63 bytes on a character boundary."""
    digest = hashlib.sha256(repr(tuple(identity)).encode()).hexdigest()[:10]
    head = f"{PREFIX}{kind}_"
    room = MAX_IDENTIFIER - len(head.encode()) - len(digest) - 1
    cut = table.encode()[:room].decode("utf-8", errors="ignore")
    return f"{head}{cut}_{digest}"


@dataclass(frozen=True)
class Trigger:
    """The installed form of one watcher."""

    watcher: Watcher
    name: str
    function: str
    definition: sql.Composed = field(repr=False)
    digest: str

    @property
    def table(self) -> sql.Identifier:
        return sql.Identifier(self.watcher.schema, self.watcher.table)


@dataclass(frozen=True)
class Status:
    """What ``install`` would change: triggers by state, as ``(schema, table, trigger)`` names.

    ``missing_tables`` are watched tables the database does not have, as ``(schema, table)``:
    their triggers are among the missing, but ``install`` cannot create them until the
    tables exist (the application's migrations create them, not rowsync).
    """

    installed: list[tuple[str, str, str]]
    outdated: list[tuple[str, str, str]]
    missing: list[tuple[str, str, str]]
    orphaned: list[tuple[str, str, str]]
    schema_ready: bool
    missing_tables: list[tuple[str, str]]
    privileges: list[str] = field(default_factory=list)
    """What PUBLIC may do with rowsync's objects, what a listener role lacks (one line each)."""
    wal_level: str | None = None
    """The server's ``wal_level`` when the capture is ``wal`` (it needs ``logical``)."""
    slots: list[Slot] = field(default_factory=list)
    """rowsync's replication slots of the channel, when the capture is ``wal``."""

    @property
    def ok(self) -> bool:
        return (
            self.schema_ready
            and self.wal_level in (None, "logical")
            and not (self.outdated or self.missing or self.orphaned or self.privileges)
        )


def triggers(
    watchers: Iterable[Watcher], *, schema: str, channel: str, mode: Mode = "notify"
) -> list[Trigger]:
    """Build one :class:`Trigger` per watcher; refuse if two would share a name."""
    result = [_trigger(w, schema=schema, channel=channel, mode=mode) for w in watchers]
    names = [(t.watcher.schema, t.watcher.table, t.name) for t in result]
    if len(set(names)) != len(names) or len({t.function for t in result}) != len(result):
        raise ValueError("two watchers produce the same trigger name; give one a label")
    return result


def ids(record: sql.Composable, columns: Sequence[str]) -> sql.Composable:
    """``jsonb_build_object('col', new_row -> 'col', …)``, in chunks of 50 pairs (the function
    takes 100 arguments at most). Columns are read from the row as jsonb, so a column dropped
    or renamed under the trigger gives a null, never an error in the writer's transaction."""
    chunks = [
        sql.SQL("jsonb_build_object({})").format(
            sql.SQL(", ").join(
                sql.SQL("{}, {} -> {}").format(sql.Literal(c), record, sql.Literal(c))
                for c in columns[i : i + 50]
            )
        )
        for i in range(0, len(columns), 50)
    ]
    return sql.SQL(" || ").join(chunks)


def emit(mode: Mode, schema: str, channel: str) -> sql.Composed:
    """The statements that hand ``payload`` (and ``rowsync_ref``) over, in this mode."""
    if mode == "notify":
        return sql.SQL(
            """IF octet_length(payload) > {limit} THEN
        -- Too large for NOTIFY: park it (migration 0004) and notify its ref, sealed.
        payload := jsonb_build_object(
            'r', rowsync_ref, 'x', true, 'k', {park}(rowsync_ref, payload))::text;
    END IF;
    PERFORM pg_notify({channel}, payload);"""
        ).format(
            limit=sql.Literal(NOTIFY_LIMIT),
            park=sql.Identifier(schema, "park"),
            channel=sql.Literal(channel),
        )
    append = sql.SQL("INSERT INTO {} (payload) VALUES (payload);").format(
        sql.Identifier(schema, "log")
    )
    if mode == "stream":
        return append
    # One wake-up per transaction: NOTIFY folds identical payloads of a transaction into one.
    return sql.SQL("{}\n    PERFORM pg_notify({}, '');").format(append, sql.Literal(channel))


def seal(schema: str) -> sql.Composed:
    """The statement that seals an update carrying values before (``old_ids``), in the
    ``notify`` mode: anyone may NOTIFY, and the listener routes by those values, which no read
    of the row can confirm, so it routes by them only when the seal is genuine (migration
    0005). The change log and parked events need no seal: only the triggers write them."""
    return sql.SQL(
        """
    IF old_ids IS NOT NULL THEN
        payload := left(payload, -1) || {sealed} || {seal}(payload) || '"}}';
    END IF;"""
    ).format(sealed=sql.Literal(SEALED), seal=sql.Identifier(schema, "seal"))


def sequence(schema: str) -> sql.Literal:
    """rowsync's event sequence, as the argument of ``nextval``: it numbers every event (its
    ``ref``), so messages about one row can be told apart by age."""
    return sql.Literal(sql.Identifier(schema, "ref_seq").as_string())


def payload(
    w: Watcher, ref: sql.Composable, new: sql.Composable, old: sql.Composable
) -> sql.Composed:
    """The event as JSON text, the one format the listener reads (:mod:`rowsync.listener`)."""
    return sql.SQL(
        "jsonb_build_object("
        "'r', {ref}, 's', {schema}, 't', {table}, 'e', {letter}, 'l', {label}, "
        "'g', nullif(current_setting('rowsync.origin', true), ''), 'n', {new}, 'o', {old}, "
        "'v', pg_current_xact_id()::text::bigint"
        ")::text"
    ).format(
        ref=ref,
        schema=sql.Literal(w.schema),
        table=sql.Literal(w.table),
        letter=sql.Literal(_EVENT[w.event][2]),
        label=sql.Literal(w.label),
        new=new,
        old=old,
    )


def _trigger(w: Watcher, *, schema: str, channel: str, mode: Mode) -> Trigger:
    verb, kind, _ = _EVENT[w.event]
    identity = (w.schema, w.table, w.event, w.label, channel)
    name = short_name(kind, w.table, identity)
    function = short_name(kind, w.table, (*identity, "function"))
    # Each row converted to jsonb once, however many columns are read from it.
    rows = sql.SQL("    new_row jsonb := to_jsonb({});").format(
        sql.SQL("OLD" if w.event == "deleted" else "NEW")
    )
    old: sql.Composable = sql.SQL("NULL")
    if w.event == "updated":
        rows = sql.SQL("{}\n    old_row jsonb := to_jsonb(OLD);").format(rows)
        old = ids(sql.SQL("old_row"), w.columns)
    body = sql.SQL(
        """
DECLARE
    rowsync_ref bigint := nextval({seq});
{rows}
    new_ids jsonb := {new};
    old_ids jsonb := {old};
    payload text;
BEGIN
    {guard}
    IF old_ids = new_ids THEN
        old_ids := NULL;  -- identifying columns unchanged: the new ones say it all
    END IF;
    payload := {payload};{seal}
    {emit}
    RETURN NULL;
END
"""
    ).format(
        seq=sequence(schema),
        guard=_guard(w, function),
        rows=rows,
        new=ids(sql.SQL("new_row"), w.columns),
        old=old,
        payload=payload(w, sql.SQL("rowsync_ref"), sql.SQL("new_ids"), sql.SQL("old_ids")),
        seal=seal(schema) if mode == "notify" and w.event == "updated" else sql.SQL(""),
        emit=emit(mode, schema, channel),
    )
    # The function runs as its owner (the installer), with a fixed search_path: writers need
    # no privilege of rowsync's, and no one else may call it or attach it to a table.
    head = sql.SQL(
        "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER"
        " SET search_path = pg_catalog, pg_temp AS "
    ).format(sql.Identifier(schema, function))
    create = _pct(head.as_string()) + _quoted(
        "%1$s".join(_pct(part) for part in body.as_string().split(_RELID))
    )
    table = sql.Identifier(w.schema, w.table)
    definition = sql.SQL(
        "{create};\n"
        "REVOKE ALL ON FUNCTION {function}() FROM PUBLIC;\n"
        "CREATE OR REPLACE TRIGGER {name} AFTER {verb} ON {table}"
        " FOR EACH ROW EXECUTE FUNCTION {function}();\n"
    ).format(
        create=_with_relid(create, table),
        function=sql.Identifier(schema, function),
        name=sql.Identifier(name),
        verb=sql.SQL(verb),
        table=table,
    )
    digest = hashlib.sha256(definition.as_string().encode()).hexdigest()[:16]
    return Trigger(w, name, function, definition, digest)


_RELID = "\x00relid\x00"
"""Where the table's OID goes in a function body (NUL: no name or SQL text can contain it)."""


def _guard(w: Watcher, function: str) -> sql.Composed:
    """The check that makes a function refuse any table but its own: the OID fixed at install,
    a partition of it (a row trigger on a partitioned table fires for the partition), or, in
    a database restored from a dump (new OIDs), the table of the same name. Only a table
    that is not the one installed for takes the slower, second look."""
    return sql.SQL(
        """IF TG_RELID <> {relid} THEN
        IF NOT EXISTS (
            SELECT FROM pg_partition_ancestors(TG_RELID) AS a
            WHERE a.relid::oid IN ({relid}, to_regclass({regclass})::oid)
        ) THEN
            RAISE EXCEPTION 'rowsync trigger function % serves %, not %.%',
                {function}, {qualified}, TG_TABLE_SCHEMA, TG_TABLE_NAME;
        END IF;
    END IF;"""
    ).format(
        relid=sql.SQL(_RELID),
        regclass=sql.Literal(sql.Identifier(w.schema, w.table).as_string()),
        function=sql.Literal(function),
        qualified=sql.Literal(f"{w.schema}.{w.table}"),
    )


def _pct(text: str) -> str:
    return text.replace("%", "%%")


def _quoted(text: str) -> str:
    """``text`` as a dollar-quoted constant: readable in ``rowsync sql``, nested or not."""
    tag = migrations.dollar_tag(text)
    return f"{tag}{text}{tag}"


def _with_relid(create: str, table: sql.Identifier) -> sql.Composed:
    """Run ``create`` (a ``format()`` template where ``%1$s`` is the table's OID) with the
    OID filled in by the server: a static script (``rowsync sql``) cannot know it."""
    run = (
        f"\nBEGIN\nEXECUTE pg_catalog.format({_quoted(create)},"
        f" {sql.Literal(table.as_string()).as_string()}::regclass::oid);\nEND\n"
    )
    return sql.SQL("DO {}").format(sql.SQL(_quoted(run)))


def _comment(t: Trigger, channel: str) -> sql.Composed:
    return sql.SQL("COMMENT ON TRIGGER {} ON {} IS {};\n").format(
        sql.Identifier(t.name), t.table, sql.Literal(f"rowsync channel={channel} digest={t.digest}")
    )


def install_sql(
    trigs: Sequence[Trigger],
    *,
    schema: str,
    channel: str,
    listener_roles: Sequence[str] = (),
    retention: float | None = None,
) -> sql.Composed:
    """The whole DDL as one script, for ``rowsync sql`` and Alembic revisions."""
    parts: list[sql.Composable] = [_lock(schema)]
    parts += [m + sql.SQL(";\n") for m in migrations.pending_sql(schema)]
    parts += [
        statement + sql.SQL(";\n")
        for statement in privileges.install_statements(
            schema, listener_roles=listener_roles, retention=retention
        )
    ]
    for t in trigs:
        parts += [t.definition, _comment(t, channel)]
    return sql.Composed(parts)


def _lock(schema: str, timeout: float = LOCK_TIMEOUT) -> sql.Composed:
    """A transaction-scoped advisory lock, so app processes installing at once take turns,
    waited for at most ``timeout`` seconds (see :mod:`rowsync.advisory`: any role may hold it).
    Past that, the statement fails (``lock_not_available``) naming the session that holds it.
    A statement of its own, so a script (``rowsync sql``, a migration) waits as boundedly as
    ``install`` does; the transaction's ``lock_timeout`` is restored once the lock is taken."""
    if not timeout > 0:
        raise ValueError(f"lock_timeout must be positive, not {timeout}")
    key = advisory.key(f"rowsync install {schema}")
    body = sql.SQL(
        """
DECLARE
    previous text := current_setting('lock_timeout');
    held text;
BEGIN
    PERFORM set_config('lock_timeout', {wait}, true);
    BEGIN
        PERFORM pg_advisory_xact_lock({key});
    EXCEPTION WHEN lock_not_available THEN
        SELECT format('pid %s (role %L, application_name %L)',
                      h.pid, h.usename, h.application_name)
            INTO held FROM ({holder}) AS h;
        RAISE EXCEPTION USING ERRCODE = 'lock_not_available',
            MESSAGE = format('the rowsync install lock of schema %I was not free within %s s:'
                             ' it is held by %s', {schema}, {seconds},
                             coalesce(held, 'a session that has let go since')),
            HINT = 'another install or uninstall is still running, or a session holds the lock'
                   ' without being one: end that session (pg_terminate_backend), or wait longer'
                   ' (install(lock_timeout=...)).';
    END;
    PERFORM set_config('lock_timeout', previous, true);
END
"""
    ).format(
        wait=sql.Literal(f"{max(1, round(timeout * 1000))}ms"),
        key=sql.Literal(key),
        holder=advisory.holder(key),
        schema=sql.Literal(schema),
        seconds=sql.Literal(f"{timeout:g}"),
    )
    return sql.SQL("DO {};\n").format(sql.SQL(_quoted(body.as_string())))


_FOUND = """
SELECT n.nspname, c.relname, t.tgname, coalesce(d.description, ''), p.proname, pn.nspname
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid
JOIN pg_namespace pn ON pn.oid = p.pronamespace
LEFT JOIN pg_description d ON d.objoid = t.oid AND d.classoid = 'pg_trigger'::regclass
WHERE NOT t.tgisinternal AND starts_with(t.tgname, %s)
"""


@dataclass(frozen=True)
class _Found:
    schema: str
    table: str
    name: str
    comment: str
    function: str
    function_schema: str


def _found(conn: psycopg.Connection[TupleRow], channel: str) -> list[_Found]:
    """rowsync triggers of this channel in the database; anything else is not ours to touch."""
    mine = f"rowsync channel={channel} "
    return [_Found(*row) for row in conn.execute(_FOUND, (PREFIX,)) if str(row[3]).startswith(mine)]


def _missing_tables(
    conn: psycopg.Connection[TupleRow], trigs: Sequence[Trigger]
) -> list[tuple[str, str]]:
    """The watched tables that do not exist, by name (no quoting: the names are values)."""
    wanted = sorted({(t.watcher.schema, t.watcher.table) for t in trigs})
    return [
        (str(row[0]), str(row[1]))
        for row in conn.execute(
            "SELECT w.s, w.t FROM unnest(%s::text[], %s::text[]) AS w(s, t)"
            " WHERE NOT EXISTS (SELECT FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = w.s AND c.relname = w.t) ORDER BY w.s, w.t",
            ([s for s, _ in wanted], [t for _, t in wanted]),
        )
    ]


def _schema_ready(conn: psycopg.Connection[TupleRow], schema: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(schema, "migrations").as_string(),)
    ).fetchone()
    if not row or not row[0]:
        return False
    done = {
        r[0]
        for r in conn.execute(
            sql.SQL("SELECT version FROM {}.migrations").format(sql.Identifier(schema))
        )
    }
    return {v for v, _ in migrations.migration_files()} <= done


def status(
    conn: psycopg.Connection[TupleRow],
    trigs: Sequence[Trigger],
    *,
    schema: str,
    channel: str,
    listener_roles: Sequence[str] = (),
) -> Status:
    """Triggers by state, whether the schema is up to date, and (once it is) what is wrong
    with its privileges: anything PUBLIC holds, anything the ``listener_roles`` lack."""
    found = {(f.schema, f.table, f.name): f for f in _found(conn, channel)}
    installed, outdated, missing = [], [], []
    for t in trigs:
        key = (t.watcher.schema, t.watcher.table, t.name)
        f = found.pop(key, None)
        if f is None:
            missing.append(key)
        elif f.comment.endswith(f"digest={t.digest}"):
            installed.append(key)
        else:
            outdated.append(key)
    ready = _schema_ready(conn, schema)
    grants = privileges.problems(conn, schema, listener_roles) if ready else []
    return Status(
        installed,
        outdated,
        missing,
        sorted(found),
        ready,
        _missing_tables(conn, trigs),
        grants,
    )


def install(
    conn: psycopg.Connection[TupleRow],
    trigs: Sequence[Trigger],
    *,
    schema: str,
    channel: str,
    prune: bool = False,
    progress: Progress | None = None,
    listener_roles: Sequence[str] = (),
    retention: float | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
) -> Status:
    """Create what is missing or outdated (and drop orphans when ``prune``), in one transaction;
    grant the ``listener_roles`` what a listener needs, and set the ``retention`` (seconds)
    no prune may go below, when given.

    Returns the status found before the change; installing twice changes nothing.
    ``progress("triggers", done, total)`` is called after each trigger created. Refuses,
    changing nothing, while a watched table does not exist, and when another session holds
    the install lock for more than ``lock_timeout`` seconds (``psycopg.errors.LockNotAvailable``,
    naming that session).
    """
    with conn.transaction():
        if absent := _missing_tables(conn, trigs):
            raise ConfigurationError(
                "the watched tables do not exist: "
                + ", ".join(f"{s}.{t}" for s, t in absent)
                + "; create them first (your migrations), then install"
            )
        conn.execute(_lock(schema, lock_timeout))
        ready = _schema_ready(conn, schema)
        migrations.migrate(conn, schema)
        for statement in privileges.install_statements(
            schema, listener_roles=listener_roles, retention=retention
        ):
            conn.execute(statement)
        before = replace(status(conn, trigs, schema=schema, channel=channel), schema_ready=ready)
        todo = {*before.missing, *before.outdated}
        done = 0
        for t in trigs:
            if (t.watcher.schema, t.watcher.table, t.name) in todo:
                logger.info(
                    "installing trigger %s on %s.%s", t.name, t.watcher.schema, t.watcher.table
                )
                conn.execute(t.definition + _comment(t, channel))
                done += 1
                if progress is not None:
                    progress("triggers", done, len(todo))
        if prune:
            _drop(
                conn,
                [
                    f
                    for f in _found(conn, channel)
                    if (f.schema, f.table, f.name) in set(before.orphaned)
                ],
            )
    return before


def uninstall(
    conn: psycopg.Connection[TupleRow],
    *,
    schema: str,
    channel: str,
    drop_schema: bool = False,
    lock_timeout: float = LOCK_TIMEOUT,
) -> int:
    """Drop every trigger of this channel (and rowsync's schema when asked); return how many.
    Waits for the install lock as :func:`install` does."""
    with conn.transaction():
        conn.execute(_lock(schema, lock_timeout))
        found = _found(conn, channel)
        _drop(conn, found)
        if drop_schema:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    return len(found)


def _drop(conn: psycopg.Connection[TupleRow], found: Iterable[_Found]) -> None:
    for f in found:
        logger.info("dropping trigger %s on %s.%s", f.name, f.schema, f.table)
        conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(f.name), sql.Identifier(f.schema, f.table)
            )
        )
        if f.function.startswith(PREFIX):
            conn.execute(
                sql.SQL("DROP FUNCTION IF EXISTS {}()").format(
                    sql.Identifier(f.function_schema, f.function)
                )
            )


def uninstall_sql(
    trigs: Sequence[Trigger], *, schema: str, drop_schema: bool = False
) -> sql.Composed:
    """DROP statements for these triggers and their functions (and rowsync's schema when asked).

    The static counterpart of :func:`uninstall`, for Alembic downgrades: it names the given
    triggers instead of looking them up, so it undoes exactly what ``install_sql`` created.
    """
    parts: list[sql.Composable] = [_lock(schema)]
    for t in trigs:
        parts.append(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {};\n").format(sql.Identifier(t.name), t.table)
        )
        parts.append(
            sql.SQL("DROP FUNCTION IF EXISTS {}();\n").format(sql.Identifier(schema, t.function))
        )
    if drop_schema:
        parts.append(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE;\n").format(sql.Identifier(schema)))
    return sql.Composed(parts)
